"""Solvers: RTN, GPTQ, BoA and TurboBoA, applied to one linear layer through :func:`solve_layer`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import QuantConfig
from ..formats.base import get_format
from ..formats.spec import format_spec, map_grid
from ..grids import BlockGrid
from ..quantized import UNIFORM, QuantizedLinear
from .boa import RowOptions, boa_quantize
from .gptq import ColumnResult, ColumnSolver, Grid, fit_groups
from .linalg import HessianError, as_float, damp
from .refine import refine_params
from .rtn import rtn_quantize

__all__ = ["LayerProblem", "solve_layer", "HessianError"]


@dataclass
class LayerProblem:
    """One linear layer to quantize and the statistics of its inputs.

    ``H``: the column Hessian ``2 X X^T / n`` (``(C, C)``), or one per head (``(heads, C, C)``, v_proj under BoA).
    ``H_row``: the attention row Hessian per head (``(heads, d_h, d_h)``) for q_proj/k_proj under BoA, else None.
    ``heads``: how many consecutive row groups (heads) ``W`` splits into for the per-head problems.
    ``cross``: TurboBoA's F2 term ``C = 2 (X_fp - X) X^T / n`` (same shape as ``H``), or None.
    ``fmt``: the grid: "int" (the config's uniform grid) or a storage format (a ggml type, LPBQ), whose grid
    every solver quantizes onto.
    """

    name: str
    W: torch.Tensor
    H: torch.Tensor
    H_row: torch.Tensor | None = None
    heads: int = 1
    cross: torch.Tensor | None = None
    fmt: str = UNIFORM


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


def _to_linear(res: ColumnResult, d_out: int, cfg: QuantConfig, fmt: str) -> QuantizedLinear:
    C = res.codes.shape[-1]
    s = res.scale
    codes = res.codes.reshape(d_out, C).to(torch.uint8).cpu()
    if fmt == UNIFORM:
        return QuantizedLinear(codes=codes, scale=s.reshape(d_out, -1).float().cpu().contiguous(),
                               zero=res.zero.reshape(d_out, -1).float().cpu().contiguous(),
                               bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym)
    format_ = get_format(fmt)
    grid = map_grid(res.stored, lambda t: t.reshape(d_out, -1).cpu().contiguous())
    scale_g, offset_g = format_.group_scale_offset(grid)
    return QuantizedLinear(codes=codes, scale=scale_g, zero=offset_g, bits=format_.bits,
                           group_size=format_.group_size, sym=not format_.asymmetric, fmt=fmt, grid=grid)


def layer_grid(problem: LayerProblem, cfg: QuantConfig) -> tuple[Grid, int]:
    """The solver's grid for ``problem`` and its group size: the config's uniform grid or the layer's format."""
    if problem.fmt == UNIFORM:
        return cfg.grid_spec(), cfg.group_size
    spec = format_spec(problem.fmt, search=cfg.grid_spec().search)
    return spec, spec.fmt.group_size


def solve_layer(problem: LayerProblem, cfg: QuantConfig) -> QuantizedLinear:
    """Quantize ``problem.W`` with the method of ``cfg`` onto its grid."""
    if not torch.isfinite(problem.W).all():
        raise HessianError(f"{problem.name}: weight holds NaN or Inf")
    if not torch.isfinite(problem.H).all():
        raise HessianError(f"{problem.name}: Hessian holds NaN or Inf (activations overflowed?)")
    spec, G = layer_grid(problem, cfg)
    fmt = problem.fmt
    W = as_float(problem.W)
    d_out, C = W.shape
    if cfg.method == "rtn":
        Hd, _ = damp(problem.H if problem.H.dim() == 3 else problem.H.unsqueeze(0), cfg.percdamp)
        return _to_linear(rtn_quantize(W.unsqueeze(0), spec, G, Hd), d_out, cfg, fmt)
    try:
        if cfg.method == "gptq":
            solver = ColumnSolver(problem.H, spec, G, act_order=cfg.act_order, percdamp=cfg.percdamp,
                                  block_size=cfg.block_size)
            Wb = f2_target(W.unsqueeze(0), problem, solver, cfg)  # with F2: GPTAQ
            static = fit_groups(solver.zero_dead(Wb), spec, G, solver.H_natural) if cfg.static_groups and G > 0 else None
            return _to_linear(solver.solve(Wb, static), d_out, cfg, fmt)
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
        return _to_linear(res, d_out, cfg, fmt)
    except HessianError as e:
        raise HessianError(f"{problem.name}: {e}") from None
