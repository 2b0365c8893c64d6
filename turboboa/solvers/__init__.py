"""Solvers: RTN, GPTQ, BoA and TurboBoA, applied to one linear layer through :func:`solve_layer`.

Each method's solver takes its own configuration (:mod:`turboboa.configs.solvers`), the settings it reads
and no others, and the grid the layer is quantized onto."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..configs.solvers import BoAConfig, F2Config, GPTQConfig, RTNConfig, SolverConfig, TurboBoAConfig
from ..grids import BlockGrid
from ..numerics import is_finite
from ..quantized import QuantizedLinear
from .boa import RowOptions, boa_quantize
from .gptq import ColumnResult, ColumnSolver, Grid, fit_groups
from .linalg import HessianError, as_float, damp, dead_columns
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
    ``fmt``: the layer's format, whose grid the block loop gives the solver (:meth:`QuantConfig.solver_grid`,
    :func:`turboboa.blockwise.quantize_layer`): "int" (the config's uniform grid) or a storage format (a ggml
    type, an i-quant, LPBQ); None: the config's ``format``.
    ``owned``: ``H`` and ``cross`` were computed for this problem alone (the block loop's statistics): the solver
    takes them (:meth:`hessian`, :meth:`cross_term`), overwrites ``H`` and lets each go once it has what it
    needs, so no second ``C x C`` copy lives beside the factors. Otherwise they are left as given.
    """

    name: str
    W: torch.Tensor
    H: torch.Tensor
    H_row: torch.Tensor | None = None
    heads: int = 1
    cross: torch.Tensor | None = None
    fmt: str | None = None
    owned: bool = False

    def hessian(self) -> torch.Tensor:
        """``H`` as ``(1|heads, C, C)`` for the solver, given up by an owned problem."""
        H = _batched(self.H)
        if self.owned:
            self.H = None  # type: ignore[assignment]  # the solver holds the only reference now
        return H

    def cross_term(self) -> torch.Tensor | None:
        """``cross`` as ``(1|heads, C, C)`` (None without one), given up by an owned problem."""
        cross = self.cross
        if self.owned:
            self.cross = None
        return None if cross is None else _batched(cross)


def _batched(M: torch.Tensor) -> torch.Tensor:
    """A ``(C, C)`` matrix as ``(1, C, C)``; a batch ``(B, C, C)`` as it is."""
    return M if M.dim() == 3 else M.unsqueeze(0)


def shifted_target(W: torch.Tensor, WC: torch.Tensor, H: torch.Tensor, alpha: float) -> torch.Tensor:
    """TurboBoA F2 as a shifted target: ``W' = W + alpha W C H^-1``, from ``W`` and ``WC = W C``.

    With ``dX = X_fp - X``, the objective ``||Q X - W X_fp||^2`` equals ``||(Q - W') X||^2`` up to a constant
    when ``H = 2 X X^T`` and ``C = 2 dX X^T`` (complete the square); alpha scales the correction as in the paper.
    The row compensation then uses ``W' - Q``, the paper's ``W - Q + W C H^-1``.
    """
    return W + alpha * torch.linalg.solve(H, WC.transpose(-1, -2)).transpose(-1, -2)


def f2_start(W: torch.Tensor, problem: LayerProblem, f2: F2Config | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The solvers' target ``W`` (``(B, R, C)``) with dead inputs zeroed, and ``W C`` when F2 applies (the method
    takes it, ``f2``; it is on; the problem carries a cross term), else None. Called before the column solver
    factors ``H``: an owned cross term is let go first."""
    target = W.masked_fill(dead_columns(_batched(problem.H)).unsqueeze(1), 0.0)
    cross = problem.cross_term()
    if f2 is None or not f2.use_dx or cross is None:
        return target, None
    return target, target @ cross


def f2_target(target: torch.Tensor, WC: torch.Tensor | None, columns: ColumnSolver, f2: F2Config | None) -> torch.Tensor:
    """The target of :func:`f2_start` shifted by F2 (:func:`shifted_target`, on the damped ``H``) when it gave
    ``W C``, dead inputs zeroed again."""
    if f2 is None or WC is None:
        return target
    return columns.zero_dead(shifted_target(target, WC, columns.H_natural, f2.alpha))


def _to_linear(res: ColumnResult, d_out: int, spec: Grid, group_size: int) -> QuantizedLinear:
    """The layer's ``QuantizedLinear``: uint8 codes ``(d_out, C)`` and the fields the grid stores."""
    codes = res.codes.reshape(d_out, res.codes.shape[-1]).to(torch.uint8).cpu()
    return QuantizedLinear(codes=codes, **spec.linear_fields(BlockGrid(res.scale, res.zero, res.stored), d_out,
                                                             group_size))


def solve_rtn(problem: LayerProblem, cfg: RTNConfig, spec: Grid, G: int) -> ColumnResult:
    """RTN: every weight rounded onto its group's grid, the damped Hessian weighting the range search."""
    owned = problem.owned
    Hd, _ = damp(problem.hessian(), cfg.percdamp, inplace=owned)
    return rtn_quantize(as_float(problem.W).unsqueeze(0), spec, G, Hd)


def solve_gptq(problem: LayerProblem, cfg: GPTQConfig, spec: Grid, G: int) -> ColumnResult:
    """GPTQ (with F2: GPTAQ) over all rows at once."""
    target, WC = f2_start(as_float(problem.W).unsqueeze(0), problem, cfg)
    solver = ColumnSolver(problem.hessian(), spec, G, act_order=cfg.act_order, percdamp=cfg.percdamp,
                          block_size=cfg.block_size, overwrite=problem.owned)
    Wb = f2_target(target, WC, solver, cfg)
    del target, WC
    static = fit_groups(solver.zero_dead(Wb), spec, G, solver.H_natural) if cfg.static_groups and G > 0 else None
    return solver.solve(Wb, static)


def _solve_rows(problem: LayerProblem, cfg: BoAConfig, spec: Grid, G: int, options: RowOptions,
                f2: F2Config | None) -> tuple[ColumnResult, ColumnSolver, torch.Tensor]:
    """The row loop BoA and TurboBoA share, on each head of ``problem``: the result, the column solver and the
    target (for TurboBoA's refinement)."""
    W = as_float(problem.W)
    d_out, C = W.shape
    Wh = W.reshape(problem.heads, d_out // problem.heads, C)
    target, WC = f2_start(Wh, problem, f2)
    columns = ColumnSolver(problem.hessian(), spec, G, act_order=cfg.act_order_col, percdamp=cfg.percdamp,
                           block_size=cfg.block_size, overwrite=problem.owned)
    target = f2_target(target, WC, columns, f2)
    del WC
    return boa_quantize(target, columns, problem.H_row, options, cfg.percdamp), columns, target


def solve_boa(problem: LayerProblem, cfg: BoAConfig, spec: Grid, G: int) -> ColumnResult:
    """BoA: one row at a time, each row's grid fixed from the original weights."""
    options = RowOptions(rows=1, adaptive_grid=False, act_order_row=cfg.act_order_row)
    return _solve_rows(problem, cfg, spec, G, options, None)[0]


def solve_turboboa(problem: LayerProblem, cfg: TurboBoAConfig, spec: Grid, G: int) -> ColumnResult:
    """TurboBoA: BoA on blocks of ``rows`` rows (F1), F2, grids refit as the rows move (F3a), then the grids'
    parameters refined with the codes fixed (F3b)."""
    options = RowOptions(rows=cfg.rows, adaptive_grid=cfg.adaptive_grid, act_order_row=cfg.act_order_row)
    res, columns, target = _solve_rows(problem, cfg, spec, G, options, cfg)
    if cfg.refine_iters > 0:
        # the objective the rows were solved under: H_col and H_row both damped (an undamped, near-singular
        # H_row lets a coordinate step grow a row's scales along its null space)
        H_row = None if problem.H_row is None else damp(problem.H_row, cfg.percdamp)[0]
        grid, res.Q = refine_params(spec, target, res.codes, BlockGrid(res.scale, res.zero, res.stored),
                                    columns.H_natural, H_row, G, cfg.refine_iters)
        res.scale, res.zero, res.stored = grid.scale, grid.offset, grid.stored
    return res


# each method's configuration and its solver
SOLVERS: dict[type, Callable[[LayerProblem, SolverConfig, Grid, int], ColumnResult]] = {
    RTNConfig: solve_rtn, GPTQConfig: solve_gptq, BoAConfig: solve_boa, TurboBoAConfig: solve_turboboa,
}


def solve_layer(problem: LayerProblem, config: SolverConfig, grid: Grid, group_size: int) -> QuantizedLinear:
    """Quantize ``problem.W`` onto ``grid`` (groups of ``group_size`` columns; -1: one per row) with the solver
    whose configuration ``config`` is (an :class:`RTNConfig`, :class:`GPTQConfig`, :class:`BoAConfig` or
    :class:`TurboBoAConfig`)."""
    solver = SOLVERS.get(type(config))
    if solver is None:
        raise TypeError(f"solve_layer takes a method's configuration ({', '.join(c.__name__ for c in SOLVERS)}), "
                        f"not a {type(config).__name__}; QuantConfig.solver_config() gives it")
    if not is_finite(problem.W):
        raise HessianError(f"{problem.name}: weight holds NaN or Inf")
    if not is_finite(problem.H):
        raise HessianError(f"{problem.name}: Hessian holds NaN or Inf (activations overflowed?)")
    try:
        res = solver(problem, config, grid, group_size)
    except HessianError as e:
        raise HessianError(f"{problem.name}: {e}") from None
    return _to_linear(res, problem.W.shape[0], grid, group_size)
