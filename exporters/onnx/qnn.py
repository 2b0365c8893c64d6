"""The fully quantized decoder graph of ``--profile qnn-htp``: every tensor quantized, every op a QDQ node unit.

Qualcomm's HTP compiler takes a graph whole only when each op reads DequantizeLinear outputs and writes into a
QuantizeLinear (float ops are not run), so this builder emits the program of
:mod:`turboboa.activations.program` with :class:`OnnxOps`: ``op -> QuantizeLinear -> DequantizeLinear`` at
every point, with the QDIR's ``static-graph`` encodings, and movement ops (Reshape, Transpose, Gather of
heads or embedding rows) re-quantized at their input's encoding (an exact round trip). The torch simulation
(:mod:`turboboa.activations.simulate`) runs the same program, so onnxruntime's CPU result equals it up to
float summation order.

Rewrites of what HTP refuses or computes wrongly, each the same function: RMSNorm as one
``RMSNormalization`` op (opset 23); RoPE's ``rotate_half`` as a Gather exchanging the halves with the sign
folded into the sine table (HTP's MatMul by the signed permutation lost ~150 uint16 steps on average); the
attention scale folded into the query's RoPE tables; the causal mask as ``Where`` with a
fill just below the scores' range (a float32-min constant would leave the masked tensor no resolution);
the embedding as a Gather whose output keeps the table's encoding (HTP refuses a Gather that re-scales);
int16 symmetric operands for the activation products at 16 bits (HTP's uint16 x uint16 MatMul is wrong);
explicit zero-point inputs on int4/int8 weights (HTP misreads int4 weights without one).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import GraphProto, TensorProto, helper

from turboboa.activations.encodings import TensorEncoding
from turboboa.activations.points import point_dtype
from turboboa.activations.program import quantize_codes, run_decoder
from turboboa.activations.simulate import GraphConstants, masked_encoding
from turboboa.arch.decoder import DecoderSpec
from turboboa.checkpoint import QuantizedCheckpoint
from turboboa.errors import UserError

from .builder import GraphBuilder
from .profiles import ExportProfile
from .weights import EncodedWeight, encode_weight

INPUT = "input_ids"
OUTPUT = "logits"


class OnnxOps:
    """The :class:`~turboboa.activations.program.Ops` that emit ONNX: each value is a DequantizeLinear output,
    and :attr:`point_of` remembers which encoding it carries."""

    def __init__(self, ckpt: QuantizedCheckpoint, spec: DecoderSpec, hf_config: Any, profile: ExportProfile) -> None:
        encodings = ckpt.activations
        assert encodings is not None and profile.seqlen is not None
        self.ckpt, self.spec, self.profile = ckpt, spec, profile
        self.bits = encodings.bits
        self.encodings: dict[str, TensorEncoding] = dict(encodings.layers)
        self.consts = GraphConstants(ckpt, spec, hf_config, self.bits)
        self.t = int(profile.seqlen)
        self.b = GraphBuilder()
        self.point_of: dict[str, str] = {}
        self.encoded: dict[str, EncodedWeight] = {}
        self._qparams: dict[str, tuple[str, str]] = {}
        self._tables: dict[str, str] = {}
        self._swap: str | None = None
        self._future: str | None = None
        self.embedding_note = "uint16 per tensor (its Gather keeps the table's encoding)"

    # --- quantization --------------------------------------------------------------------------------

    def encoding(self, point: str) -> TensorEncoding:
        """The encoding of ``point``; a missing one means the QDIR was calibrated for another graph."""
        if point.endswith(".masked"):
            return masked_encoding(self.encoding(point.replace(".masked", ".scores")), self.bits, point)[0]
        enc = self.encodings.get(point)
        if enc is None:
            raise UserError(f"{self.ckpt.path} has no activation encoding for {point}; run turboboa calibrate "
                            f"{self.ckpt.path} --act-bits {self.bits} --scope graph again")
        return enc

    def qparams(self, point: str, enc: TensorEncoding | None = None) -> tuple[str, str]:
        """The scale and zero-point initializers of ``point`` (made once)."""
        if point not in self._qparams:
            enc = enc or self.encoding(point)
            dtype = np.dtype(point_dtype(point, self.bits))
            scale = self.b.const(f"{point}.scale", np.array(float(enc.scale), np.float32), scoped=False)
            zero = self.b.const(f"{point}.zero_point", np.array(enc.zero_point, dtype), scoped=False)
            self._qparams[point] = (scale, zero)
        return self._qparams[point]

    def qdq(self, x: str, point: str, name: str, output: str | None = None) -> str:
        """``DequantizeLinear(QuantizeLinear(x))`` at ``point``'s encoding; ``output`` names the last tensor."""
        scale, zero = self.qparams(point)
        q = self.b.op("QuantizeLinear", [x, scale, zero], f"{name}/Quantize")
        names = [output] if output else None
        y = self.b.op("DequantizeLinear", [q, scale, zero], f"{name}/Dequantize", output_names=names)
        self.point_of[y] = point
        return y

    def constant(self, key: str, codes: np.ndarray, enc: TensorEncoding) -> str:
        """A quantized constant: its codes and a DequantizeLinear (per-tensor encoding of its own)."""
        scale, zero = self.qparams(key, enc)
        codes_name = self.b.const(f"{key}.quantized", codes, scoped=False)
        return self.b.op("DequantizeLinear", [codes_name, scale, zero], f"{key}/Dequantize")

    def move(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        """A movement op on ``inputs[0]``, re-quantized at that value's encoding (exact)."""
        point = self.point_of[inputs[0]]
        return self.qdq(self.b.op(op, inputs, f"{name}/{op}", **attrs), point, f"{name}/{op}")

    def shape(self, name: str, *dims: int) -> str:
        return self.b.const(f"{name}/shape", np.array(dims, dtype=np.int64), scoped=False)

    # --- the program's ops -----------------------------------------------------------------------------

    def embed(self, ids: str) -> str:
        codes, enc = self.consts.embedding
        name = self.spec.embedding
        scale, zero = self.qparams(name, enc)
        table = self.b.const(f"{name}.quantized", codes, scoped=False)
        table = self.b.op("DequantizeLinear", [table, scale, zero], f"{name}/Dequantize")
        gathered = self.b.op("Gather", [table, ids], f"{name}/Gather", axis=0)
        return self.qdq(gathered, name, f"{name}/Gather")

    def rms_norm(self, x: str, name: str) -> str:
        gamma = self.constant(f"{name}.weight", *self.consts.norm_weight(name))
        y = self.b.op("RMSNormalization", [x, gamma], f"{name}/RMSNormalization", axis=-1,
                      epsilon=float(self.spec.eps))
        return self.qdq(y, name, name)

    def weight(self, name: str) -> str:
        q = self.ckpt.layers.get(name)
        if q is None:
            raise UserError(f"--profile qnn-htp needs every linear layer quantized, but {name} is float in "
                            f"{self.ckpt.path}; quantize the whole model")
        encoded = encode_weight(self.b, name, q, self.profile)
        self.encoded[name] = encoded
        return encoded.output

    def linear(self, x: str, name: str) -> str:
        y = self.b.op("MatMul", [x, self.weight(name)], f"{name}/MatMul")
        if f"{name}.bias" not in self.ckpt.float_tensors:
            return self.qdq(y, name, name)
        y = self.qdq(y, f"{name}.matmul", f"{name}/MatMul")
        bias = self.constant(f"{name}.bias", *self.consts.bias(name))
        return self.qdq(self.b.op("Add", [y, bias], f"{name}/BiasAdd"), name, f"{name}/BiasAdd")

    def head(self, x: str) -> str:
        head = self.spec.head
        if self.consts.head is None:
            weight = self.weight(head)
        else:
            codes, scale = self.consts.head
            inputs = [self.b.const(f"{head}.weight_q", np.ascontiguousarray(codes.T), scoped=False),
                      self.b.const(f"{head}.weight_scale", scale, scoped=False),
                      self.b.const(f"{head}.weight_zero_point", np.zeros(scale.shape, np.int8), scoped=False)]
            weight = self.b.op("DequantizeLinear", inputs, f"{head}/DequantizeLinear", axis=1)
        y = self.b.op("MatMul", [x, weight], f"{head}/MatMul")
        return self.qdq(y, head, head, output=OUTPUT)

    def heads(self, x: str, n: int, name: str) -> str:
        split = self.move("Reshape", [x, self.shape(f"{name}/heads", 1, self.t, n, self.spec.head_dim)], name)
        return self.move("Transpose", [split], f"{name}/heads", perm=[0, 2, 1, 3])

    def merge_heads(self, x: str, name: str) -> str:
        merged = self.move("Transpose", [x], f"{name}/merge", perm=[0, 2, 1, 3])
        width = self.spec.heads * self.spec.head_dim
        return self.move("Reshape", [merged, self.shape(f"{name}/merge", 1, self.t, width)], f"{name}/merge")

    def repeat_kv(self, x: str, name: str) -> str:
        spec = self.spec
        if spec.heads == spec.kv_heads:
            return x
        index = np.arange(spec.heads, dtype=np.int64) // (spec.heads // spec.kv_heads)
        kv_of_head = self.b.const(f"{name}/kv_of_head", index, scoped=False)
        return self.move("Gather", [x, kv_of_head], f"{name}/repeat_kv", axis=1)

    def transpose_keys(self, x: str, name: str) -> str:
        return self.move("Transpose", [x], f"{name}/keys", perm=[0, 1, 3, 2])

    def swap_halves(self, x: str, name: str) -> str:
        if self._swap is None:
            self._swap = self.b.const("rope.swap_index", self.consts.swap, scoped=False)
        return self.move("Gather", [x, self._swap], name, axis=3)

    def rope_table(self, which: str) -> str:
        key = f"rope.{which}"
        if key not in self._tables:
            codes, enc = self.consts.rope[which]
            self._tables[key] = self.constant(key, np.ascontiguousarray(codes[: self.t]), enc)
        return self._tables[key]

    def elementwise(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        return self.qdq(self.b.op(op, inputs, f"{name}/{op}", **attrs), name, name)

    def matmul(self, a: str, b: str, name: str) -> str:
        return self.elementwise("MatMul", [a, b], name)

    def mul(self, a: str, b: str, name: str) -> str:
        return self.elementwise("Mul", [a, b], name)

    def add(self, a: str, b: str, name: str) -> str:
        return self.elementwise("Add", [a, b], name)

    def sigmoid(self, x: str, name: str) -> str:
        return self.elementwise("Sigmoid", [x], name)

    def softmax(self, x: str, name: str) -> str:
        return self.elementwise("Softmax", [x], name, axis=-1)

    def convert(self, x: str, name: str) -> str:
        return self.qdq(x, name, f"{name}/Convert")

    def mask(self, scores: str, name: str) -> str:
        enc, fill = masked_encoding(self.encoding(name.replace(".masked", ".scores")), self.bits, name)
        dtype = point_dtype(name, self.bits)
        if self._future is None:
            future = np.triu(np.ones((self.t, self.t), dtype=bool), k=1)
            self._future = self.b.const("causal_future", future, scoped=False)
        scale, zero = self.qparams(name, enc)
        fill_codes = self.b.const(f"{name}.fill", quantize_codes(np.array(fill, np.float32), enc, dtype), scoped=False)
        fill_value = self.b.op("DequantizeLinear", [fill_codes, scale, zero], f"{name}/fill")
        return self.qdq(self.b.op("Where", [self._future, fill_value, scores], f"{name}/Where"), name, name)


def build_quantized_decoder(ckpt: QuantizedCheckpoint, spec: DecoderSpec, hf_config: Any,
                            profile: ExportProfile) -> tuple[GraphProto, OnnxOps]:
    """The fully quantized decoder graph of ``ckpt`` (``input_ids`` int64 ``[1, T]`` -> ``logits`` float32)."""
    if profile.seqlen is None or profile.seqlen > spec.max_positions:
        raise UserError(f"--profile {profile.name} needs a static --seqlen of at most {spec.max_positions}")
    ops = OnnxOps(ckpt, spec, hf_config, profile)
    run_decoder(ops, spec, INPUT)
    left = sorted(set(ckpt.layers) - set(ops.encoded) - {spec.embedding})
    if left:
        raise UserError(f"the qnn-htp graph has no place for {left[0]}; this checkpoint's architecture differs "
                        f"from what the exporter computes")
    t = int(profile.seqlen)
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.INT64, [1, t])]
    outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, t, spec.vocab])]
    graph = helper.make_graph(ops.b.nodes, "turboboa_quantized_decoder", inputs, outputs,
                              initializer=ops.b.initializers)
    return graph, ops


__all__ = ["OnnxOps", "build_quantized_decoder"]
