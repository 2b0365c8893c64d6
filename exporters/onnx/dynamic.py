"""Weight-activation quantization (``WxAyKVz``) and online rotations as ONNX ops, computing what the torch
fake-quant model computes (:mod:`turboboa.activations.dynamic`, :mod:`turboboa.rotation.online`).

* Per-token dynamic quantization of a tensor ``x`` along its last axis (``n`` values): the scale is computed
  in the graph, ``s = Where(m > 0, m, 1)`` with ``m = ReduceMax(|x|) / (2^(b-1) - 1)`` (symmetric) or
  ``m = (max(ReduceMax x, 0) - min(ReduceMin x, 0)) / (2^b - 1)`` (asymmetric, zero point
  ``z = QuantizeLinear(-lo, s)``), then ``DequantizeLinear(QuantizeLinear(x, s, z), s, z)`` with opset 21's
  blocked form (``axis=-1``, ``block_size=n``): one scale per token (per token and head for keys and values),
  in int4/uint4 or int8/uint8. onnxruntime computes it bit for bit like the torch quantizer (same
  true division, round half to even, saturation). ONNX has no 6-bit integer type: A6 is refused.
* The Hadamard transform ``x H_n / sqrt(n)`` in Kronecker form: ``Reshape`` to the factor axes, then per
  factor (last first) ``MatMul`` by the +-1 factor and a ``Transpose`` moving that axis in front, then
  ``Mul`` by ``fp32(1 / sqrt(n))``: the torch transform's operations in its order.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from turboboa.errors import UserError
from turboboa.rotation.hadamard import HadamardTransform

from .builder import GraphBuilder

CONTAINERS = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
              (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}


def check_expressible(act_bits: int, kv_bits: int) -> None:
    """One line naming what ONNX cannot express."""
    for what, bits in (("--act-bits", act_bits), ("--kv-bits", kv_bits)):
        if bits < 16 and (bits, True) not in CONTAINERS:
            raise UserError(f"{what} {bits}: ONNX has no {bits}-bit integer type for QuantizeLinear; quantize with "
                            f"4 or 8 bits to export ONNX")


def dynamic_quantize(b: GraphBuilder, x: str, n: int, bits: int, sym: bool, name: str) -> str:
    """``x_hat`` of ``x`` quantized per vector of its last axis (``n`` values) with scales computed in the
    graph (module docstring)."""
    dtype = CONTAINERS[(bits, sym)]
    with b.scope(name):
        axes = b.const("axes", np.array([-1], dtype=np.int64))
        zero = b.const("zero", np.array(0, dtype=np.float32))
        one = b.const("one", np.array(1, dtype=np.float32))
        if sym:
            qmax = b.const("qmax", np.array(2 ** (bits - 1) - 1, dtype=np.float32))
            peak = b.op("ReduceMax", [b.op("Abs", [x]), axes], "AbsMax", keepdims=1)
            raw = b.op("Div", [peak, qmax], "RawScale")
        else:
            qmax = b.const("qmax", np.array(2**bits - 1, dtype=np.float32))
            hi = b.op("Max", [b.op("ReduceMax", [x, axes], "RowMax", keepdims=1), zero], "Hi")
            lo = b.op("Min", [b.op("ReduceMin", [x, axes], "RowMin", keepdims=1), zero], "Lo")
            raw = b.op("Div", [b.op("Sub", [hi, lo], "Range"), qmax], "RawScale")
        scale = b.op("Where", [b.op("Greater", [raw, zero], "Positive"), raw, one], "Scale")
        if sym:
            q = b.op("QuantizeLinear", [x, scale], "Quantize", axis=-1, block_size=n, output_dtype=dtype)
            return b.op("DequantizeLinear", [q, scale], "Dequantize", axis=-1, block_size=n)
        zp = b.op("QuantizeLinear", [b.op("Neg", [lo], "NegLo"), scale], "ZeroPoint", axis=-1, block_size=1,
                  output_dtype=dtype)
        q = b.op("QuantizeLinear", [x, scale, zp], "Quantize", axis=-1, block_size=n)
        return b.op("DequantizeLinear", [q, scale, zp], "Dequantize", axis=-1, block_size=n)


def hadamard(b: GraphBuilder, x: str, lead: tuple[int, ...], n: int, name: str) -> str:
    """``x H_n / sqrt(n)`` on the last axis of ``x`` of shape ``lead + (n,)`` (``-1`` allowed once in ``lead``)."""
    T = HadamardTransform(n)
    factors = T.factors
    r = len(factors)
    with b.scope(name):
        y = x
        if r > 1:
            shape = np.array([*lead, *(f.shape[0] for f in factors)], dtype=np.int64)
            y = b.op("Reshape", [y, b.const("factor_shape", shape)], "ToFactors")
        k = len(lead)
        for i, F in reversed(list(enumerate(factors))):
            y = b.op("MatMul", [y, b.const(f"H{i}", F.numpy().astype(np.float32))], f"Factor{i}")
            if r > 1:
                perm = [*range(k), k + r - 1, *range(k, k + r - 1)]
                y = b.op("Transpose", [y], f"Move{i}", perm=perm)
        if r > 1:
            y = b.op("Reshape", [y, b.const("shape", np.array([*lead, n], dtype=np.int64))], "FromFactors")
        return b.op("Mul", [y, b.const("scale", np.array(T.scale, dtype=np.float32))], "Scale")
