"""Tensors handed to the GGUF writer, and the llama Q/K row permutation.

A :class:`GgufTensor` is one Hugging Face-named tensor in HF layout (a linear weight is ``(out, in)``, one row per
output unit). It is either a float32 array, stored as F32 or F16, or rows of ggml blocks that a packer in
``turboboa/formats`` produced: a uint8 array ``(rows, row_bytes)`` with its ggml type and logical shape
``(rows, cols)``. ggml cuts every row into blocks along the input columns, so a whole row (its codes and
scales together) is the unit the writer may reorder.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)


def _as_float32(array: Any) -> np.ndarray:
    """Return ``array`` (numpy or torch, any float dtype) as a C-contiguous float32 numpy array."""
    if hasattr(array, "detach"):  # torch.Tensor, without importing torch here
        array = array.detach().to("cpu").float().numpy()
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32))


@dataclass(frozen=True, eq=False)
class GgufTensor:
    """One tensor for the GGUF file, in Hugging Face layout (rows = output units).

    * float: ``data`` float32 of any rank, ``qtype`` F32 or F16 (the type stored; 1-D tensors are always
      stored as F32, as llama.cpp expects for norms and biases), ``shape == data.shape``;
    * packed: ``data`` uint8 ``(rows, row_bytes)`` holding ``row_bytes = cols / block * block_bytes`` bytes of
      ggml blocks per row, ``qtype`` their ggml type, ``shape`` the logical ``(rows, cols)``.

    Build them with :meth:`from_float` or :meth:`from_packed`, which check the sizes.
    """

    data: np.ndarray
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]

    @classmethod
    def from_float(cls, array: Any, qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> GgufTensor:
        """A float tensor (numpy or torch) to be stored as ``qtype`` (F32 or F16)."""
        data = _as_float32(array)
        if qtype not in FLOAT_TYPES:
            raise ValueError(f"a float tensor is stored as F32 or F16, not {qtype.name}; pack it first")
        return cls(data, GGMLQuantizationType(qtype), tuple(data.shape))

    @classmethod
    def from_packed(cls, qtype: GGMLQuantizationType, rows: np.ndarray, shape: tuple[int, int]) -> GgufTensor:
        """Packed ggml rows ``(rows, row_bytes)`` of type ``qtype`` for a tensor of logical ``shape`` (rows, cols)."""
        qtype = GGMLQuantizationType(qtype)
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        n_rows, cols = (int(s) for s in shape)
        if cols % block:
            raise ValueError(f"{qtype.name} needs a row width that is a multiple of {block}, got {cols}")
        expected = (n_rows, cols // block * block_bytes)
        data = np.ascontiguousarray(rows)
        if data.dtype != np.uint8 or data.shape != expected:
            raise ValueError(f"packed {qtype.name} rows for shape {(n_rows, cols)} must be uint8 {expected}, "
                             f"got {data.dtype} {data.shape}")
        return cls(data, qtype, (n_rows, cols))

    @property
    def is_packed(self) -> bool:
        """True for ggml block rows, False for a float array."""
        return self.data.dtype == np.uint8

    @property
    def stored_type(self) -> GGMLQuantizationType:
        """The ggml type written to the file: 1-D float tensors are always F32."""
        if not self.is_packed and self.data.ndim == 1:
            return GGMLQuantizationType.F32
        return self.qtype

    @property
    def n_elements(self) -> int:
        """Number of logical weights."""
        return int(np.prod(self.shape))

    def payload(self) -> np.ndarray:
        """The array handed to ``GGUFWriter.add_tensor``: float32/float16 values or the uint8 rows."""
        if self.is_packed:
            return self.data
        if self.stored_type == GGMLQuantizationType.F16:
            with np.errstate(over="ignore"):
                half = self.data.astype(np.float16)
            if not np.isfinite(half).all() and np.isfinite(self.data).all():
                raise ValueError("a value exceeds the F16 range (65504); store this tensor as F32")
            return half
        return self.data

    def with_rows_permuted(self, n_head: int) -> GgufTensor:
        """This tensor with its rows in ggml rope order (see :func:`permute_qk_rows`)."""
        return GgufTensor(permute_qk_rows(self.data, n_head), self.qtype, self.shape)


def permute_qk_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the rows of a q or k projection from HF's rotate-half rope to ggml's adjacent-pair rope.

    Within each head of ``hd`` rows, new row ``2*i + j`` is old row ``j*hd/2 + i`` (``i < hd/2``,
    ``j in {0, 1}``); for ``hd = 8`` the order is ``[0, 4, 1, 5, 2, 6, 3, 7]``. Only the first axis moves, so
    it applies equally to float weights, biases and packed ggml rows.
    """
    n = rows.shape[0]
    if n_head < 1 or n % (2 * n_head):
        raise ValueError(f"{n} rows do not split into {n_head} heads of even size")
    half = n // n_head // 2
    return np.ascontiguousarray(rows.reshape(n_head, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape))


def float_tensors(state: Mapping[str, Any],
                  qtype: GGMLQuantizationType = GGMLQuantizationType.F32) -> dict[str, GgufTensor]:
    """Every tensor of a state dict (HF names, numpy or torch values) as a float :class:`GgufTensor`.

    Matrices are stored as ``qtype`` (F32 or F16); vectors always as F32.
    """
    return {name: GgufTensor.from_float(value, qtype) for name, value in state.items()}
