"""GPTQ (Frantar et al., 2023): column-by-column rounding with optimal compensation of the later columns.

Objective per layer: ``||(Q - W) X||_F^2`` with ``H = 2 X X^T``. With ``U = chol(H^-1)^T`` (upper), column j is
rounded, ``e = (w_j - q_j) / U[j, j]`` and the later columns are updated ``W[:, j+1:] -= e U[j, j+1:]``.
Lazy batch updates apply the accumulated update of a block of B columns with one matrix product.

Everything here is batched: ``W`` is ``(B, R, C)`` (B independent problems, e.g. attention heads, of R rows and
C columns) and the Hessian factor ``U`` is ``(B, C, C)`` or ``(1, C, C)`` when shared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..formats.spec import cat_grids
from ..grids import BlockGrid, expand_groups
from .linalg import as_float, cholesky_inverse_upper, dead_columns

# A solver's grid: the uniform integer grid or a storage format (``turboboa.formats.spec.FormatSpec``, LPBQ's
# ``LpbqSpec``, the i-quants' ``CodebookSpec``); all offer ``for_rows`` (row-level parameters, fixed at a row's
# first column), ``fit_width``, ``fit``, ``round`` and ``value``; for TurboBoA's refinement ``linear_params``,
# ``store``, ``valid``, ``with_params`` and ``decode``; and ``linear_fields`` for the ``QuantizedLinear``.
Grid = Any


@dataclass
class ColumnResult:
    """Quantized weights ``Q`` (float), integer ``codes``, per-(row, group) ``scale`` and ``zero`` (the offset
    of a storage format) and, for a storage format, the stored grid fields (``stored``, a ``GgmlGrid`` with
    ``(B, R, .)`` fields)."""

    Q: torch.Tensor  # (B, R, C)
    codes: torch.Tensor  # (B, R, C)
    scale: torch.Tensor  # (B, R, n_groups)
    zero: torch.Tensor  # (B, R, n_groups)
    stored: Any = None


def fit_groups(W: torch.Tensor, spec: Grid, group_size: int, H: torch.Tensor | None) -> BlockGrid:
    """Grids of every (row, group) of ``W`` (``(B, R, C)``) from the weights as given, one fit per
    ``spec.fit_width`` columns (after the row-level parameters, ``spec.for_rows``): scale and offset
    ``(B, R, n_groups)``, plus the stored fields of a format."""
    C = W.shape[-1]
    spec = spec.for_rows(W, H)
    fw = spec.fit_width(group_size, C)
    parts = []
    for g0 in range(0, C, fw):
        Hb = None if H is None else H[:, g0 : g0 + fw, g0 : g0 + fw]
        parts.append(spec.fit(W[..., g0 : g0 + fw], Hb))
    return join_block_grids(parts)


def join_block_grids(parts: list[BlockGrid]) -> BlockGrid:
    """Block grids of consecutive column ranges as one."""
    stored = None if parts[0].stored is None else cat_grids([p.stored for p in parts])
    return BlockGrid(torch.cat([p.scale for p in parts], -1), torch.cat([p.offset for p in parts], -1), stored)


def aligned_block_size(block_size: int, group_size: int) -> int:
    """A lazy-update block size such that every group starts inside a block with all its columns current."""
    if group_size <= 0:
        return block_size
    if group_size <= block_size:
        return (block_size // group_size) * group_size
    return block_size if group_size % block_size == 0 else group_size


def gptq_columns(
    W: torch.Tensor,
    U: torch.Tensor,
    spec: Grid,
    group_size: int,
    H: torch.Tensor | None = None,
    col_params: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_size: int = 128,
) -> ColumnResult:
    """GPTQ's column loop with lazy batch updates on ``W`` (``(B, R, C)``), columns in the given order.

    ``U`` is ``chol(H^-1)^T`` for the same column order. Grids: with ``col_params`` (per-column scale and
    offset, ``(B, R, C)``) they are fixed ("static"); otherwise the grid of each ``spec.fit_width`` columns (a
    group, the whole row per channel, or a ggml block) is fit from the current, already compensated weights
    when its first column is reached, after the row-level parameters (``spec.for_rows``: LPBQ's per-channel
    scale) are fixed from the whole rows at column 0. ``H`` (same order as ``U``) weights the range search.
    """
    W = W.clone()
    B, R, C = W.shape
    G = group_size if group_size > 0 else C
    n_groups = (C + G - 1) // G
    fw = spec.fit_width(group_size, C)
    v, span = spec.vector_width, spec.span
    bs = aligned_block_size(block_size, fw if fw < C else group_size)
    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    scale = W.new_zeros(B, R, n_groups)
    zero = W.new_zeros(B, R, n_groups)
    stored_parts = []
    static = col_params is not None
    for i1 in range(0, C, bs):
        i2 = min(i1 + bs, C)
        W1 = W[..., i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(0, i2 - i1, v):
            j = i1 + i
            if static:
                s, z = col_params[0][..., j], col_params[1][..., j]
            else:
                if j == 0:
                    spec = spec.for_rows(W, H)
                if j % fw == 0:
                    current = torch.cat([W1[..., i:], W[..., i2:]], dim=-1)[..., :fw]
                    Hb = None if H is None else H[:, j : j + fw, j : j + fw]
                    bg = spec.fit(current, Hb)
                    g0 = j // G
                    scale[..., g0 : g0 + bg.scale.shape[-1]] = bg.scale
                    zero[..., g0 : g0 + bg.scale.shape[-1]] = bg.offset
                    if bg.stored is not None:
                        stored_parts.append(bg.stored)
                s, z = scale[..., j // G], zero[..., j // G]
            if v == 1:
                w = W1[..., i]
                c = spec.round(w, s, z)
                q = spec.value(c, s, z)
                codes[..., j] = c
                Q[..., j] = q
                err = (w - q) / U1[:, i, i].unsqueeze(-1)
                W1[..., i:] -= err.unsqueeze(-1) * U1[:, i, i:].unsqueeze(1)
                Err1[..., i] = err
                continue
            J = slice(i, i + v)
            c, q, err = _vector_step(spec, W1[..., J], s, U1[:, J, J], codes[..., j - j % span : j])
            codes[..., j : j + v] = c
            Q[..., j : j + v] = q
            W1[..., i + v :] -= err @ U1[:, J, i + v :]
            Err1[..., J] = err
        if i2 < C:
            W[..., i2:] -= Err1 @ U[:, i1:i2, i2:]
    stored = None
    if stored_parts:
        stored = cat_grids(stored_parts)
    return ColumnResult(Q, codes, scale, zero, stored)


def _vector_step(spec: Grid, w: torch.Tensor, s: torch.Tensor, U_JJ: torch.Tensor,
                 prior: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One codeword of every row: ``w`` (``(B, R, v)``) at scale ``s`` (``(B, R)``) chosen under the metric
    ``M = A A^T``, ``A = U_JJ^-1`` (``||(w - q) A||^2``: the loss with every later column compensated);
    returns (codes, ``q``, ``E = (w - q) A``), the later columns then moving by ``-E U_J,later``."""
    B, R, v = w.shape
    eye = torch.eye(v, dtype=U_JJ.dtype, device=U_JJ.device)
    A = torch.linalg.solve_triangular(U_JJ, eye.expand_as(U_JJ), upper=True)
    M = A @ A.transpose(-1, -2)
    M = M if M.shape[0] == 1 else M.unsqueeze(1).expand(B, R, v, v).reshape(B * R, v, v)
    c = spec.round_vector(w.reshape(B * R, v), s.reshape(B * R), M,
                          prior.reshape(B * R, prior.shape[-1])).reshape(B, R, v)
    q = spec.value(c, s.unsqueeze(-1), torch.zeros_like(s).unsqueeze(-1)).to(w.dtype)
    return c, q, (w - q) @ A


def span_order(H: torch.Tensor, span: int) -> torch.Tensor:
    """GPTQ's act-order over whole spans of ``span`` columns: spans by decreasing summed ``diag(H)``,
    columns in their natural order inside a span (``(B|1, C)`` column permutation)."""
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    if span == 1:
        return torch.argsort(diag, dim=-1, descending=True, stable=True)
    Bh, C = diag.shape
    order = torch.argsort(diag.reshape(Bh, C // span, span).sum(-1), dim=-1, descending=True, stable=True)
    return (order.unsqueeze(-1) * span + torch.arange(span, device=H.device)).reshape(Bh, C)


PERMUTE_ELEMENTS = 1 << 22  # elements of the rows permuted at a time by permute_square (16 MB in float32)


def permute_square(H: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``H[b][perm[b]][:, perm[b]]`` for batched ``H`` (``(B, C, C)``) and ``perm`` (``(B, C)``), a band of
    rows at a time (the only temporary is one band, not a second ``H``)."""
    out = torch.empty_like(H)
    C = H.shape[-1]
    step = max(1, PERMUTE_ELEMENTS // C)
    for b in range(H.shape[0]):
        for r0 in range(0, C, step):
            rows = H[b].index_select(0, perm[b, r0 : r0 + step])
            out[b, r0 : r0 + step] = rows.index_select(1, perm[b])
    return out


class ColumnSolver:
    """GPTQ over the columns of many row sets that share one Hessian per batch entry.

    Built once per layer: damping, dead inputs, the act-order permutation and ``U = chol(H^-1)^T``; then
    :meth:`solve` runs on any ``(B, R, C)`` weights (all rows of a layer, or one block of rows of every head).
    """

    def __init__(self, H: torch.Tensor, spec: Grid, group_size: int, *, act_order: bool = False,
                 percdamp: float = 0.01, block_size: int = 128, overwrite: bool = False):
        """``overwrite``: ``H`` is the solver's own (no caller keeps it): damped in place, or let go once
        permuted."""
        if H.dim() == 2:
            H = H.unsqueeze(0)
        self.spec = spec
        self.group_size = group_size
        self.block_size = block_size
        self.dead = dead_columns(H)  # (B|1, C)
        self.act_order = act_order
        C = H.shape[-1]
        if act_order:
            self.perm = span_order(H, spec.span)
            self.invperm = torch.argsort(self.perm, dim=-1)
            Hp = permute_square(H, self.perm)
        else:
            self.perm = None
            Hp = H
        del H
        # both in solve order; a permuted H is this solver's own copy, damped in place
        self.U, self.H = cholesky_inverse_upper(Hp, percdamp, overwrite=act_order or overwrite)
        del Hp
        self.H_natural = self.H if self.perm is None else permute_square(self.H, self.invperm)
        self.columns = C

    def zero_dead(self, W: torch.Tensor) -> torch.Tensor:
        """Weights of dead inputs set to 0 (they never meet a non-zero activation)."""
        return W.masked_fill(self.dead.unsqueeze(1), 0.0)

    def static_params(self, W: torch.Tensor) -> BlockGrid:
        """Per-(row, group) grids of ``W`` in natural column order, from the weights as given."""
        return fit_groups(W, self.spec, self.group_size, self.H_natural)

    def solve(self, W: torch.Tensor, static: BlockGrid | None = None) -> ColumnResult:
        """Quantize ``W`` (``(B, R, C)``, natural column order) and return the result in natural order.

        ``static`` (the grids of every group, e.g. from :meth:`static_params`) fixes the grids; act-order with groups always
        uses static grids (fit here from ``W`` when not given) so that groups stay contiguous columns.
        """
        W = self.zero_dead(W.to(self.H.dtype))
        if static is None and self.act_order and self.group_size > 0:
            static = self.static_params(W)
        col_params = None
        if static is not None:
            col_params = (expand_groups(static.scale, self.group_size, self.columns),
                          expand_groups(static.offset, self.group_size, self.columns))
        if self.perm is not None:
            idx = self.perm.unsqueeze(1).expand(W.shape[0], W.shape[1], -1)
            W = torch.gather(W, -1, idx)
            if col_params is not None:
                col_params = (torch.gather(col_params[0], -1, idx), torch.gather(col_params[1], -1, idx))
        res = gptq_columns(W, self.U, self.spec, self.group_size, self.H, col_params, self.block_size)
        if self.perm is not None:
            inv = self.invperm.unsqueeze(1).expand_as(res.Q)
            res.Q = torch.gather(res.Q, -1, inv)
            res.codes = torch.gather(res.codes, -1, inv)
        if static is not None:
            res.scale, res.zero, res.stored = static.scale.clone(), static.offset.clone(), static.stored
        return res


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, spec: Grid, group_size: int, *, act_order: bool = False,
                  static_groups: bool = False, percdamp: float = 0.01, block_size: int = 128) -> ColumnResult:
    """GPTQ of one layer ``W`` (``(R, C)`` or batched ``(B, R, C)``) with Hessian ``H`` (``(C, C)`` or ``(B, C, C)``)."""
    squeeze = W.dim() == 2
    if squeeze:
        W = W.unsqueeze(0)
    solver = ColumnSolver(H, spec, group_size, act_order=act_order, percdamp=percdamp, block_size=block_size)
    static = solver.static_params(solver.zero_dead(as_float(W))) if static_groups and group_size > 0 else None
    res = solver.solve(W, static)
    if squeeze:
        res = ColumnResult(res.Q[0], res.codes[0], res.scale[0], res.zero[0], res.stored)
    return res
