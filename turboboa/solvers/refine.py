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

from typing import Any

import torch

from ..formats.base import BlockFormat, GgmlGrid
from ..formats.spec import map_grid
from ..grids import BlockGrid, LinearParams, expand_groups

# A solver's grid (``turboboa.grids.GridSpec`` or a format's ``FormatSpec``); what the refinement uses of it:
# ``linear_params``, ``store``, ``valid``, ``with_params`` and ``decode``.
Grid = Any


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


def format_bases(fmt: type[BlockFormat], codes: torch.Tensor, grid: GgmlGrid) -> torch.Tensor:
    """The bases ``Phi`` of a ggml block's continuous parameters: ``W_hat = sum_t theta_t,k Phi_t`` on block k.

    ``t = 0`` is the super-scale ``d`` (``Phi_0 = sc_g * levels[code]``), ``t = 1`` the super-min ``dmin`` of the
    asymmetric types (``Phi_1 = -m_g``; Q4_1's stored min gives ``+1``). Found from ``group_scale_offset`` at
    unit parameters, so it holds for every format. ``codes``: ``(N, C)``; returns ``(N, T, C)``.
    """
    C = codes.shape[-1]
    G = fmt.group_size
    lv = fmt.levels_on(codes.device)[codes.long()]
    ones, zeros = torch.ones_like(grid.d), torch.zeros_like(grid.d)
    s1, _ = fmt.group_scale_offset(GgmlGrid(d=ones, dmin=None if grid.dmin is None else zeros, sc=grid.sc, m=grid.m))
    bases = [s1.repeat_interleave(G, -1)[:, :C] * lv]
    if grid.dmin is not None:
        _, o1 = fmt.group_scale_offset(GgmlGrid(d=zeros, dmin=ones, sc=grid.sc, m=grid.m))
        bases.append(-o1.repeat_interleave(G, -1)[:, :C])
    return torch.stack(bases, 1)


def _grid_with(fmt: type[BlockFormat], grid: GgmlGrid, theta: torch.Tensor, per: int) -> GgmlGrid:
    """``grid`` with ``d`` (and ``dmin``) replaced by ``theta`` (``(N, T, n_params)``) as the format stores it
    (fp16 for ggml, float32 for LPBQ), each parameter repeated over its ``per`` stored blocks."""
    d = fmt.store_scale(theta[:, 0]).repeat_interleave(per, -1)
    dmin = None if grid.dmin is None else fmt.store_scale(theta[:, 1]).repeat_interleave(per, -1)
    return GgmlGrid(d=d, dmin=dmin, sc=grid.sc, m=grid.m)


def refine_format_scales(
    fmt: type[BlockFormat],
    W_target: torch.Tensor,
    codes: torch.Tensor,
    grid: GgmlGrid,
    H_col: torch.Tensor,
    H_row: torch.Tensor | None,
    iters: int = 1,
) -> tuple[GgmlGrid, torch.Tensor]:
    """TurboBoA's scale refinement for a storage format: with the codes and integer sub-scales fixed,
    ``W_hat`` is linear in each continuous parameter (a ggml block's ``d`` and ``dmin``; LPBQ's per-channel
    ``s_r``, whose span is the whole row), so the optimum of ``tr(H_row (W_hat - W') H_col (.)^T)`` over
    them is a small linear solve per row (coordinate descent over rows when ``H_row`` couples them). The
    result is stored as the format stores it (``fmt.store_scale``: fp16 for ggml) and kept only where it
    lowers the objective and is a valid scale (``fmt.valid_scale``); returns (grid, ``W_hat``).

    ``W_target``/``codes``: ``(B, R, C)``; ``grid`` fields ``(B, R, .)``; ``H_col``: ``(B|1, C, C)``.
    """
    B, R, C = codes.shape
    span = C if fmt.row_scale else fmt.block_size  # columns sharing one continuous parameter
    nb = C // span
    per = span // fmt.block_size  # stored blocks per parameter (LPBQ repeats s_r in every block)
    flat = map_grid(grid, lambda t: t.reshape(B * R, -1))
    Phi = format_bases(fmt, codes.reshape(B * R, C), flat).reshape(B, R, -1, C)  # (B, R, T, C)
    T = Phi.shape[2]
    params = [flat.d] + ([flat.dmin] if flat.dmin is not None else [])
    theta = torch.stack([t[:, ::per] for t in params], 1).reshape(B, R, T, nb)
    H = H_col.expand(B, C, C)
    # Y[b, r, t, k, :] = Phi_t[span k] @ H[span k, :]
    Phi_blocks = Phi.reshape(B, R, T, nb, span)
    Y = torch.einsum("brtks,bksc->brtkc", Phi_blocks, H.reshape(B, nb, span, C))
    M = torch.einsum("brtkls,bruls->brtkul", Y.reshape(B, R, T, nb, nb, span), Phi_blocks)
    M = M.reshape(B, R, T * nb, T * nb)
    Q = fmt.dequantize(codes.reshape(B * R, C), flat).reshape(B, R, C)
    for _ in range(iters if H_row is not None else min(iters, 1)):
        rows = [slice(None)] if H_row is None else [slice(r, r + 1) for r in range(R)]
        for rs in rows:
            D = W_target - Q
            if H_row is None:
                v, Mr = D, M
            else:
                v = torch.einsum("bi,bic->bc", H_row[:, :, rs.start], D).unsqueeze(1)
                Mr = H_row[:, rs.start, rs.start].reshape(B, 1, 1, 1) * M[:, rs]
            b = torch.einsum("brtkc,brc->brtk", Y[:, rs], v).reshape(B, -1, T * nb)
            step = _solve_steps(Mr, b).reshape(B, -1, T, nb)
            new_theta = theta[:, rs] + step
            n = new_theta.shape[1]
            sub = map_grid(flat, lambda t, rs=rs, n=n: t.reshape(B, R, -1)[:, rs].reshape(B * n, -1))
            cand = _grid_with(fmt, sub, new_theta.reshape(B * n, T, nb), per)
            Qn = fmt.dequantize(codes[:, rs].reshape(B * n, C), cand).reshape(B, n, C)
            dQ = Qn - Q[:, rs]
            # change of the objective when only these rows move (exact for the quadratic)
            dQH = dQ @ H
            if H_row is None:
                change = (dQH * dQ).sum(-1) - 2 * (dQH * v).sum(-1)
            else:
                change = H_row[:, rs.start, rs.start, None] * (dQH * dQ).sum(-1) - 2 * (dQH * v).sum(-1)
            stored = [cand.d] + ([cand.dmin] if cand.dmin is not None else [])
            snapped = torch.stack([t[:, ::per] for t in stored], 1).reshape(B, n, T, nb)
            valid = fmt.valid_scale(snapped).reshape(B, n, -1).all(-1)
            keep = (change < 0) & valid  # (B, n)
            Q[:, rs] = torch.where(keep.unsqueeze(-1), Qn, Q[:, rs])
            theta[:, rs] = torch.where(keep[..., None, None], snapped, theta[:, rs])
    d = theta[:, :, 0].repeat_interleave(per, -1)
    dmin = theta[:, :, 1].repeat_interleave(per, -1) if T > 1 else None
    return GgmlGrid(d=d, dmin=dmin, sc=grid.sc, m=grid.m), Q


def param_gram(lin: LinearParams, H_col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y = Phi H_col`` per span (``(B, R, T, n, C')``) and the Gram matrices ``M = Phi H_col Phi^T`` of every
    row (``(B, R, T n, T n)``); a narrower last span is padded with zero columns (``C' = n span``)."""
    B, R, T, C = lin.Phi.shape
    span = lin.span
    n = (C + span - 1) // span
    width = n * span
    Phi = pad_columns(lin.Phi, width).reshape(B, R, T, n, span)
    H = pad_columns(H_col, width, (-1, -2)).expand(B, width, width)
    Y = torch.einsum("brtks,bksc->brtkc", Phi, H.reshape(B, n, span, width))
    M = torch.einsum("brtkls,bruls->brtkul", Y.reshape(B, R, T, n, n, span), Phi)
    return Y, M.reshape(B, R, T * n, T * n)


def param_rhs(lin: LinearParams, Y: torch.Tensor, v: torch.Tensor, H_col: torch.Tensor,
              rows: slice) -> torch.Tensor:
    """``b = Phi H_col v^T`` for the parameters of ``rows`` (``v``: ``(B, n_rows, C)``), ``(B, n_rows, T n)``:
    as ``Phi (H_col v)`` or ``(Phi H_col) v`` (:attr:`LinearParams.residual_first`)."""
    B, _, T, n, width = Y.shape
    if lin.residual_first:
        vH = v @ H_col
        b = pad_columns(lin.Phi[:, rows] * vH.unsqueeze(2), width).reshape(B, -1, T, n, lin.span).sum(-1)
    else:
        b = torch.einsum("brtkc,brc->brtk", Y[:, rows], pad_columns(v, width))
    return b.reshape(B, -1, T * n)


def refine_params(
    spec: Grid,
    W_target: torch.Tensor,
    codes: torch.Tensor,
    grid: BlockGrid,
    H_col: torch.Tensor,
    H_row: torch.Tensor | None,
    group_size: int,
    iters: int = 1,
) -> tuple[BlockGrid, torch.Tensor]:
    """TurboBoA F3(b): refit a grid's continuous parameters with its codes fixed; returns (grid, ``W_hat``).

    ``W_hat`` is linear in them (``spec.linear_params``: ``W_hat[r] = sum_p theta_p Phi_p``; the uniform grid's
    per-(row, group) scales, a ggml block's ``d``/``dmin``, LPBQ's ``s_r``), so the objective
    ``f = sum_b tr(H_row (W_hat - W') H_col (W_hat - W')^T)`` is quadratic in them. Row r's parameters, with
    every other row fixed, move by the exact coordinate step

        theta_r += (H_row[r, r] Phi_r H_col Phi_r^T)^-1  Phi_r H_col (W' - W_hat)^T H_row[:, r]

    (all rows at once, one sweep being the optimum, when ``H_row`` is None: identity). The step is stored as
    the grid stores it (``spec.store``: unrounded for the uniform grid, fp16 for ggml, fp32 for LPBQ). A grid
    that stores it exactly and constrains nothing (``LinearParams.exact_steps``) keeps every step, an exact
    minimization; otherwise a step is kept where the stored value is valid (``spec.valid``) and lowers
    ``f``. So ``f`` never increases.

    ``W_target``/``codes``: ``(B, R, C)``; ``grid``: ``(B, R, .)`` fields; ``H_col``: ``(B|1, C, C)``;
    ``H_row``: ``(B, R, R)`` or None.
    """
    B, R, C = codes.shape
    lin = spec.linear_params(codes, grid, group_size)
    T, n = lin.theta.shape[2:]
    theta = lin.theta.clone()
    Y, M = param_gram(lin, H_col)
    H = H_col.expand(B, C, C)
    Q = spec.decode(codes, grid, group_size)
    for _ in range(iters if H_row is not None else min(iters, 1)):
        for rs in [slice(None)] if H_row is None else [slice(r, r + 1) for r in range(R)]:
            D = W_target - Q
            if H_row is None:
                v, Mr, h_rr = D, M, 1.0
            else:
                v = torch.einsum("bi,bic->bc", H_row[:, :, rs.start], D).unsqueeze(1)
                h_rr = H_row[:, rs.start, rs.start].reshape(B, 1)
                Mr = h_rr.reshape(B, 1, 1, 1) * M[:, rs]
            step = _solve_steps(Mr, param_rhs(lin, Y, v, H_col, rs)).reshape(B, -1, T, n)
            new = theta[:, rs] + step
            stored = spec.store(new)
            Qn = spec.decode(codes[:, rs], spec.with_params(grid.rows(rs), stored, group_size), group_size)
            keep = torch.ones(Qn.shape[:2], dtype=torch.bool, device=Qn.device)  # (B, n_rows)
            if not lin.exact_steps:
                dQ = Qn - Q[:, rs]
                dQH = dQ @ H
                change = h_rr * (dQH * dQ).sum(-1) - 2 * (dQH * v).sum(-1)  # f's change when these rows move
                keep = spec.valid(stored).flatten(2).all(-1) & (change < 0)
            Q[:, rs] = torch.where(keep.unsqueeze(-1), Qn, Q[:, rs])
            theta[:, rs] = torch.where(keep[..., None, None], stored, theta[:, rs])
    return spec.with_params(grid, theta, group_size), Q
