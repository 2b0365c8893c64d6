"""One quantized linear layer as integer initializers feeding DequantizeLinear, the QDQ weight pattern.

For a layer with codes ``Z`` ``(N, K)`` (HF layout: one row per output), scales ``S`` and zero points
``Z0`` ``(N, n_groups)`` the graph holds, in MatMul layout ``[K, N]`` (``y = x @ W_hat^T``):

* ``<layer>.weight_q``: ``Z^T`` (or ``(Z - Z0)^T``, see :mod:`.containers`) in the layer's container;
* ``<layer>.weight_scale``: ``S^T`` float32, an exact copy: ``[ceil(K/g), N]`` for groups of ``g`` (the last
  group may be short), ``[N]`` per output channel;
* ``<layer>.weight_zero_point``: ``Z0^T`` in the same container, only for containers with a zero point;
* ``DequantizeLinear(axis=0, block_size=g)`` (blocked) or ``DequantizeLinear(axis=1)`` (per channel), whose
  output ``<layer>.weight_dq`` ``[K, N]`` feeds the MatMul directly and equals
  ``QuantizedLinear.dequantize().T`` bit for bit: ``(x - zp) * s`` with an exact integer ``x - zp``.

Encoders are registered by the layer's storage format (``QuantizedLinear.fmt``): the uniform grid
(``"int"``) and Qualcomm's LPBQ (``lpbq4`` and its block-size variants, :func:`encode_lpbq`), whose pattern is
ORT's (``lpbqmatmul_fusion``): uint8 block multipliers ``k`` ``[ceil(K/B), N]`` -> DequantizeLinear(axis=1,
per-channel float32 scale ``s`` ``[N]``) -> float32 block scales -> DequantizeLinear(int4 weight ``[K, N]``,
axis=0, block_size=B) -> MatMul, zero points 0 (int4 / uint8 zero tensors, from which QNN reads the types).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from turboboa.errors import UserError
from turboboa.formats import get_format
from turboboa.formats.lpbq import LPBQ_BLOCKS
from turboboa.quantized import UNIFORM, QuantizedLinear

from .builder import GraphBuilder
from .containers import INT4, UINT8, Container
from .profiles import ExportProfile

WEIGHT_SUFFIX = ".weight_dq"


@dataclass(frozen=True)
class EncodedWeight:
    """Where a layer's dequantized weight ``[K, N]`` appears in the graph, and how it is stored."""

    output: str
    container: str
    bits: int


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
    if zero_point is not None:
        inputs.append(b.const(f"{name}.weight_zero_point", zero_point, scoped=False))
    attrs = {"axis": 1} if per_channel else {"axis": 0, "block_size": int(q.group_size)}
    out = b.op("DequantizeLinear", inputs, output_names=[f"{name}{WEIGHT_SUFFIX}"],
               name=f"{name}/DequantizeLinear", **attrs)
    return EncodedWeight(out, container.label, q.bits)


def encode_lpbq(b: GraphBuilder, name: str, q: QuantizedLinear, profile: ExportProfile) -> EncodedWeight:
    """Emit ORT's LPBQ weight pattern (see the module docstring) for an LPBQ layer; its output equals
    ``QuantizedLinear.dequantize().T`` bit for bit: ``fp32(fp32(k * s) * (code - 8))``."""
    fmt = get_format(q.fmt)
    if q.grid is None:
        raise UserError(f"{name} in the QDIR is damaged: an {q.fmt} layer without its grid; quantize again")
    try:
        fmt.check_grid(q.codes, q.grid)
    except ValueError as e:
        raise UserError(f"{name} in the QDIR is damaged ({e}); quantize again") from None
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
    return EncodedWeight(out, "int4+lpbq", q.bits)


ENCODERS: dict[str, Encoder] = {UNIFORM: encode_uniform, **{fmt: encode_lpbq for fmt in LPBQ_BLOCKS.values()}}


def encode_weight(b: GraphBuilder, name: str, q: QuantizedLinear, profile: ExportProfile) -> EncodedWeight:
    """The DequantizeLinear output ``[K, N]`` of layer ``name``, after the profile's check; a storage format
    without an ONNX encoder is a one-line :class:`UserError`."""
    encoder = ENCODERS.get(q.fmt)
    if encoder is None:
        raise UserError(f"{name} is stored as the ggml type {q.fmt}, which ONNX QDQ cannot express; export it "
                        f"with --to gguf, or quantize again with --format int or lpbq4 to export ONNX")
    profile.check_layer(name, q)
    return encoder(b, name, q, profile)
