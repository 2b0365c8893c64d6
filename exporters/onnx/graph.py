"""A family's decoder as an ONNX graph: ``input_ids`` int64 ``[1, T]`` -> ``logits`` float32 ``[1, T, V]``.

What the graph computes comes from the family's :class:`~turboboa.arch.decoder.DecoderSpec` (its adapter),
and every tensor is named by role through the spec's layout. Equations (``D`` hidden, ``H`` query heads,
``G`` KV heads, ``d`` head size, ``r = H / G``):

* ``h_0 = E[input_ids]`` (Gather), times the spec's ``embed_scale`` where it has one (Gemma's ``sqrt(D)``),
  plus ``P[t + offset]`` (a Slice of the learned position table) for a family with learned positions;
* per block ``i``: ``x = Norm(h)``, ``q, k, v = x W_q^T (+ b_q), ...`` split into heads, each head's
  queries and keys through their own ``Norm`` over ``d`` where the layout has per-head norms (Qwen3, Gemma
  3), with RoPE ``q~ = q * cos_i + rotate_half(q) * sin_i`` (same for ``k``; the block's table, Gemma's local
  or global base) for a RoPE family, KV heads repeated so query head ``h`` reads KV head ``h // r``,
  ``A = softmax(q~ k~^T s + M_i)`` with the spec's score scale ``s`` and the causal mask ``M_i`` (0 where key
  ``j <= i`` and, on a sliding-window block, ``i - j < window``; float32 min elsewhere),
  ``o = concat_h(A v) W_o^T (+ b_o)``, ``h += Norm(o)`` with the attention's post-norm where the layout has
  one (Gemma 3) else ``h += o``; then ``y = Norm(h)`` and ``z = (act(y W_gate^T) * (y W_up^T)) W_down^T`` with
  ``silu(a) = a * sigmoid(a)`` or ``gelu_tanh(a) = a/2 (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))`` (gated MLP)
  or ``z = relu(y W_up^T + b_up) W_down^T + b_down`` (ungated), ``h += Norm(z)`` or ``h += z`` likewise;
* ``Norm`` is ``RMSNorm(x) = x * 1 / sqrt(mean(x^2) + eps) * (offset + w)`` over the last axis (offset 1 for
  Gemma's stored ``w``, else 0), or ONNX's ``LayerNormalization`` ``(x - mean(x)) / sqrt(var(x) + eps) * w + b``,
  with the spec's ``eps``;
* ``logits = Norm(h_L) W_head^T``, ``W_head = E`` when the embeddings are tied.

Every quantized linear weight comes from its DequantizeLinear (:mod:`.weights`) and feeds the MatMul directly.
With static activation encodings in the QDIR, the MatMul's other input is ``DequantizeLinear(QuantizeLinear(x,
s, zp), s, zp)`` with the layer's per-tensor float32 scale and uint8/uint16 zero point (:meth:`activation`).
With per-token activation or KV quantization in the QDIR (``WxAyKVz``), the MatMul inputs of the blocks and
the post-RoPE keys and the values are quantized by scales computed in the graph, after the online rotations
(:mod:`.dynamic`). The sequence length ``T`` is either static (RoPE tables and masks are constants) or the dynamic dimension
``seq`` (each RoPE table for every position the model supports, sliced to ``T`` rows, and the masks built from
``Range(T)``); without RoPE the position table is sliced to rows ``[offset, offset + T)`` the same way.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import numpy as np
from onnx import GraphProto, TensorProto, helper

from turboboa.activations.dynamic import DynamicSpec
from turboboa.arch import adapter_for_config
from turboboa.arch.decoder import DecoderSpec
from turboboa.checkpoint import QuantizedCheckpoint
from turboboa.errors import UserError

from .builder import GraphBuilder
from .dynamic import dynamic_quantize, hadamard
from .profiles import ExportProfile
from .weights import EncodedWeight, encode_weight, onnx_expressible

INPUT = "input_ids"
OUTPUT = "logits"
DYNAMIC_DIM = "seq"
MASK_VALUE = np.finfo(np.float32).min


class DecoderGraph:
    """Builds the decoder of ``ckpt`` under ``profile``; :meth:`build` returns the graph."""

    def __init__(self, ckpt: QuantizedCheckpoint, spec: DecoderSpec, hf_config: Any, profile: ExportProfile) -> None:
        self.ckpt, self.spec, self.hf_config, self.profile = ckpt, spec, hf_config, profile
        self.b = GraphBuilder()
        self.encoded: dict[str, EncodedWeight] = {}
        self.embedding_note = "float32"
        self._used_floats: set[str] = set()
        self._used_layers: set[str] = set()
        self._used_encodings: set[str] = set()
        self._shapes: dict[tuple[int, ...], str] = {}
        self._rows: tuple[str, str] | None = None
        self._causal: tuple[str, str, str] | None = None
        self.dynamic = DynamicSpec.from_config(ckpt.config)

    # --- tensors of the checkpoint -------------------------------------------------------------------

    def float_tensor(self, name: str) -> np.ndarray:
        """The float32 tensor ``name`` of the checkpoint; missing is a UserError (an incomplete QDIR)."""
        t = self.ckpt.float_tensors.get(name)
        if t is None:
            raise UserError(f"{self.ckpt.path} lacks the tensor {name}; the QDIR is incomplete, quantize again")
        self._used_floats.add(name)
        return np.ascontiguousarray(t.float().numpy())

    def weight(self, name: str) -> str:
        """The ``[K, N]`` weight of linear layer ``name``: its DequantizeLinear output when quantized, else a
        float32 initializer holding the transposed HF weight."""
        q = self.ckpt.layers.get(name)
        if q is None:
            return self.b.const(f"{name}.weight_t", self.float_tensor(f"{name}.weight").T, scoped=False)
        self._used_layers.add(name)
        encoded = encode_weight(self.b, name, q, self.profile)
        self.encoded[name] = encoded
        return encoded.output

    def embedding(self) -> tuple[str, str | None]:
        """The token embedding ``E`` ``[V, D]`` the Gather reads, and ``E^T`` ``[D, V]`` when the graph holds it
        (a tied head multiplies by it; None: the head transposes ``E``). Under the generic profile a table
        quantized onto a grid with a DequantizeLinear form is stored like a linear layer's weight: integer codes
        and scales whose DequantizeLinear output is ``E^T``, transposed for the Gather. Otherwise the table
        is a float32 initializer (a quantized one dequantized into it)."""
        name = self.spec.embedding
        q = self.ckpt.layers.get(name)
        if q is None:
            return self.b.const(f"{name}.weight", self.float_tensor(f"{name}.weight"), scoped=False), None
        if self.profile.name == "generic" and onnx_expressible(q.fmt):
            self.embedding_note = f"{q.fmt} codes, DequantizeLinear"
            table_t = self.weight(name)
            return self.b.op("Transpose", [table_t], f"{name}/Transpose", perm=[1, 0]), table_t
        self._used_layers.add(name)
        self.embedding_note = f"float32, dequantized from {q.fmt}"
        return self.b.const(f"{name}.weight", np.ascontiguousarray(q.dequantize().numpy()), scoped=False), None

    # --- building blocks ---------------------------------------------------------------------------------

    def shape(self, *dims: int | None) -> str:
        """An int64 shape constant; ``None`` stands for ``T`` (``-1`` when ``T`` is dynamic)."""
        t = self.profile.seqlen if self.profile.static else -1
        key = tuple(int(t if d is None else d) for d in dims)  # type: ignore[arg-type]
        if key not in self._shapes:
            name = "shape_" + "x".join(str(v) for v in key)
            self._shapes[key] = self.b.const(name, np.array(key, dtype=np.int64), scoped=False)
        return self._shapes[key]

    def activation(self, x: str, name: str) -> str:
        """The input of linear layer ``name``: ``x`` itself while activations stay float, else
        ``DequantizeLinear(QuantizeLinear(x, s, zp), s, zp)`` with the QDIR's per-tensor encoding of that
        input (``<name>.input_scale`` float32, ``<name>.input_zero_point`` uint8/uint16 scalars)."""
        if self.dynamic.active and name != self.spec.head:
            return self.dynamic_activation(x, name)
        encodings = self.ckpt.activations
        if self.profile.act_bits is None or encodings is None or name not in encodings.layers:
            return x
        self._used_encodings.add(name)
        enc = encodings.layers[name]
        dtype = np.uint8 if encodings.bits == 8 else np.uint16
        scale = self.b.const(f"{name}.input_scale", np.array(float(enc.scale), np.float32), scoped=False)
        zero_point = self.b.const(f"{name}.input_zero_point", np.array(enc.zero_point, dtype), scoped=False)
        quantized = self.b.op("QuantizeLinear", [x, scale, zero_point], "InputQuantize")
        return self.b.op("DequantizeLinear", [quantized, scale, zero_point], "InputDequantize")

    def dynamic_activation(self, x: str, name: str) -> str:
        """The input of the block layer ``name`` under per-token quantization: rotated online first when it
        is a down projection and the QDIR rotates it, then quantized with scales computed in the graph."""
        q = self.ckpt.layers.get(name)
        width = q.shape[1] if q is not None else self.ckpt.float_tensors[f"{name}.weight"].shape[1]
        if self.dynamic.online_down and self.spec.layout.locate(name)[1] == "down":  # (in the layer's scope)
            x = hadamard(self.b, x, (1, -1), int(width), "OnlineHadamard")
        if self.dynamic.act_bits < 16:
            x = dynamic_quantize(self.b, x, int(width), self.dynamic.act_bits, self.dynamic.act_sym,
                                 "InputDynamicQuantize")
        return x

    def kv_cache(self, q: str, k: str, v: str) -> tuple[str, str, str]:
        """Queries, keys and values ``[1, heads, T, d]`` after RoPE: queries and keys rotated online by
        ``H_d``, keys and values quantized per token and head, as the QDIR says (inside the block's scope)."""
        spec, dyn = self.spec, self.dynamic
        if dyn.online_qk:
            q = hadamard(self.b, q, (1, spec.heads, -1), spec.head_dim, "q_hadamard")
            k = hadamard(self.b, k, (1, spec.kv_heads, -1), spec.head_dim, "k_hadamard")
        if dyn.kv_bits < 16:
            k = dynamic_quantize(self.b, k, spec.head_dim, dyn.kv_bits, dyn.kv_sym, "k_quantize")
            v = dynamic_quantize(self.b, v, spec.head_dim, dyn.kv_bits, dyn.kv_sym, "v_quantize")
        return q, k, v

    def linear(self, x: str, name: str) -> str:
        """``x W^T (+ b)`` for linear layer ``name``."""
        weight = self.weight(name)
        with self.b.scope(name):
            y = self.b.op("MatMul", [self.activation(x, name), weight])
            if f"{name}.bias" in self.ckpt.float_tensors:
                bias = self.b.const("bias", self.float_tensor(f"{name}.bias"))
                y = self.b.op("Add", [y, bias], "BiasAdd")
        return y

    def norm(self, x: str, name: str) -> str:
        """The spec's norm ``name`` on ``x``: :meth:`rms_norm` or :meth:`layer_norm`."""
        return self.rms_norm(x, name) if self.spec.norm == "rms" else self.layer_norm(x, name)

    def layer_norm(self, x: str, name: str) -> str:
        """``(x - mean(x, -1)) / sqrt(var(x, -1) + eps) * w + b``: one ``LayerNormalization`` over the last axis."""
        with self.b.scope(name):
            w = self.b.const("weight", self.float_tensor(f"{name}.weight"))
            bias = self.b.const("bias", self.float_tensor(f"{name}.bias"))
            return self.b.op("LayerNormalization", [x, w, bias], axis=-1, epsilon=float(self.spec.eps))

    def rms_norm(self, x: str, name: str) -> str:
        """``x * 1 / sqrt(mean(x^2, -1) + eps) * (offset + w)`` with the spec's ``norm_offset`` added to the
        stored weight in float32 (Gemma's ``1 + w``)."""
        with self.b.scope(name):
            w = self.float_tensor(f"{name}.weight")
            if self.spec.norm_offset:
                w = np.float32(self.spec.norm_offset) + w
            w = self.b.const("weight", w)
            eps = self.b.const("eps", np.array(self.spec.eps, dtype=np.float32))
            axes = self.b.const("axes", np.array([-1], dtype=np.int64))
            square = self.b.op("Mul", [x, x], "Square")
            mean = self.b.op("ReduceMean", [square, axes], keepdims=1)
            std = self.b.op("Sqrt", [self.b.op("Add", [mean, eps], "AddEps")])
            normed = self.b.op("Mul", [x, self.b.op("Reciprocal", [std])], "Normalize")
            return self.b.op("Mul", [normed, w], "Scale")

    def rope(self, x: str, cos: str, sin: str, name: str) -> str:
        """``x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` on the last axis."""
        half = self.spec.head_dim // 2
        with self.b.scope(name):
            split = self.b.const("split", np.array([half, half], dtype=np.int64))
            x1, x2 = self.b.op("Split", [x, split], outputs=2, axis=-1)
            rotated = self.b.op("Concat", [self.b.op("Neg", [x2]), x1], axis=-1)
            return self.b.op("Add", [self.b.op("Mul", [x, cos], "MulCos"), self.b.op("Mul", [rotated, sin], "MulSin")])

    def heads(self, x: str, n: int, name: str) -> str:
        """``[1, T, n d]`` -> ``[1, n, T, d]``."""
        split = self.b.op("Reshape", [x, self.shape(1, None, n, self.spec.head_dim)], f"{name}/Reshape")
        return self.b.op("Transpose", [split], f"{name}/Transpose", perm=[0, 2, 1, 3])

    def repeat_kv(self, x: str, name: str) -> str:
        """KV heads ``[1, G, T, d]`` -> ``[1, H, T, d]``: query head ``h`` reads KV head ``h // (H / G)``."""
        spec = self.spec
        if spec.heads == spec.kv_heads:
            return x
        index = np.arange(spec.heads, dtype=np.int64) // (spec.heads // spec.kv_heads)
        return self.b.op("Gather", [x, self.b.const(f"{name}/kv_of_head", index)], f"{name}/RepeatKV", axis=1)

    def attention(self, x: str, i: int, cos: str | None, sin: str | None, mask: str) -> str:
        """Causal grouped-query attention of block ``i``, through its output projection (per-head norms of the
        queries and keys where the layout has them, RoPE on them when ``cos``/``sin`` are given)."""
        spec = self.spec
        layout = spec.layout
        scope = f"{spec.block(i)}.{layout.attention_scope}"
        q_name, k_name, v_name, o_name = (spec.linear(i, role) for role in ("q", "k", "v", "o"))
        q = self.heads(self.linear(x, q_name), spec.heads, f"{scope}/q")
        k = self.heads(self.linear(x, k_name), spec.kv_heads, f"{scope}/k")
        v = self.heads(self.linear(x, v_name), spec.kv_heads, f"{scope}/v")
        if layout.q_norm is not None and layout.k_norm is not None:
            q = self.norm(q, f"{spec.block(i)}.{layout.q_norm}")
            k = self.norm(k, f"{spec.block(i)}.{layout.k_norm}")
        with self.b.scope(scope):
            if cos is not None and sin is not None:
                q, k = self.rope(q, cos, sin, "q_rope"), self.rope(k, cos, sin, "k_rope")
            q, k, v = self.kv_cache(q, k, v)
            k = self.repeat_kv(k, "k")
            v = self.repeat_kv(v, "v")
            k_t = self.b.op("Transpose", [k], "k_transposed", perm=[0, 1, 3, 2])
            scale = self.b.const("scale", np.array(spec.scale, dtype=np.float32))
            scores = self.b.op("Mul", [self.b.op("MatMul", [q, k_t], "QK"), scale], "Scaled")
            probs = self.b.op("Softmax", [self.b.op("Add", [scores, mask], "Masked")], axis=-1)
            out = self.b.op("Transpose", [self.b.op("MatMul", [probs, v], "AV")], "merge/Transpose", perm=[0, 2, 1, 3])
            out = self.b.op("Reshape", [out, self.shape(1, None, spec.heads * spec.head_dim)], "merge/Reshape")
        return self.linear(out, o_name)

    def mlp(self, y: str, i: int) -> str:
        """``(silu(y W_gate^T) * (y W_up^T)) W_down^T`` (gated) or ``act(y W_up^T (+ b)) W_down^T`` of block ``i``."""
        spec = self.spec
        scope = f"{spec.block(i)}.{spec.layout.mlp_scope}"
        up_name, down_name = spec.linear(i, "up"), spec.linear(i, "down")
        if not spec.gated:
            up = self.linear(y, up_name)
            with self.b.scope(scope):
                hidden = self.b.op({"relu": "Relu"}[spec.activation], [up], "Activation")
            return self.linear(hidden, down_name)
        gate, up = self.linear(y, spec.linear(i, "gate")), self.linear(y, up_name)
        with self.b.scope(scope):
            if spec.activation == "gelu_tanh":
                act = self.gelu_tanh(gate)
            else:
                act = self.b.op("Mul", [gate, self.b.op("Sigmoid", [gate])], "SiLU")
            gated = self.b.op("Mul", [act, up], "Gate")
        return self.linear(gated, down_name)

    def gelu_tanh(self, a: str) -> str:
        """``a/2 (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))`` from elementary ops (every opset and runtime)."""
        b = self.b
        with b.scope("GeluTanh"):
            c = b.const("coeff", np.array(0.044715, dtype=np.float32))
            k = b.const("sqrt_2_over_pi", np.array(np.sqrt(2.0 / np.pi), dtype=np.float32))
            one, half = b.const("one", np.array(1, dtype=np.float32)), b.const("half", np.array(0.5, dtype=np.float32))
            cube = b.op("Mul", [b.op("Mul", [a, a], "Square"), a], "Cube")
            inner = b.op("Mul", [b.op("Add", [a, b.op("Mul", [cube, c], "MulCoeff")], "AddCube"), k], "MulSqrt")
            gate = b.op("Add", [b.op("Tanh", [inner]), one], "AddOne")
            return b.op("Mul", [b.op("Mul", [a, half], "Half"), gate], "Gelu")

    def positions(self) -> tuple[list[tuple[str, str]] | None, dict[int | None, str]]:
        """``(tables, masks)``: the RoPE tables ``(cos, sin)`` ``[T, d]`` by table index (None without RoPE,
        when :attr:`_rows` holds the ``(starts, ends)`` of the learned positions' rows) and the additive causal
        masks ``[T, T]`` by window (None: full causal attention), one for each window some block uses."""
        spec, b = self.spec, self.b
        windows = sorted({spec.window(i) for i in range(spec.layers)}, key=lambda w: -1 if w is None else w)
        offset = np.array([spec.position_offset], dtype=np.int64)
        if self.profile.static:
            t = int(self.profile.seqlen)  # type: ignore[arg-type]
            if not spec.rope:
                self._rows = (b.const("position_rows_start", offset), b.const("position_rows_end", offset + t))
                return None, {w: self._static_mask(t, w) for w in windows}
            rope_tables = adapter_for_config(self.hf_config).rope_tables
            tables = []
            for j in range(spec.rope_table_count):
                cos, sin = rope_tables(self.hf_config, t, j)
                tables.append((b.const(f"rope_cos{self._table(j)}", cos), b.const(f"rope_sin{self._table(j)}", sin)))
            return tables, {w: self._static_mask(t, w) for w in windows}
        with b.scope("positions"):
            t, pos = self._sequence()
            if not spec.rope:
                masks = {w: self._dynamic_mask(pos, w) for w in windows}
                t1d = b.op("Unsqueeze", [t, b.const("axis0", np.array([0], dtype=np.int64))], "SeqLen1d")
                starts = b.const("rows_start", offset)
                self._rows = (starts, b.op("Add", [t1d, starts], "RowsEnd"))
                return None, masks
            rope_tables = adapter_for_config(self.hf_config).rope_tables
            ends = b.op("Unsqueeze", [t, b.const("axis0", np.array([0], dtype=np.int64))], "SeqLen1d")
            starts = b.const("starts", np.array([0], dtype=np.int64))
            tables = []
            for j in range(spec.rope_table_count):
                cos_table, sin_table = rope_tables(self.hf_config, spec.max_positions, j)
                cos = b.op("Slice", [b.const(f"rope_cos_table{self._table(j)}", cos_table), starts, ends, starts],
                           f"rope_cos{self._table(j)}")
                sin = b.op("Slice", [b.const(f"rope_sin_table{self._table(j)}", sin_table), starts, ends, starts],
                           f"rope_sin{self._table(j)}")
                tables.append((cos, sin))
            return tables, {w: self._dynamic_mask(pos, w) for w in windows}

    @staticmethod
    def _table(j: int) -> str:
        """The name suffix of RoPE table ``j`` (none for the first)."""
        return f"_{j}" if j else ""

    def _static_mask(self, t: int, window: int | None) -> str:
        """The additive causal mask ``[T, T]`` as a constant: ``MASK_VALUE`` where key ``j`` > query ``i``, or,
        with a window, where ``i - j >= window``."""
        future = np.triu(np.ones((t, t), dtype=bool), k=1)
        if window is not None:
            future |= np.tril(np.ones((t, t), dtype=bool), k=-window)
        mask = np.where(future, MASK_VALUE, np.float32(0)).astype(np.float32)
        return self.b.const("causal_mask" if window is None else f"causal_mask_window{window}", mask)

    def _sequence(self) -> tuple[str, str]:
        """``T`` (a scalar read from ``input_ids``' shape) and the positions ``Range(T)``."""
        b = self.b
        shape = b.op("Shape", [INPUT])
        t = b.op("Gather", [shape, b.const("seq_axis", np.array(1, dtype=np.int64))], "SeqLen", axis=0)
        zero, one = b.const("zero", np.array(0, dtype=np.int64)), b.const("one", np.array(1, dtype=np.int64))
        return t, b.op("Range", [zero, t, one], "Positions")

    def _causality(self, pos: str) -> tuple[str, str, str]:
        """``(query, key, future)``: the positions as a column ``[T, 1]`` and a row ``[1, T]``, and where key >
        query (built once)."""
        if self._causal is None:
            b = self.b
            query = b.op("Unsqueeze", [pos, b.const("axis1", np.array([1], dtype=np.int64))], "QueryPos")
            key = b.op("Unsqueeze", [pos, b.const("axis0_key", np.array([0], dtype=np.int64))], "KeyPos")
            self._causal = (query, key, b.op("Greater", [key, query], "Future"))
        return self._causal

    def _dynamic_mask(self, pos: str, window: int | None) -> str:
        """The additive causal mask ``[T, T]`` from the positions: ``MASK_VALUE`` where key > query, or, with a
        window, also where ``query - key >= window``."""
        b = self.b
        query, key, masked = self._causality(pos)
        with b.scope(f"window{window}") if window is not None else nullcontext():
            if window is not None:
                far = b.op("GreaterOrEqual", [b.op("Sub", [query, key], "Distance"),
                                              b.const("window", np.array(window, dtype=np.int64))], "Far")
                masked = b.op("Or", [masked, far], "Masked")
            return b.op("Where", [masked, b.const("mask_value", np.array(MASK_VALUE, dtype=np.float32)),
                                  b.const("mask_zero", np.array(0, dtype=np.float32))], "causal_mask")

    def post_norm(self, x: str, i: int, role: str) -> str:
        """``Norm(x)`` with block ``i``'s post-norm of ``role`` where the layout has one, else ``x``."""
        name = getattr(self.spec.layout, role)
        return x if name is None else self.norm(x, f"{self.spec.block(i)}.{name}")

    def learned_positions(self) -> str:
        """``P[t + offset]`` for ``t < T``: rows ``[offset, offset + T)`` of the learned position table."""
        name = self.spec.layout.positions
        table = self.b.const(f"{name}.weight", self.float_tensor(f"{name}.weight"), scoped=False)
        assert self._rows is not None, "positions() makes the rows first"
        starts, ends = self._rows
        axes = self.b.const(f"{name}/axes", np.array([0], dtype=np.int64), scoped=False)
        return self.b.op("Slice", [table, starts, ends, axes], f"{name}/Slice")

    # --- the whole graph ---------------------------------------------------------------------------------

    def build(self) -> GraphProto:
        """Embedding, blocks, final norm, head; checks that every tensor of the checkpoint was used."""
        spec, b = self.spec, self.b
        layout = spec.layout
        tables, masks = self.positions()
        embedding, embedding_t = self.embedding()
        h = b.op("Gather", [embedding, INPUT], f"{spec.embedding}/Gather", axis=0)
        if spec.embed_scale is not None:
            scale = b.const(f"{spec.embedding}.embed_scale", np.array(spec.embed_scale, dtype=np.float32), scoped=False)
            h = b.op("Mul", [h, scale], f"{spec.embedding}/Scale")
        if not spec.rope:
            h = b.op("Add", [h, self.learned_positions()], f"{layout.positions}/Add")
        for i in range(spec.layers):
            block = spec.block(i)
            cos, sin = tables[spec.rope_index(i)] if tables is not None else (None, None)
            x = self.norm(h, layout.norm(i, "attention_norm"))
            attention = self.post_norm(self.attention(x, i, cos, sin, masks[spec.window(i)]), i, "attention_post_norm")
            h = b.op("Add", [h, attention], f"{block}/AttentionResidual")
            y = self.norm(h, layout.norm(i, "mlp_norm"))
            h = b.op("Add", [h, self.post_norm(self.mlp(y, i), i, "mlp_post_norm")], f"{block}/MlpResidual")
        h = self.norm(h, spec.final_norm)
        if spec.tied:
            head = embedding_t or b.op("Transpose", [embedding], f"{spec.head}/TiedEmbedding", perm=[1, 0])
        else:
            head = self.weight(spec.head)
        b.op("MatMul", [h, head], f"{spec.head}/MatMul", output_names=[OUTPUT])
        self._check_all_used()
        t: int | str = self.profile.seqlen if self.profile.static else DYNAMIC_DIM  # type: ignore[assignment]
        inputs = [helper.make_tensor_value_info(INPUT, TensorProto.INT64, [1, t])]
        outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [1, t, spec.vocab])]
        return helper.make_graph(b.nodes, "turboboa_decoder", inputs, outputs, initializer=b.initializers)

    def _check_all_used(self) -> None:
        """Every quantized layer and float tensor of the checkpoint must be in the graph (nothing dropped)."""
        left = sorted(set(self.ckpt.layers) - self._used_layers)
        if self.spec.tied:
            self._used_floats.add(f"{self.spec.head}.weight")
        left += sorted(set(self.ckpt.float_tensors) - self._used_floats)
        if self.profile.act_bits is not None and self.ckpt.activations is not None:
            left += [f"the input encoding of {n}" for n in sorted(set(self.ckpt.activations.layers)
                                                                  - self._used_encodings)]
        if left:
            raise UserError(f"the ONNX graph of a {self.spec.model_type} model has no place for {left[0]}"
                            f"{f' (and {len(left) - 1} more)' if len(left) > 1 else ''}; this checkpoint's "
                            f"architecture differs from what the exporter computes")


def build_decoder(ckpt: QuantizedCheckpoint, spec: DecoderSpec, hf_config: Any,
                  profile: ExportProfile) -> tuple[GraphProto, DecoderGraph]:
    """The decoder graph of ``ckpt`` and the builder that made it (its ``encoded`` weights, embedding note)."""
    if profile.static and profile.seqlen > spec.max_positions:  # type: ignore[operator]
        raise UserError(f"--seqlen {profile.seqlen} exceeds the model's {spec.max_positions} positions")
    graph = DecoderGraph(ckpt, spec, hf_config, profile)
    return graph.build(), graph
