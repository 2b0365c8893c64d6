"""``QuantConfig``: every choice of a quantization run, built once (CLI or Python) and saved in the QDIR."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .activations.dynamic import check_dynamic_bits
from .arch import role_of
from .errors import UserError
from .formats import is_ggml_format
from .formats.base import block_format_names
from .formats.choice import FALLBACK, layer_format, parse_overrides, resolve_group
from .formats.presets import check_preset, output_type, preset_format, table_format
from .formats.registry import all_format_names, get_format
from .formats.spec import FormatSpec
from .grids import SUPPORTED_BITS, GridSpec
from .rotation import ROTATIONS

METHODS = ("rtn", "gptq", "boa", "turboboa")
GRIDS = ("auto", "minmax", "search")

PAD_ORDERS = ("natural", "activation")
FLOAT = "float"  # --embed-format float: the embedding and head stay float32

# Methods whose target carries F2, the correction for the earlier layers' errors from a full-precision stream:
# TurboBoA's F2, which for GPTQ is GPTAQ's asymmetric calibration (Li et al., 2025). BoA stays the paper's N=1.
DX_METHODS = ("gptq", "turboboa")


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


@dataclass(frozen=True)
class QuantConfig:
    """Options of ``turboboa quantize``; defaults follow the papers (TurboBoA: N=16, alpha=0.25, 1 refinement)
    and ``make accuracy`` (act-order, damping 0.05, F2 for GPTQ too). The command builds it with these defaults,
    so the Python API and the command quantize alike. ``rotate="auto"`` stays unresolved until the model is
    known (:meth:`resolve_rotation`), unless the method or the activation quantization decides it."""

    method: str = "turboboa"
    bits: int = 4
    group_size: int | None = None  # None: 128, or the block of an LPBQ format (32); always an int once built
    sym: bool = False
    grid: str = "auto"  # auto: Hessian-weighted range search for gptq/boa/turboboa, min-max for rtn
    format: str = "int"  # "int" (uniform grid of --bits/--group-size), a ggml type (q4_k, ...) or lpbq4
    tensor_formats: tuple[str, ...] = ()  # NAME_PATTERN=TYPE overrides, the last match wins
    preset: str = ""  # llama-quantize-like file type (Q2_K, Q3_K_S, Q3_K_M, Q4_K_M): a ggml type per tensor
    embed_format: str = ""  # type of the embedding and head (RTN); "" = llama-quantize's rule, "float" keeps them
    pad_to: int = 0  # pad every linear input width to a multiple of this (function-preserving); 0 = off
    pad_order: str = "natural"  # where the residual zero channels go: at the end, or beside the largest channels
    # GPTQ
    act_order: bool = True
    static_groups: bool = False
    percdamp: float = 0.05  # GPTQModel's default
    block_size: int = 128
    true_sequential: bool = False
    # BoA / TurboBoA
    rows: int = 16
    alpha: float = 0.25  # F2 strength (GPTQ and TurboBoA)
    use_dx: bool = True  # F2 (GPTAQ's asymmetric calibration) for GPTQ and TurboBoA
    adaptive_grid: bool = True
    refine_iters: int = 1
    act_order_col: bool = True  # columns by decreasing H_col diagonal, as GPTQ's act-order
    act_order_row: bool = False
    # rotation (QuaRot) and weight-activation quantization (WxAyKVz, per token)
    rotate: str = "auto"  # none | hadamard (randomized Hadamard) | random (Haar orthogonal) | auto (auto_rotation)
    rotate_seed: int = 0
    online_rotate: str = "auto"  # none | down | qk | down,qk; auto: what the activation/KV quantizers need
    dyn_act_bits: int = 16  # per-token dynamic quantization of every block linear layer's input (16 = float)
    dyn_act_sym: bool = True
    kv_bits: int = 16  # per-token, per-head dynamic quantization of keys and values (16 = float)
    kv_sym: bool = False
    # calibration
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UserError(f"unknown method '{self.method}'; choose one of {', '.join(METHODS)}")
        if self.format.lower() not in all_format_names():
            raise UserError(f"unknown --format '{self.format}'; choose one of {', '.join(all_format_names())}")
        if self.percdamp < 0:
            raise UserError(f"--damp {self.percdamp} is negative; use a share of the mean Hessian diagonal >= 0")
        fmt, group_size = resolve_group(self.format.lower(), self.group_size)
        object.__setattr__(self, "format", fmt)
        object.__setattr__(self, "group_size", group_size)
        if self.bits not in SUPPORTED_BITS:
            raise UserError(f"--bits {self.bits} is not supported; choose one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size == 0 or self.group_size < -1:
            raise UserError(f"--group-size {self.group_size} is invalid; use -1 (per output channel) or a positive size")
        if self.grid not in GRIDS:
            raise UserError(f"unknown grid '{self.grid}'; choose one of {', '.join(GRIDS)}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
        object.__setattr__(self, "tensor_formats", tuple(self.tensor_formats))
        parse_overrides(self.tensor_formats)
        if self.preset:
            object.__setattr__(self, "preset", check_preset(self.preset))
        if self.embed_format and self.embed_format.lower() not in (FLOAT, *block_format_names()):
            raise UserError(f"unknown --embed-format '{self.embed_format}'; choose {FLOAT} or one of "
                            f"{', '.join(block_format_names())}")
        if self.pad_to < 0 or (self.pad_to and self.pad_to % 32):
            raise UserError(f"--pad-to {self.pad_to} must be a positive multiple of 32 (256 for k-quants)")
        if self.pad_order not in PAD_ORDERS:
            raise UserError(f"unknown --pad-order '{self.pad_order}'; choose one of {', '.join(PAD_ORDERS)}")
        self._check_rotation()
        if self.rows < 1:
            raise UserError("--rows must be >= 1")
        if self.refine_iters < 0:
            raise UserError("--refine-iters must be >= 0")

    def _check_rotation(self) -> None:
        """Validate ``rotate``/``online_rotate``/``dyn_act_bits``/``kv_bits`` and resolve ``online_rotate="auto"``:
        with a rotation, the input of the MLP's down projection is rotated online when activations are quantized
        and queries and keys when the KV cache is (QuaRot); without one, nothing is."""

        if self.rotate == "auto" and (self.method == "rtn" or self.is_weight_activation):
            object.__setattr__(self, "rotate", auto_rotation(self.method, self.is_weight_activation, False))
        if self.rotate not in (*ROTATIONS, "auto"):
            raise UserError(f"unknown --rotate '{self.rotate}'; choose auto or one of {', '.join(ROTATIONS)}")
        check_dynamic_bits(self.dyn_act_bits, self.kv_bits)
        weight_only = self.dyn_act_bits >= 16 and self.kv_bits >= 16
        online = self.online_rotate
        if online == "auto":
            parts = [] if self.rotate in ("none", "auto") else (["down"] if self.dyn_act_bits < 16 else []) + (
                ["qk"] if self.kv_bits < 16 else [])
            online = ",".join(parts) or "none"
        parts = sorted(set(filter(None, online.split(","))))
        if online != "none" and (not parts or any(p not in ("down", "qk") for p in parts)):
            raise UserError(f"unknown --online-rotate '{self.online_rotate}'; choose auto, none, down, qk or down,qk")
        online = ",".join(parts) if online != "none" else "none"
        if online != "none" and weight_only:
            raise UserError("online rotations (--online-rotate) are for weight-activation quantization only; add "
                            "--act-bits or --kv-bits below 16, or use --online-rotate none")
        if "down" in parts and self.rotate == "none":
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

    @property
    def is_weight_activation(self) -> bool:
        """Per-token activation or KV quantization is on (``WxAyKVz``)."""
        return self.dyn_act_bits < 16 or self.kv_bits < 16

    @property
    def is_row_method(self) -> bool:
        return self.method in ("boa", "turboboa")

    @property
    def is_turbo(self) -> bool:
        return self.method == "turboboa"

    @property
    def uses_dx(self) -> bool:
        """F2 is on: the method takes it (:data:`DX_METHODS`) and ``use_dx`` is set (the second stream runs)."""
        return self.use_dx and self.method in DX_METHODS

    def layer_format(self, name: str, columns: int, shape: Any = None, role: str | None = None) -> str:
        """The grid layer ``name`` is quantized onto: "int" or a ggml type: the preset's choice (``shape``, a
        :class:`~turboboa.formats.presets.ModelShape`, is then needed; ``role``: the layer's role, by default
        the one its name has, :func:`turboboa.arch.role_of`) or ``format``, then the overrides, then the width
        fallbacks."""

        default = preset_format(self.preset, name, shape, role) if self.preset else self.format
        return layer_format(default, name, columns, parse_overrides(self.tensor_formats), bool(self.preset))

    def embedding_format(self, columns: int, shape: Any, name: str = "", role: str | None = None) -> str:
        """The token embedding's format (or, for the head's ``name`` or ``role="head"``, an untied head's):
        ``embed_format`` ("" for ``float``), else llama-quantize's choice for the file type: the preset's, or that
        of a file whose layers are the ggml type ``format`` (:func:`~turboboa.formats.presets.table_format`: q6_k
        for the head or a tied embedding, the layers' type for an untied one); for a uniform or LPBQ grid q6_k
        for both. Then the overrides (matched against ``name``) and width fallbacks (q6_k -> q8_0); a width no
        block fits keeps float. ``role``: "embedding" or "head", by default the role of ``name``
        (:func:`turboboa.arch.role_of`), the embedding without a name."""
        role = role or (role_of(name) if name else "embedding")
        if self.embed_format.lower() == FLOAT:
            return ""
        derived = not self.embed_format
        if self.embed_format:
            fmt = self.embed_format.lower()
        elif self.preset:
            fmt = preset_format(self.preset, name, shape, role)
            output = role == "head" or shape.tied
            if output and columns % 256:  # llama.cpp: an output matrix whose width takes no 256-block is q8_0
                fmt = "q8_0"
        else:  # the layers' file type; a grid GGUF cannot hold (uniform, LPBQ) has none: about 8-bit tables
            fmt = (table_format(self.format, role, shape) if is_ggml_format(self.format)
                   else output_type("q8_0" if self.bits == 8 else ""))
            if not get_format(fmt).supports_width(columns):
                fmt = FALLBACK.get(fmt, fmt)
            if not get_format(fmt).supports_width(columns):
                return ""  # no block of this type fits the width: the table stays float, as the user did not ask
        return layer_format(fmt, name, columns, parse_overrides(self.tensor_formats), from_preset=derived)

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
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
