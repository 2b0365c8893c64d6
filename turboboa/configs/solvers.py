"""The solvers' settings: one configuration per method (:data:`METHOD_CONFIGS`), each holding exactly what
its solver reads (:func:`turboboa.solvers.solve_layer` takes it), and ``MethodConfig``, the choice of method.

The settings several methods share are declared once, in a group the methods' configurations inherit:
``DampingConfig`` (every solver), ``ColumnSolverConfig`` (GPTQ's column loop, which BoA and TurboBoA run on
each block of rows) and ``F2Config`` (the full-precision stream's correction, GPTQ and TurboBoA)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .option import OptionGroup, option


@dataclass(frozen=True)
class DampingConfig(OptionGroup):
    """How a solver regularizes the layer Hessian: ``H + percdamp * mean(diag H) * I``."""

    percdamp: float = option(0.05, "damping, share of mean diag", flag="--damp")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.percdamp < 0:
            raise UserError(f"--damp {self.percdamp} is negative; use a share of the mean Hessian diagonal >= 0")


@dataclass(frozen=True)
class ColumnSolverConfig(DampingConfig):
    """GPTQ's column loop: the columns are quantized ``block_size`` at a time, the later ones updated once per
    block (rounded to whole groups)."""

    block_size: int = option(128, "GPTQ/BoA/TurboBoA: columns quantized between two updates of the later "
                             "columns (a speed setting; whole groups)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size < 1:
            raise UserError("--block-size must be >= 1")


@dataclass(frozen=True)
class F2Config(OptionGroup):
    """F2: the correction for the earlier layers' errors, from a full-precision stream (TurboBoA's F2, GPTAQ's
    asymmetric calibration for GPTQ): the target ``W + alpha W C H^-1``."""

    alpha: float = option(0.25, "GPTQ/TurboBoA: F2 strength")
    use_dx: bool = option(True, "GPTQ/TurboBoA: turn off F2 (correction for the earlier layers' errors from a "
                          "full-precision stream; GPTAQ for GPTQ)", flag="--no-dx")


@dataclass(frozen=True)
class RTNConfig(DampingConfig):
    """Round to nearest: no compensation; the damped Hessian only weights the range search."""


@dataclass(frozen=True)
class GPTQConfig(ColumnSolverConfig, F2Config):
    """GPTQ: column by column, each rounding error compensated in the later columns."""

    act_order: bool = option(True, "GPTQ: columns by decreasing Hessian diagonal (static groups)",
                             flag="--act-order/--no-act-order")
    static_groups: bool = option(False, "GPTQ: fix group grids from the original weights")


@dataclass(frozen=True)
class BoAConfig(ColumnSolverConfig):
    """BoA: row by row within each head, the later rows compensated through the attention row Hessian."""

    act_order_col: bool = option(True, "BoA/TurboBoA: columns by decreasing H_col diagonal",
                                 flag="--act-order-col/--no-act-order-col")
    act_order_row: bool = option(False, "BoA/TurboBoA: rows by decreasing H_row diagonal")


@dataclass(frozen=True)
class TurboBoAConfig(BoAConfig, F2Config):
    """TurboBoA: BoA on blocks of ``rows`` rows (F1), with F2 and the grids refit as the rows move (F3)."""

    rows: int = option(16, "TurboBoA: rows quantized jointly (N)")
    adaptive_grid: bool = option(True, "TurboBoA: fix grids from the original weights", flag="--no-adaptive-grid")
    refine_iters: int = option(1, "TurboBoA: scale refinement sweeps")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rows < 1:
            raise UserError("--rows must be >= 1")
        if self.refine_iters < 0:
            raise UserError("--refine-iters must be >= 0")


SolverConfig = RTNConfig | GPTQConfig | BoAConfig | TurboBoAConfig

# each method and the configuration its solver takes
METHOD_CONFIGS: dict[str, type[SolverConfig]] = {
    "rtn": RTNConfig, "gptq": GPTQConfig, "boa": BoAConfig, "turboboa": TurboBoAConfig,
}
METHODS = tuple(METHOD_CONFIGS)


@dataclass(frozen=True)
class MethodConfig(OptionGroup):
    """Which solver quantizes the block layers."""

    method: str = option("turboboa", "the solver: rtn (round to nearest), gptq, boa or turboboa", choices=METHODS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
