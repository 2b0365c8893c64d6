"""Solvers: RTN, GPTQ, BoA and TurboBoA, applied to one linear layer through :func:`solve_layer`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantConfig
from ..grids import BlockGrid
from ..quantized import QuantizedLinear
from .boa import RowOptions, boa_quantize
from .gptq import ColumnResult, ColumnSolver, Grid, fit_groups
from .linalg import HessianError, as_float, damp
from .refine import refine_params
from .rtn import rtn_quantize

__all__ = ["LayerProblem", "solve_layer", "HessianError"]


@dataclass
class LayerProblem:
    """One linear layer to quantize and the statistics of its inputs.

    ``H``: the column Hessian ``2 X X^T / n`` (``(C, C)``), or one per head (``(heads, C, C)``, the value
    projection under BoA).
    ``H_row``: the attention row Hessian per head (``(heads, d_h, d_h)``) for the query and key projections under
    BoA, else None.
    ``heads``: how many consecutive row groups (heads) ``W`` splits into for the per-head problems.
    ``cross``: TurboBoA's F2 term ``C = 2 (X_fp - X) X^T / n`` (same shape as ``H``), or None.
    ``fmt``: the layer's format, whose grid every solver quantizes onto (:meth:`QuantConfig.solver_grid`):
    "int" (the config's uniform grid) or a storage format (a ggml type, an i-quant, LPBQ); None: the config's
    ``format``.
    """

    name: str
    W: torch.Tensor
    H: torch.Tensor
    H_row: torch.Tensor | None = None
    heads: int = 1
    cross: torch.Tensor | None = None
    fmt: str | None = None


def shifted_target(W: torch.Tensor, cross: torch.Tensor, H: torch.Tensor, alpha: float) -> torch.Tensor:
    """TurboBoA F2 as a shifted target: ``W' = W + alpha W C H^-1``.

    With ``dX = X_fp - X``, the objective ``||Q X - W X_fp||^2`` equals ``||(Q - W') X||^2`` up to a constant
    when ``H = 2 X X^T`` and ``C = 2 dX X^T`` (complete the square); alpha scales the correction as in the paper.
    The row compensation then uses ``W' - Q``, the paper's ``W - Q + W C H^-1``.
    """
    WC = W @ cross
    return W + alpha * torch.linalg.solve(H, WC.transpose(-1, -2)).transpose(-1, -2)


def f2_target(W: torch.Tensor, problem: LayerProblem, columns: ColumnSolver, cfg: QuantConfig) -> torch.Tensor:
    """The solvers' target: ``W`` (``(B, R, C)``) with dead inputs zeroed, shifted by F2 (:func:`shifted_target`)
    when the method takes it and the problem carries a cross term."""
    target = columns.zero_dead(W)
    if not (cfg.uses_dx and problem.cross is not None):
        return target
    cross = problem.cross if problem.cross.dim() == 3 else problem.cross.unsqueeze(0)
    return columns.zero_dead(shifted_target(target, cross, columns.H_natural, cfg.alpha))


def _to_linear(res: ColumnResult, d_out: int, spec: Grid, group_size: int) -> QuantizedLinear:
    """The layer's ``QuantizedLinear``: uint8 codes ``(d_out, C)`` and the fields the grid stores."""
    codes = res.codes.reshape(d_out, res.codes.shape[-1]).to(torch.uint8).cpu()
    return QuantizedLinear(codes=codes, **spec.linear_fields(BlockGrid(res.scale, res.zero, res.stored), d_out,
                                                             group_size))


def layer_grid(problem: LayerProblem, cfg: QuantConfig) -> tuple[Grid, int]:
    """The solver's grid for ``problem`` and its group size (:meth:`QuantConfig.solver_grid` of the layer's
    format; the config's ``format`` when the problem names none)."""
    return cfg.solver_grid(problem.fmt or cfg.format)


def solve_layer(problem: LayerProblem, cfg: QuantConfig) -> QuantizedLinear:
    """Quantize ``problem.W`` with the method of ``cfg`` onto its grid."""
    if not torch.isfinite(problem.W).all():
        raise HessianError(f"{problem.name}: weight holds NaN or Inf")
    if not torch.isfinite(problem.H).all():
        raise HessianError(f"{problem.name}: Hessian holds NaN or Inf (activations overflowed?)")
    spec, G = layer_grid(problem, cfg)
    W = as_float(problem.W)
    d_out, C = W.shape
    if cfg.method == "rtn":
        Hd, _ = damp(problem.H if problem.H.dim() == 3 else problem.H.unsqueeze(0), cfg.percdamp)
        return _to_linear(rtn_quantize(W.unsqueeze(0), spec, G, Hd), d_out, spec, G)
    try:
        if cfg.method == "gptq":
            solver = ColumnSolver(problem.H, spec, G, act_order=cfg.act_order, percdamp=cfg.percdamp,
                                  block_size=cfg.block_size)
            Wb = f2_target(W.unsqueeze(0), problem, solver, cfg)  # with F2: GPTAQ
            static = fit_groups(solver.zero_dead(Wb), spec, G, solver.H_natural) if cfg.static_groups and G > 0 else None
            return _to_linear(solver.solve(Wb, static), d_out, spec, G)
        heads = problem.heads
        Wh = W.reshape(heads, d_out // heads, C)
        columns = ColumnSolver(problem.H, spec, G, act_order=cfg.act_order_col, percdamp=cfg.percdamp,
                               block_size=cfg.block_size)
        target = f2_target(Wh, problem, columns, cfg)
        options = RowOptions(
            rows=cfg.rows if cfg.is_turbo else 1,
            adaptive_grid=cfg.is_turbo and cfg.adaptive_grid,
            act_order_row=cfg.act_order_row,
        )
        res = boa_quantize(target, columns, problem.H_row, options, cfg.percdamp)
        if cfg.is_turbo and cfg.refine_iters > 0:
            grid, res.Q = refine_params(spec, target, res.codes, BlockGrid(res.scale, res.zero, res.stored),
                                        columns.H_natural, problem.H_row, G, cfg.refine_iters)
            res.scale, res.zero, res.stored = grid.scale, grid.offset, grid.stored
        return _to_linear(res, d_out, spec, G)
    except HessianError as e:
        raise HessianError(f"{problem.name}: {e}") from None
