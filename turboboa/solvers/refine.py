"""TurboBoA F3(b): closed-form refinement of the scales once the integer codes are fixed.

Objective ``f = sum_heads tr(H_row D H_col D^T)`` with ``D = Q - W'`` and ``Q[r, c] = s[r, g(c)] * Zc[r, c]``
(``Zc = Z - z0``; ``W'`` is the target, which carries TurboBoA's F2 shift). For row r, let ``E_r`` be the
``n_groups x C`` matrix holding row r's ``Zc`` on each group's columns. Minimizing ``f`` over the scales of row
r with everything else fixed gives the exact coordinate step

    s_r += (H_row[r, r] E_r H_col E_r^T)^-1  E_r H_col (W' - Q)^T H_row[:, r]

which for per-channel grids is the scalar rule ``s_r += Zc_r H_col (W' - Q)^T H_row[:, r] /
(H_row[r, r] Zc_r H_col Zc_r^T)``; with groups, all groups of a row are solved jointly (the research code
does not refine group-wise grids). Each step is an exact minimization, so ``f`` never increases. With an
identity row Hessian the rows are independent and one step over all rows at once is the optimum.
"""

from __future__ import annotations

import torch

from ..grids import expand_groups


def pad_columns(t: torch.Tensor, width: int, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Zero-pad the given dims of ``t`` to ``width`` (a ragged last group becomes a full group of zeros)."""
    for d in dims:
        extra = width - t.shape[d]
        if extra:
            shape = list(t.shape)
            shape[d] = extra
            t = torch.cat([t, t.new_zeros(shape)], dim=d)
    return t


def group_gram(Zc: torch.Tensor, H_col: torch.Tensor, group_size: int) -> torch.Tensor:
    """``M[b, r] = E_r H_col E_r^T`` for every row: ``(B, R, n_groups, n_groups)``."""
    B, R, C = Zc.shape
    G = group_size if group_size > 0 else C
    ng = (C + G - 1) // G
    Zg = pad_columns(Zc, ng * G).reshape(B, R, ng, G)
    Hb = pad_columns(H_col, ng * G, (-1, -2)).reshape(H_col.shape[0], ng, G, ng, G)
    return torch.einsum("brgi,bgihj,brhj->brgh", Zg, Hb, Zg)


def _solve_steps(M: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``M delta = b`` per row; groups whose codes are all at the zero point keep their scale."""
    empty = torch.diagonal(M, dim1=-2, dim2=-1) <= 0
    M = M.clone()
    torch.diagonal(M, dim1=-2, dim2=-1)[empty] = 1.0
    b = b.masked_fill(empty, 0.0)
    delta = torch.linalg.solve(M, b.unsqueeze(-1)).squeeze(-1)
    return torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))


def refine_scales(
    W_target: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    H_col: torch.Tensor,
    H_row: torch.Tensor | None,
    group_size: int,
    iters: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine ``scale`` (``(B, R, n_groups)``) by ``iters`` coordinate-descent sweeps; returns (scale, Q).

    ``W_target``/``codes``: ``(B, R, C)``; ``H_col``: ``(B|1, C, C)``; ``H_row``: ``(B, R, R)`` or None.
    """
    C = codes.shape[-1]
    scale = scale.clone()
    Zc = codes - expand_groups(zero, group_size, C)
    M = group_gram(Zc, H_col, group_size)
    B, R, ng = scale.shape
    G = group_size if group_size > 0 else C

    def current_q() -> torch.Tensor:
        return expand_groups(scale, group_size, C) * Zc

    Q = current_q()
    if H_row is None:
        if iters > 0:  # rows are independent: one step over all rows is already the optimum
            V = (W_target - Q) @ H_col  # rows of (W' - Q) H_col
            b = pad_columns(Zc * V, ng * G).reshape(B, R, ng, G).sum(-1)
            scale += _solve_steps(M, b)
            Q = current_q()
        return scale, Q
    for _ in range(iters):
        for r in range(R):
            D = W_target - Q
            v = torch.einsum("bi,bic->bc", H_row[:, :, r], D)  # (W' - Q)^T H_row[:, r]
            vH = (v.unsqueeze(1) @ H_col).squeeze(1)
            b = pad_columns(Zc[:, r] * vH, ng * G).reshape(B, ng, G).sum(-1)
            step = _solve_steps(H_row[:, r, r].reshape(B, 1, 1) * M[:, r], b)
            scale[:, r] += step
            Q[:, r] = expand_groups(scale[:, r], group_size, C) * Zc[:, r]
    return scale, Q


def kron_objective(W_target: torch.Tensor, Q: torch.Tensor, H_col: torch.Tensor, H_row: torch.Tensor | None) -> torch.Tensor:
    """``sum_b tr(H_row D H_col D^T)`` with ``D = Q - W'`` (identity ``H_row`` when None)."""
    D = Q - W_target
    DH = D @ H_col
    if H_row is None:
        return (DH * D).sum()
    return (H_row * (DH @ D.transpose(-1, -2))).sum()
