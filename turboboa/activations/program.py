"""The fully quantized RMSNorm / RoPE / SiLU-gated decoder, written once as a program over an abstract set of
operations.

NPU compilers such as Qualcomm's QNN HTP take a graph only when *every* tensor in it is quantized: each op
reads DequantizeLinear outputs and writes into a QuantizeLinear. :func:`run_decoder` states that decoder; a
backend (:class:`Ops`) either computes it in torch (:mod:`.simulate`: the fake-quant reference and the
calibration) or emits it as ONNX (``exporters.onnx.qnn``), so the simulation and the exported graph are the
same function by construction. Every op output is a named *point* with one static per-tensor encoding;
movement ops (reshape, transpose, head gathers) keep their input's encoding.

Per block ``b`` (``D`` hidden, ``H`` heads over ``G`` KV heads of size ``d``, ``Q(.)`` the point's
quantizer); a point is named after the module of its role in the family's layout (``[role]``), the
attention's values under ``[attention]``, the MLP's under ``[mlp]`` (:attr:`Layout.mlp_scope`)::

    x      = Q(RMSNorm(h) * Q(gamma))                              b.[attention_norm]
    q,k,v  = Q(x W^T (+ bias)),  split into heads                  b.[q], b.[k], b.[v]
    q~     = Q(Q(q * C_q) + Q(swap(q) * S'_q))                     b.[attention].q_{cos,sin,rope}
    k~     = Q(Q(k * C)   + Q(swap(k) * S'))                       b.[attention].k_{cos,sin,rope}
    s      = Q(q~ k~^T),  m = Q(where(future, f, s))               b.[attention].{scores,masked}
    v'     = Q(v)  (v's heads in the encoding of the product)        b.[attention].v
    p      = Q(softmax(m)),  o = Q(p v')                           b.[attention].{probs,context}
    h      = Q(h + Q(o W_o^T))                                     b.[o], b.attn_residual
    y      = Q(RMSNorm(h) * Q(gamma'))                             b.[mlp_norm]
    g      = Q(y W_gate^T),  u = Q(y W_up^T)                       b.[gate], b.[up]
    a      = Q(g * Q(sigmoid(g))),  z = Q(a * u)                   b.[mlp].{gate_sigmoid,silu,gated}
    h      = Q(h + Q(z W_down^T))                                  b.[down], b.mlp_residual

with ``swap(x) = cat(x_2, x_1)`` (the halves of each head exchanged: a Gather, data movement) and the
sign of ``rotate_half(x) = cat(-x_2, x_1)`` folded into the sine table, ``S' = cat(-S_1, S_2)``, so
``rotate_half(x) * S = swap(x) * S'`` exactly with no extra rounding (a MatMul by the signed permutation,
or a Neg, costs the HTP many steps); the RoPE tables ``C, S'`` (float ``[T, d]``, quantized as constants)
and ``C_q = C / sqrt(d)``, ``S'_q = S' / sqrt(d)`` (the attention scale folded into the query's tables), and the mask fill ``f`` just below the
scores' calibrated range (``lo - MASK_MARGIN``: ``exp(-MASK_MARGIN)`` of a row's mass, and the masked tensor
keeps nearly the scores' resolution, where a float32-min fill would leave it none). The embedding is a
Gather from the table quantized per tensor (its output keeps the table's encoding); the head is an int8
per-output-channel symmetric weight (the QDIR's own when the head is quantized). A family whose decoder is
another (LayerNorm, learned positions, an ungated MLP: OPT; per-head or post norms, sliding windows: Qwen3,
Gemma 3) is refused in one line (:func:`check_program`).

Encodings (:func:`.points.point_dtype`): uint16 asymmetric min-max, except the operands of the two
activation-by-activation products (``q_rope``, ``k_rope``, ``v``, ``probs``), which are int16 symmetric, the
pairing HTP multiplies correctly (its uint16 x uint16 MatMul does not); ``v`` is converted to it after its
projection (HTP's weight MatMul does not write int16). ``--act-bits 8`` (W8A8) runs the block's weight
layers in uint8: their input is converted to a uint8 point (``<point>.a8``), their output is uint8 (HTP's
MatMul with a uint8 input writes uint8) and is converted back to uint16 (``<name>.a16``); every other tensor
(residual stream, norms, attention, element-wise ops, head, logits) stays at 16 bits, as W8A8 deployments
keep them: the residual stream's massive activations (|x| up to ~27000 on SmolLM2) would leave an 8-bit
residual a step of ~100.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from turboboa.arch.decoder import DecoderSpec
from turboboa.errors import UserError

from .encodings import TensorEncoding, encoding_from_range
from .points import A8, A16, dtype_range

MASK_MARGIN = 20.0
def encoding_for(lo: float, hi: float, dtype: str) -> TensorEncoding:
    """Min-max encoding of ``[min(lo, 0), max(hi, 0)]`` in ``dtype``: asymmetric for unsigned types (0 exact,
    ``s = (hi - lo) / qmax``), symmetric for int16 (``zp = 0``, ``s = max(|lo|, |hi|) / 32767``)."""
    qmin, qmax = dtype_range(dtype)
    lo_, hi_ = min(float(lo), 0.0), max(float(hi), 0.0)
    if qmin < 0:
        span = max(-lo_, hi_) / qmax
        scale = np.float32(span) if span > 0 and np.isfinite(span) else np.float32(1.0)
        return TensorEncoding(torch.tensor(scale), 0, float(lo), float(hi))
    return encoding_from_range(lo, hi, qmax.bit_length())


def quantize_codes(x: np.ndarray, enc: TensorEncoding, dtype: str) -> np.ndarray:
    """``clamp(round_half_even(x / s) + zp, qmin, qmax)`` as ``dtype`` (what QuantizeLinear stores)."""
    qmin, qmax = dtype_range(dtype)
    s = np.float32(float(enc.scale))
    q = np.clip(np.round(x.astype(np.float32) / s) + enc.zero_point, qmin, qmax)
    return q.astype(np.dtype(dtype))


def dequantize_codes(q: np.ndarray, enc: TensorEncoding) -> np.ndarray:
    """``(q - zp) * s`` in float32 (what DequantizeLinear computes)."""
    return ((q.astype(np.float32) - np.float32(enc.zero_point)) * np.float32(float(enc.scale))).astype(np.float32)


def swap_index(d: int) -> np.ndarray:
    """Indices of ``swap(x) = cat(x[d/2:], x[:d/2])`` along the last axis (int64)."""
    half = d // 2
    return np.concatenate([np.arange(half, d), np.arange(half)]).astype(np.int64)


def signed_sine(sin: np.ndarray) -> np.ndarray:
    """``S' = cat(-S[:, :d/2], S[:, d/2:])``: ``rotate_half(x) * S == swap(x) * S'``."""
    half = sin.shape[-1] // 2
    return np.concatenate([-sin[..., :half], sin[..., half:]], axis=-1)


def int8_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 RTN per output row of ``weight`` ``[N, K]``: codes ``round(w / s)`` in ``[-127, 127]``
    and ``s = max|w_row| / 127`` (1 for an all-zero row)."""
    amax = np.abs(weight).max(axis=1).astype(np.float32)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    codes = np.clip(np.round(weight / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale


class Ops(Protocol):
    """What :func:`run_decoder` needs from a backend; every op returns a quantized value at its point."""

    def embed(self, ids: Any) -> Any: ...
    def rms_norm(self, x: Any, name: str) -> Any: ...
    def linear(self, x: Any, name: str) -> Any: ...
    def head(self, x: Any) -> Any: ...
    def heads(self, x: Any, n: int, name: str) -> Any: ...
    def merge_heads(self, x: Any, name: str) -> Any: ...
    def repeat_kv(self, x: Any, name: str) -> Any: ...
    def transpose_keys(self, x: Any, name: str) -> Any: ...
    def swap_halves(self, x: Any, name: str) -> Any: ...
    def rope_table(self, which: str) -> Any: ...
    def matmul(self, a: Any, b: Any, name: str) -> Any: ...
    def mul(self, a: Any, b: Any, name: str) -> Any: ...
    def add(self, a: Any, b: Any, name: str) -> Any: ...
    def sigmoid(self, x: Any, name: str) -> Any: ...
    def softmax(self, x: Any, name: str) -> Any: ...
    def convert(self, x: Any, name: str) -> Any: ...
    bits: int
    def mask(self, scores: Any, name: str) -> Any: ...


def rope(ops: Ops, x: Any, name: str, which: str) -> Any:
    """``Q(Q(x * C) + Q(swap(x) * S'))`` with the tables of ``which`` (``q`` or ``k``)."""
    cos, sin = ops.rope_table(f"{which}_cos"), ops.rope_table(f"{which}_sin")
    swapped = ops.swap_halves(x, f"{name}_swap")
    return ops.add(ops.mul(x, cos, f"{name}_cos"), ops.mul(swapped, sin, f"{name}_sin"), f"{name}_rope")


def weight_input(ops: Ops, x: Any, point: str) -> Any:
    """``x`` as the input of weight layers: unchanged, or at 8 bits converted to its uint8 point ``<point>.a8``."""
    return ops.convert(x, f"{point}{A8}") if ops.bits == 8 else x


def linear(ops: Ops, x: Any, name: str) -> Any:
    """Weight layer ``name`` on ``x``; at 8 bits its uint8 output is converted to the uint16 point
    ``<name>.a16`` for what follows."""
    y = ops.linear(x, name)
    return ops.convert(y, f"{name}{A16}") if ops.bits == 8 else y


def check_program(spec: DecoderSpec) -> None:
    """A one-line UserError naming what ``spec``'s decoder has that this program does not compute: it computes
    RMSNorm, RoPE, a SiLU-gated MLP and full causal attention, without per-head or post norms
    (:meth:`DecoderSpec.plain`)."""
    differences = [what for what, has in (
        (f"{spec.norm} norms", spec.norm != "rms"),
        ("learned positions", not spec.rope),
        (f"an {'' if spec.gated else 'ungated '}{spec.activation} MLP", not spec.gated or spec.activation != "silu"),
        ("per-head q/k norms", spec.layout.q_norm is not None),
        ("post-norms", spec.layout.attention_post_norm is not None or spec.layout.mlp_post_norm is not None),
        ("(1 + w) norm gains", spec.norm_offset != 0.0),
        ("a scaled embedding", spec.embed_scale is not None),
        ("another attention scale", spec.attention_scale is not None),
        ("sliding-window layers", any(spec.windows)),
        ("several RoPE tables", spec.rope_table_count > 1)) if has]
    if differences:
        raise UserError(f"the fully quantized graph (--profile qnn-htp, --scope graph) computes Llama's block "
                        f"(RMSNorm, RoPE, a SiLU-gated MLP, full causal attention); a {spec.model_type} model has "
                        f"{', '.join(differences)}: export it with --profile generic or npu")


def run_block(ops: Ops, spec: DecoderSpec, i: int, h: Any) -> Any:
    """Decoder block ``i`` on the residual stream ``h`` (module docstring)."""
    layout, b = spec.layout, spec.block(i)
    att, mlp = f"{b}.{layout.attention_scope}", f"{b}.{layout.mlp_scope}"
    q_name, k_name, v_name, o_name = (spec.linear(i, role) for role in ("q", "k", "v", "o"))
    gate_name, up_name, down_name = (spec.linear(i, role) for role in ("gate", "up", "down"))
    norm_a, norm_m = layout.norm(i, "attention_norm"), layout.norm(i, "mlp_norm")
    x = weight_input(ops, ops.rms_norm(h, norm_a), norm_a)
    q = ops.heads(linear(ops, x, q_name), spec.heads, q_name)
    k = ops.heads(linear(ops, x, k_name), spec.kv_heads, k_name)
    v = ops.repeat_kv(ops.heads(linear(ops, x, v_name), spec.kv_heads, v_name), v_name)
    v = ops.convert(v, f"{att}.v")
    q = rope(ops, q, f"{att}.q", "q")
    k = ops.transpose_keys(ops.repeat_kv(rope(ops, k, f"{att}.k", "k"), f"{att}.k_rope"), f"{att}.k_rope")
    scores = ops.matmul(q, k, f"{att}.scores")
    probs = ops.softmax(ops.mask(scores, f"{att}.masked"), f"{att}.probs")
    context = ops.merge_heads(ops.matmul(probs, v, f"{att}.context"), f"{att}.context")
    context = weight_input(ops, context, f"{att}.context")
    h = ops.add(h, linear(ops, context, o_name), f"{b}.attn_residual")
    y = weight_input(ops, ops.rms_norm(h, norm_m), norm_m)
    gate = linear(ops, y, gate_name)
    silu = ops.mul(gate, ops.sigmoid(gate, f"{mlp}.gate_sigmoid"), f"{mlp}.silu")
    gated = ops.mul(silu, linear(ops, y, up_name), f"{mlp}.gated")
    return ops.add(h, linear(ops, weight_input(ops, gated, f"{mlp}.gated"), down_name), f"{b}.mlp_residual")


def run_decoder(ops: Ops, spec: DecoderSpec, ids: Any) -> Any:
    """Embedding, every block, the final norm and the head: the quantized logits."""
    h = ops.embed(ids)
    for i in range(spec.layers):
        h = run_block(ops, spec, i, h)
    return ops.head(ops.rms_norm(h, spec.final_norm))


__all__ = ["MASK_MARGIN", "Ops", "check_program", "dequantize_codes", "encoding_for", "int8_per_channel",
           "quantize_codes", "run_block", "run_decoder", "signed_sine", "swap_index"]
