"""How a model's sequences are split into forward chunks, and how its modules are named."""

from __future__ import annotations

from torch import nn

# attention probabilities of one chunk are held as (B, H, L, L) float32: keep that under this many elements
MAX_ATTENTION_ELEMENTS = 1 << 25


def chunk_size(n: int, seqlen: int, heads: int) -> int:
    """Sequences per chunk of ``n`` with ``heads`` attention heads: the largest ``B <= n`` with
    ``B * heads * seqlen^2 <= MAX_ATTENTION_ELEMENTS`` (at least 1). These chunks are also the shards the ranks of
    a torchrun run share (:mod:`turboboa.distributed`)."""
    return max(1, min(n, MAX_ATTENTION_ELEMENTS // max(1, heads * seqlen * seqlen)))


def module_name(model: nn.Module, module: nn.Module) -> str:
    """The dotted name of ``module`` inside ``model``."""
    for name, m in model.named_modules():
        if m is module:
            return name
    raise ValueError("module is not part of the model")
