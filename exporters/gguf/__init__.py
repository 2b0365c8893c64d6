"""GGUF export: the container writer for llama.cpp (float tensors or packed ggml rows per tensor)."""

from .tensors import GgufTensor, float_tensors, permute_qk_rows
from .writer import write_gguf

__all__ = ["GgufTensor", "float_tensors", "permute_qk_rows", "write_gguf"]
