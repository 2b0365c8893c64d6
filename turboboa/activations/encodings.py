"""Static activation quantization: one per-tensor uint8/uint16 encoding for the input of every quantized
linear layer, and its simulation in the torch fake-quant model.

An encoding is a float32 scale ``s`` and an integer zero point ``zp`` in ``[0, 2^b - 1]`` (asymmetric, the
ORT/QNN convention for activations). The simulated input of the layer is

    x_hat = (clamp(round_half_even(x / s) + zp, 0, 2^b - 1) - zp) * s          (float32)

which is onnxruntime's ``QuantizeLinear`` (``saturate(round_half_even(x / s) + zp)``) followed by
``DequantizeLinear`` (``(q - zp) * s``). The division is explicit (``x / s``, correctly rounded like ORT's),
not ``x * (1 / s)`` as ``torch.fake_quantize_per_tensor_affine`` computes it, which differs on exact ``.5``
ties (reference ``onnx-qdq.md`` §5 item 5); ``q - zp`` is an exact integer, so the last product rounds once.

Calibration (:mod:`.calibrate`) observes the min and max of each layer's input (``min-max``): with
``lo = min(x_min, 0)`` and ``hi = max(x_max, 0)``, ``s = fp32((hi - lo) / (2^b - 1))`` and
``zp = clamp(round(-lo / s), 0, 2^b - 1)``, so 0 is exactly representable and the observed range is covered
(up to the rounding of ``zp``). An input that is all zeros gets ``s = 1, zp = 0``.

``scheme`` is "static" (calibrated per-tensor scales); a later dynamic per-token scheme fits beside it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from turboboa.errors import UserError

from .points import GRAPH_SCHEME, dtype_range, point_dtype

ACT_BITS = (8, 16)
SCHEME = "static"
GRANULARITY = "per-tensor"
OBSERVER = "minmax"


def check_act_bits(bits: int | None) -> None:
    """A one-line :class:`UserError` unless ``bits`` is None or a supported static activation width."""
    if bits is not None and bits not in ACT_BITS:
        raise UserError(f"--act-bits {bits} is not supported for static activation quantization; "
                        f"choose 8 or 16")


def dtype_name(bits: int) -> str:
    """``uint8`` or ``uint16``: the ONNX element type of the quantized activation."""
    return f"uint{bits}"


@dataclass(frozen=True)
class TensorEncoding:
    """One per-tensor encoding: ``scale`` (0-d float32), integer ``zero_point``, and the observed range."""

    scale: torch.Tensor
    zero_point: int
    lo: float
    hi: float


def encoding_from_range(lo: float, hi: float, bits: int) -> TensorEncoding:
    """Min-max encoding covering ``[min(lo, 0), max(hi, 0)]`` with ``2^bits`` levels (module docstring)."""
    qmax = 2**bits - 1
    lo_, hi_ = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = torch.tensor((hi_ - lo_) / qmax, dtype=torch.float32)
    if not bool(torch.isfinite(scale)) or float(scale) <= 0:
        return TensorEncoding(torch.tensor(1.0, dtype=torch.float32), 0, float(lo), float(hi))
    zero_point = int(min(max(round(-lo_ / float(scale)), 0), qmax))
    return TensorEncoding(scale, zero_point, float(lo), float(hi))


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: int, bits: int) -> torch.Tensor:
    """``(clamp(round_half_even(x / s) + zp, 0, 2^b - 1) - zp) * s`` in float32, returned in ``x``'s dtype."""
    s = scale.to(device=x.device, dtype=torch.float32)
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + zero_point, 0, 2**bits - 1)
    return ((q - zero_point) * s).to(x.dtype)


@dataclass
class ActivationEncodings:
    """The encodings of a QDIR: ``bits`` (8 or 16), one :class:`TensorEncoding` per layer input (full module
    names), how they were made (``scheme``, ``granularity``, ``observer``) and on which data
    (``calibration``)."""

    bits: int
    layers: dict[str, TensorEncoding]
    scheme: str = SCHEME
    granularity: str = GRANULARITY
    observer: str = OBSERVER
    calibration: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What the encodings are, without the per-layer numbers (for JSON reports and metadata)."""
        return {"scheme": self.scheme, "bits": self.bits, "dtype": dtype_name(self.bits),
                "granularity": self.granularity, "observer": self.observer, "layers": len(self.layers),
                "calibration": self.calibration}

    def label(self) -> str:
        """``static uint8 per-tensor (minmax)``."""
        return f"{self.scheme} {dtype_name(self.bits)} {self.granularity} ({self.observer})"

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors (``<layer>.scale`` 0-d float32, ``.zero_point`` 0-d int32, ``.min``/``.max`` 0-d float32)
        and the safetensors metadata (the summary as JSON)."""
        tensors: dict[str, torch.Tensor] = {}
        for name, e in self.layers.items():
            tensors[f"{name}.scale"] = e.scale.to(torch.float32).reshape(()).clone()
            tensors[f"{name}.zero_point"] = torch.tensor(e.zero_point, dtype=torch.int32)
            tensors[f"{name}.min"] = torch.tensor(e.lo, dtype=torch.float32)
            tensors[f"{name}.max"] = torch.tensor(e.hi, dtype=torch.float32)
        return tensors, {"summary": json.dumps(self.summary(), sort_keys=True)}

    @classmethod
    def from_tensors(cls, summary: dict[str, Any], tensors: dict[str, torch.Tensor]) -> ActivationEncodings:
        """Inverse of :meth:`to_tensors` (``summary`` from ``quant_config.json``)."""
        bits = int(summary["bits"])
        check_act_bits(bits)
        names = sorted({key.rsplit(".", 1)[0] for key in tensors})
        layers = {n: TensorEncoding(tensors[f"{n}.scale"].to(torch.float32), int(tensors[f"{n}.zero_point"]),
                                    float(tensors[f"{n}.min"]), float(tensors[f"{n}.max"])) for n in names}
        scheme = summary.get("scheme", SCHEME)
        for n, e in layers.items():
            lo, hi = zero_point_range(n, bits, scheme)
            if not (float(e.scale) > 0 and lo <= e.zero_point <= hi):
                raise UserError(f"the activation encoding of {n} is damaged (scale {float(e.scale)}, "
                                f"zero point {e.zero_point}); run turboboa calibrate again")
        return cls(bits, layers, scheme, summary.get("granularity", GRANULARITY),
                   summary.get("observer", OBSERVER), dict(summary.get("calibration", {})))


def zero_point_range(name: str, bits: int, scheme: str) -> tuple[int, int]:
    """The integer range of the zero point of ``name``'s encoding: ``[0, 2^bits - 1]`` for the linear inputs;
    the point's own type for the whole-graph scheme (:func:`~.points.point_dtype`)."""
    return dtype_range(point_dtype(name, bits)) if scheme == GRAPH_SCHEME else (0, 2**bits - 1)


def _input_hook(encoding: TensorEncoding, bits: int) -> Callable[[nn.Module, tuple], tuple]:
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (fake_quant(args[0], encoding.scale, encoding.zero_point, bits), *args[1:])

    return hook


def install_input_quantization(model: nn.Module, encodings: ActivationEncodings,
                               names: list[str] | None = None) -> list[Any]:
    """Forward pre-hooks on ``model``'s linear layers (all of ``encodings``, or ``names``) that replace each
    input by its :func:`fake_quant`; returns the hook handles (``.remove()`` undoes them)."""
    handles = []
    for name in encodings.layers if names is None else names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            for h in handles:
                h.remove()
            raise UserError(f"the activation encodings name {name}, which the model does not have; run "
                            f"turboboa calibrate again") from None
        handles.append(module.register_forward_pre_hook(_input_hook(encodings.layers[name], encodings.bits)))
    return handles
