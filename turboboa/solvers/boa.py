"""BoA and TurboBoA's row-wise quantization under a Kronecker-factored attention Hessian.

For one head the objective is ``tr(H_row (Q - W) H_col (Q - W)^T)`` (``W`` is ``d_h x d_in``). Rows are taken
in blocks of N (N = 1 is BoA, N = 16 TurboBoA's F1); every head is processed in parallel. The rows of a block
are quantized by GPTQ over their columns (with ``U_col = chol(H_col^-1)^T``), then every later row is moved to
its least-squares optimum given the quantized block (BoA Proposition 3.1, in closed form for N rows):

    W[rest, :] -= U_row[blk, rest]^T  U_row[blk, blk]^-T  (W[blk, :] - Q[blk, :])

with ``U_row = chol(H_row^-1)^T``. Because the Hessian is a Kronecker product, ``H_col`` cancels from this rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats.spec import cat_grids, gather_grid_rows
from .gptq import ColumnResult, ColumnSolver, permute_square
from .linalg import cholesky_inverse_upper


@dataclass(frozen=True)
class RowOptions:
    """``rows``: block size N; ``adaptive_grid``: refit each block's grids from the compensated weights (F3a);
    otherwise every row's grid is fixed from the original weights (BoA)."""

    rows: int = 1
    adaptive_grid: bool = False
    act_order_row: bool = False


def row_compensation(U_row: torch.Tensor, blk: slice, rest: slice, delta: torch.Tensor) -> torch.Tensor:
    """Update of the later rows given the change ``delta = W[blk] - Q[blk]`` (``(B, N, C)``) of a block.

    Returns ``U_row[blk, rest]^T U_row[blk, blk]^-T delta`` (``(B, len(rest), C)``), to be subtracted from
    ``W[rest]``. For N = 1 this is ``(U_row[j, i] / U_row[j, j]) * delta_j``.
    """
    U_bb = U_row[:, blk, blk]
    Y = torch.linalg.solve_triangular(U_bb.transpose(-1, -2), delta, upper=False)
    return U_row[:, blk, rest].transpose(-1, -2) @ Y


def gather_rows(W: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Rows of each batch entry reordered: ``W[b, perm[b], :]``."""
    return torch.gather(W, 1, perm.unsqueeze(-1).expand_as(W))


def boa_quantize(
    W: torch.Tensor,
    columns: ColumnSolver,
    H_row: torch.Tensor | None,
    options: RowOptions,
    percdamp: float = 0.01,
) -> ColumnResult:
    """Quantize heads ``W`` (``(B, d_h, C)``) row block by row block; ``H_row`` is ``(B, d_h, d_h)`` or None.

    With ``H_row`` None (identity row Hessian) the rows are independent: no compensation, one block of all rows.
    ``columns`` holds the column Hessian (shared ``(1, C, C)`` or per head ``(B, C, C)``) and the grid spec.
    """
    W = columns.zero_dead(W.to(columns.H.dtype))
    B, d, C = W.shape
    perm = None
    U_row = None
    if H_row is not None:
        H_row = H_row.to(W.dtype)
        if options.act_order_row:
            perm = torch.argsort(torch.diagonal(H_row, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)
            W = gather_rows(W, perm)
            H_row = permute_square(H_row, perm)
        U_row, _ = cholesky_inverse_upper(H_row, percdamp)
    N = d if H_row is None else max(1, min(options.rows, d))
    static_all = None if options.adaptive_grid else columns.static_params(W)
    Q = torch.empty_like(W)
    codes = torch.empty_like(W)
    n_groups = (C + columns.group_size - 1) // columns.group_size if columns.group_size > 0 else 1
    scale = W.new_empty(B, d, n_groups)
    zero = W.new_empty(B, d, n_groups)
    stored_parts = []
    for b0 in range(0, d, N):
        blk = slice(b0, min(b0 + N, d))
        Wb = W[:, blk]
        static = None if static_all is None else static_all.rows(blk)
        res = columns.solve(Wb, static)
        Q[:, blk], codes[:, blk], scale[:, blk], zero[:, blk] = res.Q, res.codes, res.scale, res.zero
        stored_parts.append(res.stored)
        if U_row is not None and blk.stop < d:
            rest = slice(blk.stop, d)
            W[:, rest] -= row_compensation(U_row, blk, rest, Wb - res.Q)
    stored = None if stored_parts[0] is None else cat_grids(stored_parts, dim=1)
    if perm is not None:
        inv = torch.argsort(perm, dim=-1)
        Q, codes, scale, zero = (gather_rows(t, inv) for t in (Q, codes, scale, zero))
        stored = None if stored is None else gather_grid_rows(stored, inv)
    return ColumnResult(Q, codes, scale, zero, stored)

