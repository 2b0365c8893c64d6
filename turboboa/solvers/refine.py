"""TurboBoA F3(b): closed-form refinement of a grid's continuous parameters once the integer codes are fixed.

Objective ``f = sum_heads tr(H_row D H_col D^T)`` with ``D = W_hat - W'`` (``W'`` the target, which carries
TurboBoA's F2 shift). With the codes (and a format's integer sub-scales) fixed, every grid's ``W_hat`` is linear
in its continuous parameters (``turboboa.grids.LinearParams``): on span k of row r

    W_hat[r, c] = sum_t theta[r, t, k] * Phi[r, t, c]

* uniform grid: one scale per (row, group), ``Phi = Z - z0`` on the group's columns (the whole row per channel);
* ggml block: the fp16 super-scale ``d`` (``Phi = sc_g * levels[code]``) and super-min ``dmin`` (``Phi = -m_g``);
* LPBQ: the per-channel ``s_r`` (``Phi = k_b * q``, span the whole row).

Let ``Phi_r`` be the ``n_params x C`` matrix of row r's bases. Minimizing ``f`` over row r's parameters with
every other row fixed gives the exact coordinate step

    theta_r += (H_row[r, r] Phi_r H_col Phi_r^T)^-1  Phi_r H_col (W' - W_hat)^T H_row[:, r]

(all parameters of a row jointly; the research code does not refine group-wise grids). Each step is an exact
minimization, so ``f`` never increases; a grid that rounds its stored parameters (fp16) or constrains them
(LPBQ's ``s_r > 0``) keeps a step only where it still lowers ``f``. With an identity row Hessian the rows are
independent and one step over all rows at once is the optimum.
"""

from __future__ import annotations

import torch

from ..grids import BlockGrid, LinearParams
from .gptq import Grid


def pad_columns(t: torch.Tensor, width: int, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
    """Zero-pad the given dims of ``t`` to ``width`` (a ragged last group becomes a full group of zeros)."""
    for d in dims:
        extra = width - t.shape[d]
        if extra:
            shape = list(t.shape)
            shape[d] = extra
            t = torch.cat([t, t.new_zeros(shape)], dim=d)
    return t


def _solve_steps(M: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``M delta = b`` per row; a parameter whose basis is zero (a group whose codes all sit at the zero
    point, an all-zero block) keeps its value."""
    empty = torch.diagonal(M, dim1=-2, dim2=-1) <= 0
    M = M.clone()
    torch.diagonal(M, dim1=-2, dim2=-1)[empty] = 1.0
    b = b.masked_fill(empty, 0.0)
    delta = torch.linalg.solve(M, b.unsqueeze(-1)).squeeze(-1)
    return torch.where(torch.isfinite(delta), delta, torch.zeros_like(delta))


def kron_objective(W_target: torch.Tensor, Q: torch.Tensor, H_col: torch.Tensor, H_row: torch.Tensor | None) -> torch.Tensor:
    """``sum_b tr(H_row D H_col D^T)`` with ``D = Q - W'`` (identity ``H_row`` when None)."""
    D = Q - W_target
    DH = D @ H_col
    if H_row is None:
        return (DH * D).sum()
    return (H_row * (DH @ D.transpose(-1, -2))).sum()


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
