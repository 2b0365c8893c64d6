"""``QuantConfig``: every choice of a quantization run, built once (CLI or Python) and saved in the QDIR.

Its fields are those of the option groups of :mod:`turboboa.configs`, each declared there once; this module
joins them, resolves what depends on several groups (the ``auto`` rotations) and keeps the QDIR's form."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .configs.activations import FLOAT_BITS, ActivationConfig
from .configs.calibration import CalibrationConfig
from .configs.grid import GridConfig
from .configs.padding import PaddingConfig
from .configs.rotation import RotationConfig
from .configs.solvers import (
    METHOD_CONFIGS,
    F2Config,
    GPTQConfig,
    MethodConfig,
    RTNConfig,
    SolverConfig,
    TurboBoAConfig,
)
from .errors import UserError
from .formats.registry import get_format
from .formats.spec import FormatSpec
from .grids import GridSpec

# The order quant_config.json lists these fields in, first: a QDIR's bytes depend on it, so it does not follow
# the groups; a field not named here follows them, in field order.
QDIR_KEYS = (
    "method", "bits", "group_size", "sym", "grid", "format", "tensor_formats", "preset", "embed_format", "pad_to",
    "pad_order", "act_order", "static_groups", "percdamp", "block_size", "true_sequential", "rows", "alpha",
    "use_dx", "adaptive_grid", "refine_iters", "act_order_col", "act_order_row", "rotate", "rotate_seed",
    "online_rotate", "dyn_act_bits", "dyn_act_sym", "kv_bits", "kv_sym", "calib", "nsamples", "seqlen", "seed",
)


def auto_rotation(method: str, weight_activation: bool, unties_head: bool) -> str:
    """``--rotate auto``: the randomized Hadamard rotation for the Hessian-aware solvers (GPTQ, BoA, TurboBoA),
    except where it would untie a tied head in a weight-only run; "none" for RTN.

    The rotation is function-preserving and spreads the outlier channels over every column, which lowers the
    solvers' error and makes per-token activation quantization usable at all. Folding the final norm into a
    head tied to the embedding unties it (``unties_head``: a tied head under a final norm whose weight is not
    ones): the file then stores a second vocabulary-sized matrix, about a fifth of a small model's bytes, so a
    weight-only run keeps the model's own basis there. Folding the norms into min-max-rounded weights hurts
    RTN, which stays unrotated."""
    if method == "rtn":
        return "none"
    return "hadamard" if weight_activation or not unties_head else "none"


# A dataclass takes its bases' fields from the last base to the first: the method and the grid lead (in the
# constructor, `dataclasses.fields` and `--help`), the calibration closes.
@dataclass(frozen=True)
class QuantConfig(CalibrationConfig, ActivationConfig, RotationConfig, TurboBoAConfig, GPTQConfig, RTNConfig,
                  PaddingConfig, GridConfig, MethodConfig):
    """Options of ``turboboa quantize``: the fields of every option group, flat; defaults follow the papers
    (TurboBoA: N=16, alpha=0.25, 1 refinement) and ``make accuracy`` (act-order, damping 0.05, F2 for GPTQ
    too). The command builds it with these defaults, so the Python API and the command quantize alike.
    ``rotate="auto"`` stays unresolved until the model is known (:meth:`resolve_rotation`), unless the method
    or the activation quantization decides it; ``online_rotate="auto"`` is resolved here."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._resolve_rotations()

    def _resolve_rotations(self) -> None:
        """Resolve ``rotate="auto"`` where the method or the activation quantization decides it, and
        ``online_rotate="auto"``: with a rotation, the input of the MLP's down projection is rotated online when
        activations are quantized and queries and keys when the KV cache is (QuaRot); without one, nothing is. Then refuse
        online rotations a weight-only run or an unrotated model cannot take."""
        if self.rotate == "auto" and (self.method == "rtn" or self.is_weight_activation):
            object.__setattr__(self, "rotate", auto_rotation(self.method, self.is_weight_activation, False))
        online = self.online_rotate
        if online == "auto":
            parts = [] if self.rotate in ("none", "auto") else (
                (["down"] if self.dyn_act_bits < FLOAT_BITS else []) + (["qk"] if self.kv_bits < FLOAT_BITS else []))
            online = ",".join(parts) or "none"
        if online != "none" and not self.is_weight_activation:
            raise UserError("online rotations (--online-rotate) are for weight-activation quantization only; add "
                            "--act-bits or --kv-bits below 16, or use --online-rotate none")
        if "down" in online.split(",") and self.rotate == "none":
            raise UserError("--online-rotate down needs --rotate hadamard or random (the weights of the MLP's "
                            "down projection absorb the rotation there)")
        object.__setattr__(self, "online_rotate", online)

    def resolve_rotation(self, unties_head: bool, rotatable: bool = True) -> QuantConfig:
        """This configuration with ``rotate="auto"`` resolved for a model (:func:`auto_rotation`);
        ``unties_head``: whether rotating that model unties its head
        (:func:`turboboa.rotation.fuse.rotation_unties_head`); ``rotatable``: whether the model's family can be
        rotated at all (its adapter's ``ROTATION_REFUSAL`` is None); "auto" is "none" when it cannot."""
        if self.rotate != "auto":
            return self
        if not rotatable:
            return dataclasses.replace(self, rotate="none")
        return dataclasses.replace(self, rotate=auto_rotation(self.method, self.is_weight_activation, unties_head))

    def solver_config(self) -> SolverConfig:
        """The configuration of the method's solver (:data:`~turboboa.configs.solvers.METHOD_CONFIGS`): the
        settings it reads, and no others."""
        return METHOD_CONFIGS[self.method].of(self)

    @property
    def is_row_method(self) -> bool:
        return self.method in ("boa", "turboboa")

    @property
    def is_turbo(self) -> bool:
        return self.method == "turboboa"

    @property
    def uses_dx(self) -> bool:
        """F2 is on: the method takes it (its configuration has :class:`F2Config`) and ``use_dx`` is set (the
        second stream runs)."""
        return self.use_dx and issubclass(METHOD_CONFIGS[self.method], F2Config)

    def grid_spec(self) -> GridSpec:
        search = self.grid == "search" or (self.grid == "auto" and self.method != "rtn")
        return GridSpec(bits=self.bits, sym=self.sym, search=search)

    def solver_grid(self, fmt: str) -> tuple[GridSpec | FormatSpec, int]:
        """The grid a solver quantizes a layer of format ``fmt`` onto, and its group size, as the format gives
        them (:meth:`~turboboa.formats.registry.Format.solver_grid`): the uniform grid of ``bits``/``sym``/
        ``group_size`` for "int", else the storage format's own grid and group; either with this config's
        range-search choice."""
        return get_format(fmt).solver_grid(bits=self.bits, group_size=self.group_size, sym=self.sym,
                                           search=self.grid_spec().search)

    def to_dict(self) -> dict[str, Any]:
        """The flat dict ``quant_config.json`` stores: every field, those of :data:`QDIR_KEYS` first, in its
        order."""
        d = dataclasses.asdict(self)
        return {k: d[k] for k in (*QDIR_KEYS, *(k for k in d if k not in QDIR_KEYS))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        """The configuration of a :meth:`to_dict` dict; keys this version does not know are left out, fields
        the dict lacks take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
