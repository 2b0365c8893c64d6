"""The options of a quantization run, in typed groups: each option is a field declared once, with its flag,
default, choices and help (:func:`~turboboa.configs.option.option`); :class:`~turboboa.config.QuantConfig`
holds them all, and the command derives its flags from them.

* ``grid``: ``GridConfig``, the grid (bits, group size, symmetry, range fit, format, preset, embedding);
* ``padding``: ``PaddingConfig``, the width padding;
* ``solvers``: ``MethodConfig`` (the method) and each method's own: ``RTNConfig``, ``GPTQConfig``,
  ``BoAConfig``, ``TurboBoAConfig``, made of the shared ``DampingConfig``, ``ColumnSolverConfig``, ``F2Config``;
* ``rotation``: ``RotationConfig``, the fused and the online rotations;
* ``activations``: ``ActivationConfig``, per-token activation and KV-cache quantization;
* ``calibration``: ``CalibrationConfig``, the calibration data.
"""

from .activations import ActivationConfig
from .calibration import CalibrationConfig
from .grid import GridConfig
from .option import OptionGroup, option
from .padding import PaddingConfig
from .rotation import RotationConfig
from .solvers import (
    METHOD_CONFIGS,
    BoAConfig,
    ColumnSolverConfig,
    DampingConfig,
    F2Config,
    GPTQConfig,
    MethodConfig,
    RTNConfig,
    SolverConfig,
    TurboBoAConfig,
)

__all__ = ["METHOD_CONFIGS", "ActivationConfig", "BoAConfig", "CalibrationConfig", "ColumnSolverConfig",
           "DampingConfig", "F2Config", "GPTQConfig", "GridConfig", "MethodConfig", "OptionGroup", "PaddingConfig",
           "RTNConfig", "RotationConfig", "SolverConfig", "TurboBoAConfig", "option"]
