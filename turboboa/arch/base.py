"""The architecture adapter interface and its registry.

All per-architecture knowledge (module names, RoPE convention, how a decoder block is computed) lives in one
``ArchAdapter`` subclass per family. A subclass registers itself for the HF ``config.model_type`` values in its
``MODEL_TYPES`` class attribute (via ``__init_subclass__``), so adding an architecture is one small file imported
from ``turboboa/arch/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

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
    """

    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def group_size(self) -> int:
        """Number of query heads per KV head, r = H / G."""
        return self.n_heads // self.n_kv_heads

    def kv_head_of(self, heads: Tensor) -> Tensor:
        """KV head index g(h) = h // r for a tensor of query head indices."""
        return torch.div(heads, self.group_size, rounding_mode="floor")


class ArchAdapter:
    """Interface that each architecture implements; instances are stateless.

    Methods take the HF ``*ForCausalLM`` model or one of its decoder blocks.
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ()
    LINEAR_GROUPS: ClassVar[list[list[str]]] = []

    def __init_subclass__(cls, **kwargs: object) -> None:
        """Register the subclass for each HF ``model_type`` in its ``MODEL_TYPES``."""
        super().__init_subclass__(**kwargs)
        for model_type in cls.MODEL_TYPES:
            if model_type in _REGISTRY and _REGISTRY[model_type] is not cls:
                raise ValueError(
                    f"model_type {model_type!r} is registered twice: {_REGISTRY[model_type].__name__} "
                    f"and {cls.__name__}"
                )
            _REGISTRY[model_type] = cls

    @classmethod
    def linear_names(cls) -> list[str]:
        """All quantizable linear layer names of a block, flattened from ``LINEAR_GROUPS`` in dependency order."""
        return [name for group in cls.LINEAR_GROUPS for name in group]

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        raise NotImplementedError

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        """The token embedding module."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm applied after the last block."""
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection to vocabulary logits."""
        raise NotImplementedError

    def attention_shape(self, model: nn.Module) -> AttentionShape:
        """Head counts and sizes of the model's self-attention."""
        raise NotImplementedError

    def rotary_cos_sin(
        self, model: nn.Module, seqlen: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """RoPE tables ``(cos, sin)``, each (seqlen, head_dim), for positions 0..seqlen-1."""
        raise NotImplementedError

    def embed(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """Input of block 0, (B, L, D), for token ids (B, L)."""
        raise NotImplementedError

    def block_forward(
        self, block: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, record: Record | None = None
    ) -> Tensor:
        """Compute one decoder block on ``hidden`` (B, L, D) with RoPE tables ``cos, sin`` (L, head_dim).

        When ``record`` is given it is called with ``"attn_input"`` (B, L, D), ``"q_rope"`` (B, H, L, d),
        ``"k_rope"`` (B, G, L, d) and ``"attn_probs"`` (B, H, L, L).
        """
        raise NotImplementedError


def unsupported_model_error(model: nn.Module, model_type: str | None) -> UserError:
    """The error for a model without a registered adapter."""
    supported = ", ".join(sorted(_REGISTRY)) or "(none)"
    return UserError(
        f"{type(model).__name__} (model_type={model_type!r}) is not supported; use a model whose "
        f"model_type is one of: {supported}, or add an adapter in turboboa/arch/"
    )
