"""The architecture adapter interface and its registry.

All per-family knowledge lives in one ``ArchAdapter`` subclass per family: its module names by role
(:class:`~turboboa.arch.layout.Layout`), its attention layout (heads, KV groups, RoPE or not, sliding
windows), how a decoder block is computed, whether its residual stream can be rotated or padded, the
llama.cpp architecture it exports to (or why none), and the decoder the ONNX graph computes
(:class:`~turboboa.arch.decoder.DecoderSpec`). A subclass registers itself for the HF ``config.model_type``
values in its ``MODEL_TYPES`` (via ``__init_subclass__``), so adding a family is one file imported from
``turboboa/arch/__init__.py`` and its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from turboboa.arch.decoder import DecoderSpec
from turboboa.arch.layout import Layout
from turboboa.errors import UserError

Record = Callable[[str, Tensor], None]
"""Callback ``record(name, tensor)`` that ``block_forward`` calls with intermediate attention tensors."""

_REGISTRY: dict[str, type[ArchAdapter]] = {}


def registered_adapters() -> dict[str, type[ArchAdapter]]:
    """Return a copy of the ``model_type -> adapter class`` registry."""
    return dict(_REGISTRY)


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of a block's self-attention.

    Query head ``h`` reads KV head ``h // group_size`` with ``group_size = n_heads // n_kv_heads`` (HF repeat_kv).
    ``rope``: queries and keys are rotated by position (RoPE); without it the rotation is the identity.
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    rope: bool = True

    @property
    def group_size(self) -> int:
        """Number of query heads per KV head, r = H / G."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, heads: Tensor) -> Tensor:
        """KV head index g(h) = h // r for a tensor of query head indices."""
        return torch.div(heads, self.group_size, rounding_mode="floor")


@dataclass(frozen=True)
class GgufArch:
    """The llama.cpp architecture a family exports to: ``name`` (``general.architecture``); ``permute_qk``:
    llama.cpp applies adjacent-pair ("normal") rope, so q/k rows are permuted from HF's rotate-half order;
    ``qkv_bias``: the q/k/v biases are required tensors; ``norm_offset``: llama.cpp's norm weight is the HF
    weight plus this (Gemma's ``(1 + w)`` RMSNorm is stored as ``1 + w``); ``sliding_window``: llama.cpp reads
    the window of the sliding layers from ``{arch}.attention.sliding_window``; ``kernel_tol``: the largest
    ``|PPL_llama.cpp / PPL_fake-quant - 1|`` of a quantized file that ``turboboa check`` passes. llama.cpp's
    quantized dot products round each activation row to 8-bit blocks (``Q8_0``: 32 values, ``Q8_K``: 256)
    before multiplying, so a file computes the fake-quant model's function up to that rounding, whose effect on
    the PPL depends on the family's activations."""

    name: str
    permute_qk: bool
    qkv_bias: bool
    norm_offset: float = 0.0
    sliding_window: bool = False
    kernel_tol: float = 0.01  # default models' files: gaps +0.57% to +0.84% (bench/results/gguf-vs-llamacpp.md)


class ArchAdapter:
    """Interface that each family implements; instances are stateless.

    Methods take the HF ``*ForCausalLM`` model or one of its decoder blocks. Class attributes a family sets:
    ``MODEL_TYPES``, ``NAME`` (for messages), ``LAYOUT``; ``ROTATION_REFUSAL`` / ``PADDING_REFUSAL``: why the residual stream cannot
    be rotated / padded without changing the function (None: it can); ``GGUF``: the llama.cpp
    architecture, or the reason there is none. :meth:`decoder_spec` gives the ONNX graph's decoder, or refuses
    in one line what the graph does not compute.
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    NAME: ClassVar[str] = ""
    LAYOUT: ClassVar[Layout]
    LINEAR_GROUPS: ClassVar[list[list[str]]] = []
    ROTATION_REFUSAL: ClassVar[str | None] = None
    PADDING_REFUSAL: ClassVar[str | None] = None
    GGUF: ClassVar[GgufArch | str] = "the family has no llama.cpp architecture"

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Register the subclass for each HF ``model_type`` in its ``MODEL_TYPES``; its ``LINEAR_GROUPS``
        come from its layout's roles."""
        super().__init_subclass__(**kwargs)
        if "LAYOUT" in cls.__dict__:
            cls.LINEAR_GROUPS = cls.LAYOUT.roles.groups()
        for model_type in cls.__dict__.get("MODEL_TYPES", ()):
            if model_type in _REGISTRY and _REGISTRY[model_type] is not cls:
                raise ValueError(
                    f"model_type {model_type!r} is registered twice: {_REGISTRY[model_type].__name__} "
                    f"and {cls.__name__}"
                )
            _REGISTRY[model_type] = cls

    # --- names -----------------------------------------------------------------------------------------

    @classmethod
    def linear_names(cls) -> list[str]:
        """All quantizable linear layer names of a block, flattened from ``LINEAR_GROUPS`` in dependency order."""
        return [name for group in cls.LINEAR_GROUPS for name in group]

    @classmethod
    def role_of(cls, name: str) -> str | None:
        """The role of a block-relative linear layer name (``q`` ... ``down``), None for another name."""
        return cls.LAYOUT.roles.role_of(name)

    def check_config(self, hf_config: Any) -> None:
        """A one-line UserError for a variant of the family this adapter does not compute (default: none)."""

    def _module(self, model: nn.Module, name: str) -> nn.Module:
        """``model``'s submodule ``name``; a UserError naming it when the model has none."""
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{type(model).__name__} has no module {name}; pass the *ForCausalLM model "
                            f"itself (loaded with AutoModelForCausalLM)") from None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return self._module(model, self.LAYOUT.blocks)

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        """The token embedding module."""
        return self._module(model, self.LAYOUT.embedding)

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last block."""
        return self._module(model, self.LAYOUT.final_norm)

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection to vocabulary logits."""
        return self._module(model, self.LAYOUT.head)

    def linear(self, block: nn.Module, role: str) -> nn.Module:
        """Block ``block``'s linear layer of ``role``."""
        return block.get_submodule(self.LAYOUT.roles.name(role))

    def attention(self, block: nn.Module) -> nn.Module:
        """Block ``block``'s self-attention module."""
        return block.get_submodule(self.LAYOUT.attention)

    def norm(self, block: nn.Module, role: str) -> nn.Module:
        """Block ``block``'s norm of ``role`` (``attention_norm`` or ``mlp_norm``)."""
        return block.get_submodule(self.LAYOUT.block_module(role))

    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        """The ``eps`` of an RMSNorm module (``eps`` or ``variance_epsilon``, as the HF class names it)."""
        for key in ("eps", "variance_epsilon"):
            if hasattr(norm, key):
                return float(getattr(norm, key))
        raise UserError(f"{type(norm).__name__} has no eps; this family's norms are not RMSNorms")

    # --- attention layout ------------------------------------------------------------------------------

    def attention_shape(self, model: nn.Module) -> AttentionShape:
        """Head counts and sizes of the model's self-attention."""
        raise NotImplementedError

    @staticmethod
    def sliding_window(block: nn.Module) -> int | None:
        """Attention window of this block in tokens, None for full causal attention."""
        return None

    def rotary_cos_sin(
        self, model: nn.Module, seqlen: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """RoPE tables ``(cos, sin)``, each (seqlen, head_dim), for positions 0..seqlen-1; ``(None, None)``
        for a family without RoPE (its rotation ``R_t`` is the identity)."""
        raise NotImplementedError

    def rope_tables(self, hf_config: Any, positions: int, table: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The RoPE tables the graphs use, float32 ``(positions, head_dim)`` each, for a config: the family's
        table number ``table`` (:attr:`DecoderSpec.rope_table`; one table unless the family has several)."""
        raise UserError(f"{type(self).__name__} computes no rotary position embedding")

    # --- computation -----------------------------------------------------------------------------------

    def embed(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """Input of block 0, (B, L, D), for token ids (B, L)."""
        raise NotImplementedError

    def block_forward(
        self, block: nn.Module, hidden: Tensor, cos: Tensor | None, sin: Tensor | None,
        record: Record | None = None,
    ) -> Tensor:
        """Compute one decoder block on ``hidden`` (B, L, D) with RoPE tables ``cos, sin`` (L, head_dim), or
        None without RoPE.

        When ``record`` is given it is called with ``"attn_input"`` (B, L, D), ``"q_rope"`` (B, H, L, d),
        ``"k_rope"`` (B, G, L, d) (the queries and keys after RoPE, the projections themselves without it,
        both before the softmax scale; after the per-head q/k norms where the family has them) and
        ``"attn_probs"`` (B, H, L, L); a family with per-head q/k norms also records their gains ``"q_gain"``,
        ``"k_gain"`` (d,) for the row Hessians.
        """
        raise NotImplementedError

    # --- exports ---------------------------------------------------------------------------------------

    def gguf(self) -> GgufArch:
        """The llama.cpp architecture of the family; a one-line UserError saying why there is none."""
        if isinstance(self.GGUF, GgufArch):
            return self.GGUF
        raise UserError(f"GGUF export of {self.name()} models is not possible: {self.GGUF}; export with --to onnx")

    def check_gguf_config(self, hf_config: Any) -> None:
        """A one-line UserError for a config llama.cpp's architecture would compute differently (default: none)."""

    @staticmethod
    def config_window(hf_config: Any) -> int | None:
        """The sliding window some layer of ``hf_config`` applies, None for full causal attention everywhere."""
        return None

    def decoder_spec(self, hf_config: Any) -> DecoderSpec:
        """The decoder the ONNX graph computes for ``hf_config``; a UserError for what the graph cannot."""
        raise UserError(f"ONNX export of {self.name()} models is not implemented")

    @classmethod
    def name(cls) -> str:
        """The family's name for messages: ``NAME``, else its model types."""
        return cls.NAME or "/".join(cls.MODEL_TYPES)


def unsupported_model_error(model: object, model_type: str | None) -> UserError:
    """The error for a model (or config) without a registered adapter."""
    supported = ", ".join(sorted(_REGISTRY)) or "(none)"
    return UserError(
        f"{type(model).__name__} (model_type={model_type!r}) is not supported; use a model whose "
        f"model_type is one of: {supported}, or add an adapter in turboboa/arch/"
    )


def adapter_class(model_type: object, owner: object) -> type[ArchAdapter]:
    """The adapter class registered for ``model_type``; ``owner`` (the model or config) names the error."""
    cls = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if cls is None:
        raise unsupported_model_error(owner, model_type if isinstance(model_type, str) else None)
    return cls
