"""The fully quantized decoder of ``--profile qnn-htp`` (every tensor quantized, every op a QDQ node unit).

* the torch simulation is the decoder: with every point quantized at 16 bits it stays within the 16-bit
  noise of the Hugging Face model carrying the same (int8 head) weights;
* the exported graph computes the simulation: onnxruntime CPU's logits equal the torch simulation's except
  where float summation order moves a value across a rounding boundary of some point, which shifts that
  position's logits by a few steps (measured: at most 3 logit steps, 0.3 on average), at 8 and 16 bits, for Llama and for Qwen2 (q/k/v biases);
* every quantized weight's DequantizeLinear output equals the QDIR's fake-quant weight;
* the emulated HTP takes the whole graph with CPU fallback disabled (when onnxruntime-qnn is installed);
* bad use is one line: no graph encodings, blocked uniform grids, asymmetric grids, encodings of the wrong
  scope for another profile.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from exporters.onnx import check_onnx_weights, export_onnx
from runtime_check.onnxrt import onnx_logits_fn
from turboboa import quantization
from turboboa.activations import ActivationEncodings
from turboboa.activations.points import GRAPH_SCHEME
from turboboa.activations.program import signed_sine, swap_index
from turboboa.activations.simulate import QuantizedGraphModel
from turboboa.checkpoint import load_fakequant_model, load_qdir
from turboboa.config import QuantConfig
from turboboa.data import eval_tokens
from turboboa.errors import UserError

from .conftest import HEAD, make_tiny_llama

SEQLEN = 64
CALIB = dict(nsamples=4, seqlen=SEQLEN)


def quantize(folder, out, act_bits: int | None = 16, scope: str = "graph", **cfg):
    """An RTN QDIR of ``folder`` (symmetric per channel unless ``cfg`` says otherwise) with graph encodings."""
    cfg = {"bits": 4, "group_size": -1, "sym": True, **cfg}
    quantization.quantize(str(folder), QuantConfig(method="rtn", **CALIB, **cfg), out, device="cpu", progress=False,
                 act_bits=act_bits, act_scope=scope)
    return load_qdir(out)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("qnn") / "llama", default_tokenizer)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory, default_tokenizer):
    return make_tiny_llama(tmp_path_factory.mktemp("qnn") / "qwen", default_tokenizer, model_type="qwen2")


@pytest.fixture(scope="module")
def windows(default_tokenizer) -> list[torch.Tensor]:
    ids = eval_tokens(default_tokenizer, "wikitext2")
    return [ids[1000 : 1000 + SEQLEN], ids[5000 : 5000 + SEQLEN]]


def test_swap_with_signed_sine_is_rotate_half() -> None:
    x, sin = torch.randn(3, 8), np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    rotate_half = torch.cat([-x[:, 4:], x[:, :4]], dim=1)
    swapped = x[:, torch.from_numpy(swap_index(8))]
    assert torch.equal(swapped * torch.from_numpy(signed_sine(sin)), rotate_half * torch.from_numpy(sin))


def test_simulation_is_the_decoder(tmp_path, tiny, windows) -> None:
    """With no point quantized the simulation is the Hugging Face model carrying the graph's constants (int8
    head; uint16 embedding, norm weights and RoPE tables): measured 5e-5 of the logits' range. With every
    point at 16 bits it moves by the residual stream's rounding (its range is set by a few large channels;
    measured 3% of the range on this random model)."""
    ckpt = quantize(tiny, tmp_path / "q")
    assert ckpt.activations.scheme == GRAPH_SCHEME
    sim = load_fakequant_model(ckpt)
    assert isinstance(sim, QuantizedGraphModel)
    float_points = QuantizedGraphModel(ckpt, ActivationEncodings(16, {}, scheme=GRAPH_SCHEME))
    hf = load_fakequant_model(ckpt, activations=False)
    hf.lm_head.weight = torch.nn.Parameter(torch.from_numpy(sim.consts.head_weight()))  # the graph's int8 head
    for w in windows:
        ref = hf(input_ids=w[None]).logits
        scale = ref.abs().max()
        assert (float_points(input_ids=w[None]).logits - ref).abs().max() <= 1e-3 * scale
        assert (sim(input_ids=w[None]).logits - ref).abs().max() <= 0.1 * scale


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_onnx_graph_equals_simulation(tmp_path, tiny, tiny_qwen, windows, bits, model) -> None:
    folder = tiny if model == "llama" else tiny_qwen
    ckpt = quantize(folder, tmp_path / "q", act_bits=bits)
    path = export_onnx(ckpt, tmp_path / "m.onnx", profile="qnn-htp", seqlen=SEQLEN, act_bits=bits)
    assert max(check_onnx_weights(path, ckpt).values()) == 0.0
    sim = load_fakequant_model(ckpt)
    step = float(ckpt.activations.layers[HEAD].scale)  # one quantization step of the logits
    with onnx_logits_fn(path) as ort_logits:
        for w in windows:
            a, b = sim(input_ids=w[None]).logits, ort_logits(w[None])
            gap = (a - b).abs()
            print(f"{model} a{bits}: max {float(gap.max()) / step:.1f} steps, mean {float(gap.mean()) / step:.2f}")
            assert gap.max() <= 8 * step and gap.mean() <= 0.5 * step


@pytest.mark.parametrize("grid,bits", [("w4", 16), ("lpbq4", 16), ("w8", 8)])
def test_htp_takes_the_whole_graph(tmp_path, tiny, windows, grid, bits) -> None:
    """CPU fallback disabled: the session only builds when HTP accepts every node: W4A16 per channel, LPBQ
    blocks of 32 with 16-bit activations, W8A8 (measured: the HTP's logits within 0.12%, 0.02% and 1.2% of
    the largest logit of onnxruntime CPU's on the same graph)."""
    pytest.importorskip("onnxruntime_qnn")
    from runtime_check.qnn import qnn_logits_fn

    cfg = {"w4": {}, "lpbq4": {"format": "lpbq4", "group_size": 32}, "w8": {"bits": 8}}[grid]
    ckpt = quantize(tiny, tmp_path / "q", act_bits=bits, **cfg)
    path = export_onnx(ckpt, tmp_path / "m.onnx", profile="qnn-htp", seqlen=SEQLEN, act_bits=bits)
    with qnn_logits_fn(path) as htp, onnx_logits_fn(path) as cpu:
        assert htp.qnn.npu_share == 1.0 and not htp.qnn.fallback_nodes
        got, ref = htp(windows[0][None]), cpu(windows[0][None])
    print(f"HTP vs CPU: {float((got - ref).abs().max() / ref.abs().max()):.2%} of the largest logit")
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


def test_refusals(tmp_path, tiny) -> None:
    plain = quantize(tiny, tmp_path / "plain", act_bits=None)
    with pytest.raises(UserError, match="--scope graph"):
        export_onnx(plain, tmp_path / "a.onnx", profile="qnn-htp", seqlen=SEQLEN)
    inputs = quantize(tiny, tmp_path / "inputs", scope="inputs")
    with pytest.raises(UserError, match="linear inputs only"):
        export_onnx(inputs, tmp_path / "b.onnx", profile="qnn-htp", seqlen=SEQLEN)
    blocked = quantize(tiny, tmp_path / "blocked", group_size=32)
    with pytest.raises(UserError, match="per output channel only"):
        export_onnx(blocked, tmp_path / "c.onnx", profile="qnn-htp", seqlen=SEQLEN)
    asym = quantize(tiny, tmp_path / "asym", sym=False)
    with pytest.raises(UserError, match="--sym"):
        export_onnx(asym, tmp_path / "d.onnx", profile="qnn-htp", seqlen=SEQLEN)
    with pytest.raises(UserError, match="--profile qnn-htp"):
        export_onnx(asym, tmp_path / "e.onnx", profile="npu", seqlen=SEQLEN, act_bits=16)
