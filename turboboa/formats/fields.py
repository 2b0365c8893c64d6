"""The fields a row of ggml (or LPBQ) blocks stores besides its codes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GgmlGrid:
    """The values a row of ggml blocks stores, apart from the codes (a separate ``(rows, cols)`` tensor).

    * ``d``: ``(rows, n_blocks)`` float32, fp16-representable: the block scale (simple types) or super-scale
      (k-quants). Signed where the type allows (every type; llama.cpp makes it negative only for Q3_K/Q6_K).
    * ``dmin``: ``(rows, n_blocks)`` float32, fp16-representable, or ``None`` for symmetric types. For
      Q2_K/Q4_K/Q5_K it is the super-min (``offset_g = dmin * m_g``); for Q4_1 it is the block's stored fp16
      min ``m`` (``w = d*q + m``, so ``offset = -dmin``).
    * ``sc``: ``(rows, n_groups)`` int32 sub-scales of the k-quants (Q2_K 0..15, Q3_K -32..31 = stored 6-bit
      value minus 32, Q4_K/Q5_K 0..63, Q6_K -128..127), ``None`` for the 32-blocks.
    * ``m``: ``(rows, n_groups)`` int32 sub-mins of Q2_K (0..15) and Q4_K/Q5_K (0..63), else ``None``.

    LPBQ (:mod:`turboboa.formats.lpbq`) uses the same fields: ``d`` its float32 per-channel scale ``s_r``
    repeated in every block of the row, ``sc`` the integer block multipliers ``k`` (1..16).
    """

    d: torch.Tensor
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    m: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> GgmlGrid:
        """The same grid with every tensor moved to ``device``."""
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return GgmlGrid(d=self.d.to(device), dmin=mv(self.dmin), sc=mv(self.sc), m=mv(self.m))

    def equal(self, other: GgmlGrid) -> bool:
        """Field-by-field exact equality (``None`` equals only ``None``; ``-0.0 == 0.0``)."""
        for a, b in ((self.d, other.d), (self.dmin, other.dmin), (self.sc, other.sc), (self.m, other.m)):
            if (a is None) != (b is None):
                return False
            if a is not None and not torch.equal(a.cpu(), b.cpu()):
                return False
        return True
