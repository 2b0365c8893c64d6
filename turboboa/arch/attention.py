"""Causal softmax attention of one block, shared by the families' ``block_forward``.

Query head ``h`` reads KV head ``g(h) = h // r`` (``r = H / G`` query heads per KV head, ``r = 1`` without
grouped-query attention): ``A_h = softmax(scale * q_h k_{g(h)}^T + M)``, ``o_h = A_h v_{g(h)}``, with ``M``
the causal mask (``-inf`` where query ``i`` may not attend key ``j``), in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(seqlen: int, device: torch.device, sliding_window: int | None = None) -> Tensor:
    """Boolean (L, L) mask, True where query i may NOT attend key j: j > i, or j <= i - window if windowed."""
    ones = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
    masked = torch.triu(ones, diagonal=1)
    if sliding_window is not None and sliding_window < seqlen:
        masked |= torch.tril(ones, diagonal=-sliding_window)
    return masked


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(o, A)`` for float32 ``q`` (B, H, L, d), ``k``, ``v`` (B, G, L, d) and the boolean ``mask`` (L, L):
    ``o`` (B, H, L, d), ``A`` (B, G, r, L, L). The query heads of group ``g`` are rows (B, G, r, L, d), so the
    KV heads are never repeated in memory."""
    batch, n_heads, seqlen, head_dim = q.shape
    n_kv = k.shape[1]
    q_grouped = q.view(batch, n_kv, n_heads // n_kv, seqlen, head_dim)
    scores = torch.matmul(q_grouped, k.unsqueeze(2).transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    out = torch.matmul(probs, v.unsqueeze(2)).view(batch, n_heads, seqlen, head_dim)
    return out, probs
