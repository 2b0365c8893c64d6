"""The fully quantized decoder (:mod:`.program`) in torch: the fake-quant reference of ``--profile qnn-htp``
graphs, and the calibration of its encodings.

:class:`TorchOps` computes each op in float32 on dequantized inputs and quantizes its output at the point's
encoding exactly as QuantizeLinear -> DequantizeLinear do (``(clamp(round_half_even(x / s) + zp, qmin, qmax)
- zp) * s``). The constants (embedding table, norm weights, RoPE tables, the head's int8 weight) are
quantized by :class:`GraphConstants`, which the ONNX backend uses too, so both hold the same integers.

Calibration (:func:`calibrate_graph`) goes block by block on the calibration stream: one pass observes the
min and max of every point of the block (its inputs already quantized by the earlier blocks, its own points
still float), then the block's encodings are made and a second pass carries the stream, quantized, to the
next block. The logits' encoding is observed the same way after the final norm.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from turboboa.arch import adapter_for_config, decoder_spec
from turboboa.arch.decoder import DecoderSpec
from turboboa.errors import UserError

from .encodings import ActivationEncodings, TensorEncoding, check_act_bits
from .points import GRAPH_SCHEME, dtype_range, point_dtype
from .program import (
    MASK_MARGIN,
    check_program,
    dequantize_codes,
    encoding_for,
    int8_per_channel,
    quantize_codes,
    run_block,
    run_decoder,
    signed_sine,
    swap_index,
)


class GraphConstants:
    """The quantized constants of the graph of ``ckpt`` at ``bits``: each one's integer codes, encoding and
    dtype, shared by the torch simulation and the ONNX export."""

    def __init__(self, ckpt: Any, spec: DecoderSpec, hf_config: Any, bits: int) -> None:
        check_program(spec)
        self.ckpt, self.spec, self.hf_config, self.bits = ckpt, spec, hf_config, bits
        self.dtype = "uint16"  # constants feed 16-bit ops at both widths (points.point_dtype)

    def float_tensor(self, name: str) -> np.ndarray:
        """The float32 tensor ``name`` of the checkpoint (a missing one means an incomplete QDIR)."""
        t = self.ckpt.float_tensors.get(name)
        if t is None:
            raise UserError(f"{self.ckpt.path} lacks the tensor {name}; the QDIR is incomplete, quantize again")
        return np.ascontiguousarray(t.float().numpy())

    def constant(self, values: np.ndarray) -> tuple[np.ndarray, TensorEncoding]:
        """``values`` quantized per tensor (min-max, uint16): codes and encoding."""
        enc = encoding_for(float(values.min()), float(values.max()), self.dtype)
        return quantize_codes(values, enc, self.dtype), enc

    def embedding_table(self) -> np.ndarray:
        """The float embedding ``[V, D]`` (a quantized one dequantized)."""
        name = self.spec.embedding
        q = self.ckpt.layers.get(name)
        return np.ascontiguousarray(q.dequantize().numpy()) if q is not None else self.float_tensor(f"{name}.weight")

    @cached_property
    def embedding(self) -> tuple[np.ndarray, TensorEncoding]:
        """The table quantized per tensor; the Gather's output keeps this encoding."""
        return self.constant(self.embedding_table())

    def norm_weight(self, name: str) -> tuple[np.ndarray, TensorEncoding]:
        """RMSNorm ``name``'s weight quantized per tensor."""
        return self.constant(self.float_tensor(f"{name}.weight"))

    def bias(self, name: str) -> tuple[np.ndarray, TensorEncoding]:
        """Linear ``name``'s bias quantized per tensor."""
        return self.constant(self.float_tensor(f"{name}.bias"))

    @cached_property
    def rope(self) -> dict[str, tuple[np.ndarray, TensorEncoding]]:
        """``q_cos``, ``q_sin`` (times ``d^-1/2``), ``k_cos``, ``k_sin`` ``[P, d]`` over every position the model
        has, the sines signed for ``swap`` (:func:`~.program.signed_sine`), each quantized per tensor over all
        ``P`` rows (so a window's rows do not depend on its length)."""
        cos, sin = adapter_for_config(self.hf_config).rope_tables(self.hf_config, self.spec.max_positions)
        sin = signed_sine(sin)
        scale = np.float32(self.spec.head_dim ** -0.5)
        tables = {"q_cos": cos * scale, "q_sin": sin * scale, "k_cos": cos, "k_sin": sin}
        return {k: self.constant(v.astype(np.float32)) for k, v in tables.items()}

    @cached_property
    def swap(self) -> np.ndarray:
        """The last-axis indices of ``swap`` (the head's halves exchanged)."""
        return swap_index(self.spec.head_dim)

    @cached_property
    def head(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Int8 codes ``[V, D]`` and per-row scales of the head, or None when the head is a quantized layer
        of the QDIR (exported as it is)."""
        if self.spec.head in self.ckpt.layers:
            return None
        weight = self.embedding_table() if self.spec.tied else self.float_tensor(f"{self.spec.head}.weight")
        return int8_per_channel(weight)

    def head_weight(self) -> np.ndarray:
        """The head's dequantized weight ``[V, D]``."""
        if self.head is None:
            return np.ascontiguousarray(self.ckpt.layers[self.spec.head].dequantize().numpy())
        codes, scale = self.head
        return codes.astype(np.float32) * scale[:, None]


def masked_encoding(scores: TensorEncoding, bits: int, point: str) -> tuple[TensorEncoding, float]:
    """The encoding of the masked scores and the fill ``f = lo - MASK_MARGIN`` (``lo`` the scores' minimum)."""
    fill = min(scores.lo, 0.0) - MASK_MARGIN
    return encoding_for(fill, scores.hi, point_dtype(point, bits)), fill


def fake_quant_point(x: torch.Tensor, enc: TensorEncoding, dtype: str) -> torch.Tensor:
    """QuantizeLinear -> DequantizeLinear of ``x`` at ``enc`` in ``dtype`` (float32)."""
    qmin, qmax = dtype_range(dtype)
    s = enc.scale.to(device=x.device, dtype=torch.float32)
    q = torch.clamp(torch.round(x / s) + enc.zero_point, qmin, qmax)
    return (q - enc.zero_point) * s


class TorchOps:
    """The :class:`~.program.Ops` of the simulation: float32 ops, outputs quantized at known points; a point
    without an encoding is observed (min and max kept in :attr:`observed`) and passed on in float."""

    def __init__(self, consts: GraphConstants, encodings: dict[str, TensorEncoding], device: torch.device) -> None:
        self.c, self.encodings, self.device = consts, encodings, device
        self.bits = consts.bits
        self.observed: dict[str, tuple[float, float]] = {}
        self._cache: dict[str, torch.Tensor] = {}
        spec = consts.spec
        self.kv_of_head = torch.arange(spec.heads, device=device) // (spec.heads // spec.kv_heads)
        self.length = spec.max_positions

    def tensor(self, key: str, make: Callable[[], np.ndarray]) -> torch.Tensor:
        """A constant, made once and kept on the device."""
        if key not in self._cache:
            self._cache[key] = torch.from_numpy(np.ascontiguousarray(make())).to(self.device)
        return self._cache[key]

    def quantized_constant(self, key: str, make: Callable[[], tuple[np.ndarray, TensorEncoding]]) -> torch.Tensor:
        """The dequantized value of a quantized constant (``make`` gives its codes and encoding)."""
        return self.tensor(key, lambda: dequantize_codes(*make()))

    def q(self, x: torch.Tensor, point: str) -> torch.Tensor:
        """``x`` quantized at ``point``, or observed when the point has no encoding yet."""
        enc = self.encodings.get(point)
        if enc is None:
            lo, hi = float(x.min()), float(x.max())
            old = self.observed.get(point)
            self.observed[point] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)
            return x
        return fake_quant_point(x, enc, point_dtype(point, self.bits))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.quantized_constant(self.c.spec.embedding, lambda: self.c.embedding)[ids]

    def rms_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        gamma = self.quantized_constant(f"{name}.weight", lambda: self.c.norm_weight(name))
        mean_square = x.pow(2).mean(-1, keepdim=True)
        return self.q(x / torch.sqrt(mean_square + self.c.spec.eps) * gamma, name)

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        weight = self.tensor(f"{name}.weight", lambda: self.c.ckpt.layers[name].dequantize().numpy())
        if f"{name}.bias" not in self.c.ckpt.float_tensors:
            return self.q(x @ weight.T, name)
        y = self.q(x @ weight.T, f"{name}.matmul")
        return self.q(y + self.quantized_constant(f"{name}.bias", lambda: self.c.bias(name)), name)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        head = self.c.spec.head
        weight = self.tensor(f"{head}.weight", self.c.head_weight)
        return self.q(x @ weight.T, head)

    def heads(self, x: torch.Tensor, n: int, name: str) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, n, self.c.spec.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor, name: str) -> torch.Tensor:
        b, n, t, d = x.shape
        return x.transpose(1, 2).reshape(b, t, n * d)

    def repeat_kv(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x if self.c.spec.heads == self.c.spec.kv_heads else x.index_select(1, self.kv_of_head)

    def transpose_keys(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x.transpose(-1, -2)

    def swap_halves(self, x: torch.Tensor, name: str) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat([x[..., half:], x[..., :half]], dim=-1)

    def rope_table(self, which: str) -> torch.Tensor:
        table = self.quantized_constant(f"rope.{which}", lambda: self.c.rope[which])
        return table[: self.length]

    def matmul(self, a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
        return self.q(a @ b, name)

    def mul(self, a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
        return self.q(a * b, name)

    def add(self, a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
        return self.q(a + b, name)

    def sigmoid(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.q(torch.sigmoid(x), name)

    def softmax(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.q(torch.softmax(x, dim=-1), name)

    def convert(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.q(x, name)

    def mask(self, scores: torch.Tensor, name: str) -> torch.Tensor:
        t = scores.shape[-1]
        future = torch.triu(torch.ones(t, t, dtype=torch.bool, device=scores.device), diagonal=1)
        source = self.encodings.get(name.replace(".masked", ".scores"))
        if source is None:  # calibrating this block: a float mask, nothing to observe
            return scores.masked_fill(future, float("-inf"))
        enc, fill = masked_encoding(source, self.bits, name)
        dtype = point_dtype(name, self.bits)
        fill_value = float(dequantize_codes(quantize_codes(np.array(fill, np.float32), enc, dtype), enc))
        return fake_quant_point(scores.masked_fill(future, fill_value), enc, dtype)

    def start(self, length: int) -> None:
        """Prepare for windows of ``length`` tokens (RoPE rows)."""
        if length > self.c.spec.max_positions:
            raise UserError(f"windows of {length} tokens exceed the model's {self.c.spec.max_positions} positions")
        self.length = length


class QuantizedGraphModel(nn.Module):
    """The fully quantized decoder of a QDIR with ``static-graph`` encodings, as a torch model:
    ``model(input_ids=ids).logits`` like a Hugging Face causal LM."""

    def __init__(self, ckpt: Any, encodings: ActivationEncodings, device: torch.device | str = "cpu") -> None:
        super().__init__()
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(ckpt.path)
        self.spec = decoder_spec(hf_config)
        self.consts = GraphConstants(ckpt, self.spec, hf_config, encodings.bits)
        self.encodings = encodings
        self.ops = TorchOps(self.consts, dict(encodings.layers), torch.device(device))

    def to(self, device: Any = None, *args: Any, **kwargs: Any) -> QuantizedGraphModel:  # type: ignore[override]
        """Move the constants to ``device`` (they are rebuilt there on first use)."""
        if device is not None and not isinstance(device, torch.dtype):
            self.ops = TorchOps(self.consts, dict(self.encodings.layers), torch.device(device))
        return self

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        """Logits ``(B, L, V)`` of the quantized graph for ``input_ids`` ``(B, L)``."""
        with torch.no_grad():
            self.ops.start(int(input_ids.shape[1]))
            return SimpleNamespace(logits=run_decoder(self.ops, self.spec, input_ids.to(self.ops.device)))


def calibrate_graph(ckpt: Any, calib_ids: torch.Tensor, bits: int, device: torch.device | str = "cpu",
                    progress: bool = True, calibration: dict[str, Any] | None = None,
                    batch: int = 4) -> ActivationEncodings:
    """Encodings of every point of the fully quantized decoder of ``ckpt``, block by block on ``calib_ids``
    ``(n, L)`` (module docstring), ``batch`` sequences at a time."""
    from transformers import AutoConfig

    check_act_bits(bits)
    hf_config = AutoConfig.from_pretrained(ckpt.path)
    spec = decoder_spec(hf_config)
    consts = GraphConstants(ckpt, spec, hf_config, bits)
    encodings: dict[str, TensorEncoding] = {}
    ops = TorchOps(consts, encodings, torch.device(device))
    n, length = calib_ids.shape
    ops.start(length)
    chunks = [calib_ids[i : i + batch].to(ops.device) for i in range(0, n, batch)]

    def settle() -> None:
        for point, (lo, hi) in ops.observed.items():
            encodings[point] = encoding_for(lo, hi, point_dtype(point, bits))
        ops.observed.clear()

    with torch.no_grad():
        stream = [ops.embed(ids) for ids in chunks]
        for i in tqdm(range(spec.layers), desc=f"calibrate graph a{bits}", unit="block", disable=not progress):
            for h in stream:
                run_block(ops, spec, i, h)
            settle()
            stream = [run_block(ops, spec, i, h) for h in stream]
        for h in stream:
            ops.rms_norm(h, spec.final_norm)
        settle()
        for h in stream:  # the head with the final norm's encoding on
            ops.head(ops.rms_norm(h, spec.final_norm))
        settle()
    return ActivationEncodings(bits, encodings, scheme=GRAPH_SCHEME, calibration=dict(calibration or {}))
