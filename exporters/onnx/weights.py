"""One quantized linear layer as integer initializers feeding DequantizeLinear, the QDQ weight pattern.

For a layer with codes ``Z`` ``(N, K)`` (HF layout: one row per output), scales ``S`` and zero points
``Z0`` ``(N, n_groups)`` the graph holds, in MatMul layout ``[K, N]`` (``y = x @ W_hat^T``):

* ``<layer>.weight_q``: ``Z^T`` (or ``(Z - Z0)^T``, see :mod:`.containers`) in the layer's container;
* ``<layer>.weight_scale``: ``S^T`` float32, an exact copy: ``[ceil(K/g), N]`` for groups of ``g`` (the last
  group may be short), ``[N]`` per output channel;
* ``<layer>.weight_zero_point``: ``Z0^T`` in the same container, only for containers with a zero point (zeros
  in the signed container when the profile asks for an explicit zero point: QNN HTP computes int4 weights
  wrongly without one);
* ``DequantizeLinear(axis=0, block_size=g)`` (blocked) or ``DequantizeLinear(axis=1)`` (per channel), whose
  output ``<layer>.weight_dq`` ``[K, N]`` feeds the MatMul directly and equals
  ``QuantizedLinear.dequantize().T`` bit for bit: ``(x - zp) * s`` with an exact integer ``x - zp``.

A layer's encoder is chosen by the ``onnx_encoding`` its format (``QuantizedLinear.fmt``) declares
(:data:`ENCODINGS`): ``"uniform"``, the uniform grid ``int`` (:func:`encode_uniform`, as above); ``"levels"``,
the ggml types, of which DequantizeLinear holds those whose dequantization is ``scale_g * (q - l_0)`` with no
offset (q4_0, q5_0, q8_0, q3_k, q6_k; :func:`encode_levels`: ``x`` the signed level, ``s`` the exact float32
group scale, so the same QDIR exports to GGUF and ONNX with identical weights); ``"lpbq"``, Qualcomm's LPBQ
(``lpbq4`` and its block-size variants, :func:`encode_lpbq`), whose pattern is ORT's (``lpbqmatmul_fusion``): uint8 block multipliers
``k`` ``[ceil(K/B), N]`` -> DequantizeLinear(axis=1, per-channel float32 scale ``s`` ``[N]``) -> float32 block
scales -> DequantizeLinear(int4 weight ``[K, N]``, axis=0, block_size=B) -> MatMul, zero points 0 (int4 /
uint8 zero tensors, from which QNN reads the types).
Every other format (a float offset: q4_1, q5_1, q2_k, q4_k, q5_k; non-uniform levels: iq4_nl) is refused in
one line; :func:`onnx_expressible` and :func:`check_onnx_format` let a command refuse before quantizing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from turboboa.errors import UserError
from turboboa.formats import all_format_names, get_format
from turboboa.formats.iquant import CodebookFormat
from turboboa.quantized import QuantizedLinear

from .builder import GraphBuilder
from .containers import INT4, LEVEL_FORMATS, UINT8, Container, level_container
from .profiles import ExportProfile, make_profile

WEIGHT_SUFFIX = ".weight_dq"


@dataclass(frozen=True)
class EncodedWeight:
    """Where a layer's dequantized weight ``[K, N]`` appears in the graph, and how it is stored."""

    output: str
    container: str
    bits: int
    fmt: str


Encoder = Callable[[GraphBuilder, str, QuantizedLinear, ExportProfile], EncodedWeight]


def group_count(columns: int, group_size: int) -> int:
    """``ceil(K / g)`` groups per row for groups of ``g`` columns, 1 per output channel (``g <= 0``)."""
    return 1 if group_size <= 0 else math.ceil(columns / group_size)


def expand_columns(params: np.ndarray, group_size: int, columns: int) -> np.ndarray:
    """Per-(row, group) values ``(N, n_groups)`` repeated to per-(row, column) ``(N, K)``: column ``c`` takes
    group ``c // g`` (a short last group when ``g`` does not divide ``K``)."""
    if params.shape[1] == 1:
        return np.broadcast_to(params, (params.shape[0], columns))
    return np.repeat(params, group_size, axis=1)[:, :columns]


def _checked_arrays(name: str, q: QuantizedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (int16), scales and zero points (float32) of ``q`` as numpy, after checking that shapes agree,
    codes lie on the ``b``-bit grid, zero points are integers and scales are finite."""
    codes = q.codes.numpy().astype(np.int16)
    scale = np.ascontiguousarray(q.scale.float().numpy())
    zero = np.ascontiguousarray(q.zero.float().numpy())
    rows, columns = codes.shape
    expected = (rows, group_count(columns, q.group_size))
    damaged = f"{name} in the QDIR is damaged"
    if scale.shape != expected or zero.shape != expected:
        raise UserError(f"{damaged}: scales {scale.shape} and zero points {zero.shape} should be {expected} "
                        f"for groups of {q.group_size}; quantize again")
    if codes.size and (codes.min() < 0 or codes.max() > 2**q.bits - 1):
        raise UserError(f"{damaged}: codes outside [0, {2**q.bits - 1}] for {q.bits} bits; quantize again")
    if not np.all(np.isfinite(scale)) or not np.all(zero == np.round(zero)):
        raise UserError(f"{damaged}: a scale is not finite or a zero point is not an integer; quantize again")
    return codes, scale, zero


def _fit(name: str, values: np.ndarray, container: Container, what: str) -> np.ndarray:
    """``values`` cast to the container's type, after checking they lie in its range."""
    if values.size and (values.min() < container.lo or values.max() > container.hi):
        raise UserError(f"{name}: {what} in [{int(values.min())}, {int(values.max())}] do not fit "
                        f"{container.name} [{container.lo}, {container.hi}]; the QDIR's grid is not a standard "
                        f"uniform grid; quantize again")
    return np.ascontiguousarray(values.astype(container.dtype))


def inputs_shape(scale: np.ndarray, per_channel: bool) -> tuple[int, ...]:
    """Shape of the DequantizeLinear scale (and zero point) input of a layer with scales ``scale`` ``(N, g)``."""
    return (scale.shape[0],) if per_channel else (scale.shape[1], scale.shape[0])


def encode_uniform(b: GraphBuilder, name: str, q: QuantizedLinear, profile: ExportProfile) -> EncodedWeight:
    """Emit the initializers and the DequantizeLinear of a uniform-grid layer (see the module docstring)."""
    codes, scale, zero = _checked_arrays(name, q)
    rows, columns = codes.shape
    container = profile.container(q)
    per_channel = scale.shape[1] == 1
    if container.zero_point:
        stored = codes
        zero_point = _fit(name, zero.T if not per_channel else zero[:, 0], container, "zero points")
    else:  # x = z - z0: exact integers, no zero point
        stored = codes - expand_columns(zero, q.group_size, columns).astype(np.int16)
        zero_point = None
    weight = _fit(name, stored.T, container, "codes")
    inputs = [b.const(f"{name}.weight_q", weight, scoped=False),
              b.const(f"{name}.weight_scale", np.ascontiguousarray(scale[:, 0] if per_channel else scale.T),
                      scoped=False)]
    if zero_point is None and profile.explicit_zero_point:  # the same x - 0, but HTP needs the input
        zero_point = np.zeros(inputs_shape(scale, per_channel), dtype=container.dtype)
    if zero_point is not None:
        inputs.append(b.const(f"{name}.weight_zero_point", zero_point, scoped=False))
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": int(q.group_size)}
    out = b.op("DequantizeLinear", inputs, output_names=[f"{name}{WEIGHT_SUFFIX}"],
               name=f"{name}/DequantizeLinear", **attrs)
    return EncodedWeight(out, container.label, q.bits, q.fmt)


def _checked_grid(name: str, q: QuantizedLinear) -> None:
    """Refuse (one line: the QDIR is damaged) a format layer whose codes and grid do not fit its format."""
    fmt = get_format(q.fmt)
    if q.grid is None:
        raise UserError(f"{name} in the QDIR is damaged: a {q.fmt} layer without its grid; quantize again")
    if not fmt.supports_width(q.shape[1]):
        raise UserError(f"{name} in the QDIR is damaged: {q.shape[1]} columns are not whole {q.fmt} blocks "
                        f"of {fmt.block_size}; quantize again")
    try:
        fmt.check_grid(q.codes, q.grid)
    except ValueError as e:
        raise UserError(f"{name} in the QDIR is damaged ({e}); quantize again") from None


def encode_levels(b: GraphBuilder, name: str, q: QuantizedLinear, profile: ExportProfile) -> EncodedWeight:
    """Emit a ggml layer of a symmetric type with consecutive integer levels as one blocked DequantizeLinear.

    ``w[r, c] = fp32(scale_g[r, g] * level[code[r, c]])``, ``g = c // G`` (ggml's dequantizer, and
    :meth:`QuantizedLinear.dequantize`), is stored as ``x = level[code]^T`` ``[K, N]`` in the format's signed
    container (q4_0 ``q - 8`` and q3_k ``q - 4`` in int4; q5_0 ``q - 16``, q8_0 ``q - 128``, q6_k ``q - 32``
    in int8), no zero point, ``scale = scale_g^T`` ``[K/G, N]`` float32 from the format's own
    ``group_scale_offset`` (``d``, or ``fp32(d * sc_g)`` for the k-quants, an exact product), and
    ``DequantizeLinear(axis=0, block_size=G)`` with ``G`` the format's group (32, or 16 for q3_k/q6_k):
    ``(x - 0) * scale`` is the same single fp32 rounding of the same two numbers, so the output equals the
    fake-quant weight (and the GGUF file's weight) bit for bit.
    """
    _checked_grid(name, q)
    fmt = get_format(q.fmt)
    container = level_container(q.fmt)
    assert container is not None and q.grid is not None, q.fmt
    scale, offset = fmt.group_scale_offset(q.grid)
    if bool((offset != 0).any()) or not bool(torch.isfinite(scale).all()):
        raise UserError(f"{name} in the QDIR is damaged: a {q.fmt} grid with an offset or a non-finite scale; "
                        f"quantize again")
    levels = fmt.levels.numpy().astype(np.int16)[q.codes.numpy().astype(np.int64)]  # (N, K) signed levels
    inputs = [b.const(f"{name}.weight_q", _fit(name, levels.T, container, "levels"), scoped=False),
              b.const(f"{name}.weight_scale", np.ascontiguousarray(scale.float().numpy().T), scoped=False)]
    out = b.op("DequantizeLinear", inputs, output_names=[f"{name}{WEIGHT_SUFFIX}"],
               name=f"{name}/DequantizeLinear", axis=0, block_size=int(fmt.group_size))
    return EncodedWeight(out, container.label, fmt.bits, q.fmt)


def encode_lpbq(b: GraphBuilder, name: str, q: QuantizedLinear, profile: ExportProfile) -> EncodedWeight:
    """Emit ORT's LPBQ weight pattern (see the module docstring) for an LPBQ layer; its output equals
    ``QuantizedLinear.dequantize().T`` bit for bit: ``fp32(fp32(k * s) * (code - 8))``."""
    _checked_grid(name, q)
    fmt = get_format(q.fmt)
    rows = q.codes.shape[0]
    weight = (q.codes.numpy().astype(np.int16) - 8).T  # q in [-8, 7]
    multipliers = q.grid.sc.numpy().astype(np.int16).T  # k in [1, 16], [n_blocks, N]
    channel_scale = np.ascontiguousarray(q.grid.d[:, 0].float().numpy())
    with b.scope(name):
        block_scale = b.op("DequantizeLinear", [
            b.const(f"{name}.weight_block_scale_q", _fit(name, multipliers, UINT8, "block multipliers"),
                    scoped=False),
            b.const(f"{name}.weight_channel_scale", channel_scale, scoped=False),
            b.const(f"{name}.weight_block_scale_zero_point", np.zeros(rows, dtype=np.uint8), scoped=False),
        ], "BlockScale/DequantizeLinear", axis=1)
    zero_point = np.zeros(multipliers.shape, dtype=INT4.dtype)
    inputs = [b.const(f"{name}.weight_q", _fit(name, weight, INT4, "codes"), scoped=False), block_scale,
              b.const(f"{name}.weight_zero_point", zero_point, scoped=False)]
    out = b.op("DequantizeLinear", inputs, output_names=[f"{name}{WEIGHT_SUFFIX}"],
               name=f"{name}/DequantizeLinear", axis=0, block_size=int(fmt.block_size))
    return EncodedWeight(out, "int4+lpbq", q.bits, q.fmt)


# The encoder of each ``Format.onnx_encoding``, in the order refusals list the formats.
ENCODINGS: dict[str, Encoder] = {"uniform": encode_uniform, "lpbq": encode_lpbq, "levels": encode_levels}


def _encodes(name: str, encoding: str) -> bool:
    """True when format ``name`` declares ``encoding`` and DequantizeLinear holds it (for ``"levels"``: its
    level table fits a container exactly, :func:`~.containers.level_container`)."""
    return get_format(name).onnx_encoding == encoding and (encoding != "levels" or name in LEVEL_FORMATS)


# Every format an ONNX export takes ("int", the LPBQ block sizes, q4_0, q5_0, q8_0, q3_k, q6_k) -> its encoder.
ENCODERS: dict[str, Encoder] = {name: encoder for encoding, encoder in ENCODINGS.items()
                                for name in all_format_names() if _encodes(name, encoding)}
ONNX_FORMATS = frozenset(ENCODERS)
# How a refusal names them: by family (lpbq4 takes --group-size 16/32/64/128).
_FAMILIES = list(dict.fromkeys(get_format(name).family for name in ENCODERS))
ONNX_FORMAT_LIST = ", ".join(_FAMILIES[:-1]) + f" or {_FAMILIES[-1]}"


def onnx_expressible(fmt: str) -> bool:
    """True when layers stored as ``fmt`` export to ONNX QDQ (:data:`ONNX_FORMATS`), under some profile."""
    return fmt.lower() in ONNX_FORMATS


def _why_not(fmt: str) -> str:
    """Why the storage format ``fmt`` has no DequantizeLinear form: a float offset or non-uniform levels."""
    f = get_format(fmt)
    if issubclass(f, CodebookFormat):
        return f"a lattice codebook (each {f.dim} weights one codeword, no per-weight integer code)"
    if f.asymmetric:
        return "a float offset per group (w = s*q - o, o/s not an integer zero point)"
    return "non-uniform levels"


def refusal(fmt: str, name: str | None = None) -> str:
    """The one-line refusal of a storage format ONNX QDQ cannot express, for layer ``name`` or ``--format``."""
    who = f"{name} is stored as the ggml type {fmt}" if name else f"--format {fmt} is a ggml type"
    return (f"{who} with {_why_not(fmt)}, which ONNX QDQ cannot express; export it with --to gguf, or "
            f"quantize again with --format {ONNX_FORMAT_LIST} to export ONNX")


def check_onnx_format(fmt: str, profile: str | ExportProfile = "generic") -> None:
    """Raise the one-line :class:`UserError` an ONNX export would give for layers stored as ``fmt`` under
    ``profile``, before anything is quantized: a format without a DequantizeLinear form, or fixed blocks the
    profile does not take (``npu``: q3_k and q6_k, groups of 16). The uniform grid's group size and symmetry
    are checked per layer at export (:meth:`ExportProfile.check_layer`)."""
    fmt = fmt.lower()
    if not onnx_expressible(fmt):
        raise UserError(refusal(fmt))  # an unknown name: get_format's own one-line error
    rules = make_profile(profile) if isinstance(profile, str) else profile
    rules.check_format(fmt)


def encode_weight(b: GraphBuilder, name: str, q: QuantizedLinear, profile: ExportProfile) -> EncodedWeight:
    """The DequantizeLinear output ``[K, N]`` of layer ``name``, after the profile's check; a storage format
    without an ONNX encoder is a one-line :class:`UserError`."""
    encoder = ENCODERS.get(q.fmt)
    if encoder is None:
        raise UserError(refusal(q.fmt, name))
    profile.check_layer(name, q)
    return encoder(b, name, q, profile)
