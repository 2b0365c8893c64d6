"""Static activation quantization (``--act-bits 8|16``): per-tensor uint8/uint16 encodings of every quantized
layer's input, calibrated on the fake-quant model, simulated in torch exactly as onnxruntime computes them.

* the torch simulation equals onnxruntime's QuantizeLinear -> DequantizeLinear bit for bit (exact .5 ties
  and saturation included);
* calibration observes each layer's input with every earlier encoding on;
* QDIR round trip, ``turboboa calibrate`` replaces the encodings atomically, old QDIRs keep float activations;
* tiny Llama, 8 and 16 bits: the exported graph runs the same quantizers as the torch model (every
  quantized activation equal, except where float noise upstream of a quantizer straddles a rounding
  boundary), and with the same quantized activations the logits agree within 1e-4 relative;
* onnxruntime's pinned session options keep the activation QuantizeLinear/DequantizeLinear;
* bad ``--act-bits`` use is one line and exit 2;
* slow: the default model, RTN w4 per-channel with 16-bit activations under ``--profile npu``, ONNX PPL
  within 0.1% of the fake-quant PPL.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from exporters.onnx import check_onnx_weights, export_onnx
from runtime_check.onnxrt import session_options
from turboboa import quantization
from turboboa.activations import encoding_from_range, fake_quant, install_input_quantization
from turboboa.activations.qdir import calibrate as calibrate_qdir
from turboboa.checkpoint import load_fakequant_model, load_qdir
from turboboa.config import QuantConfig
from turboboa.data import calibration_batch, eval_tokens
from turboboa.errors import UserError

from .conftest import EMBEDDING, onnx_vs_fake_quant, run_cli
from .test_onnx_export import REL_BOUND, assert_one_line_error, perturbed_tiny, relative_gap

CALIB = dict(nsamples=4, seqlen=32)


def quantize(folder, out, act_bits: int | None, **cfg):
    """An RTN QDIR of ``folder`` (4 calibration samples of 32 tokens) with ``act_bits`` encodings; the embedding
    and head stay float unless ``cfg`` says otherwise (these tests count the linear layers' encodings)."""
    cfg = {"embed_format": "float", **cfg}
    quantization.quantize(str(folder), QuantConfig(method="rtn", **CALIB, **cfg), out, device="cpu", progress=False,
                 act_bits=act_bits)
    return load_qdir(out)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_tokenizer):
    return perturbed_tiny(tmp_path_factory.mktemp("act") / "llama", default_tokenizer)


@pytest.fixture(scope="module")
def windows(default_tokenizer) -> list[torch.Tensor]:
    ids = eval_tokens(default_tokenizer, "wikitext2")
    return [ids[:64], ids[64:128]]


# --- the quantizer itself -----------------------------------------------------------------------------------


def qdq_model(scale: float, zero_point: int, bits: int, n: int) -> onnx.ModelProto:
    """``DequantizeLinear(QuantizeLinear(x))`` with a per-tensor uint8/uint16 encoding, opset 21."""
    dtype = np.uint8 if bits == 8 else np.uint16
    inits = [onnx.numpy_helper.from_array(np.array(scale, dtype=np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(zero_point, dtype=dtype), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n])], inits)
    ids = [helper.make_opsetid("", 21)]
    return helper.make_model(graph, opset_imports=ids, ir_version=helper.find_min_ir_version_for(ids))


@pytest.mark.parametrize("bits", [8, 16])
def test_simulation_equals_onnxruntime_bit_for_bit(bits: int) -> None:
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(bits)
    for trial in range(4):
        x = torch.randn(50_000, generator=gen) * float(torch.exp(torch.randn(1, generator=gen) * 2))
        enc = encoding_from_range(0.7 * float(x.min()), 0.7 * float(x.max()), bits)  # 30% of values saturate
        s = enc.scale
        k = torch.randint(-(2**bits), 2**bits, (4000,), generator=gen).float()
        ties = (k + 0.5) * s
        ties = ties[ties / s == k + 0.5]  # exact .5 ties of x / s
        assert ties.numel() > 2000
        x = torch.cat([x, ties, torch.tensor([0.0, -0.0])])
        model = qdq_model(float(s), enc.zero_point, bits, x.numel())
        session = ort.InferenceSession(model.SerializeToString(), session_options(1),
                                       providers=["CPUExecutionProvider"])
        got = session.run(None, {"x": x.numpy()})[0]
        ours = fake_quant(x, s, enc.zero_point, bits).numpy()
        assert np.array_equal(got, ours), f"trial {trial}: {int((got != ours).sum())} differ"
        zp, qmax = enc.zero_point, 2**bits - 1
        reciprocal = ((torch.clamp(torch.round(x * (1 / s)) + zp, 0, qmax) - zp) * s).numpy()
        print(f"uint{bits} trial {trial}: {ties.numel()} ties, x * (1/s) would differ on "
              f"{int((got != reciprocal).sum())} of {x.numel()}")


def test_min_max_encodings() -> None:
    enc = encoding_from_range(-1.0, 3.0, 8)
    assert float(enc.scale) == np.float32(4.0 / 255) and enc.zero_point == round(1.0 / float(enc.scale))
    assert float(fake_quant(torch.tensor([0.0]), enc.scale, enc.zero_point, 8)) == 0.0  # 0 is exact
    assert encoding_from_range(0.5, 2.0, 16).zero_point == 0  # the range always holds 0
    assert encoding_from_range(-4.0, -1.0, 16).zero_point == 2**16 - 1
    empty = encoding_from_range(0.0, 0.0, 8)
    assert (float(empty.scale), empty.zero_point) == (1.0, 0)


# --- calibration and the QDIR -------------------------------------------------------------------------------


def test_calibration_observes_inputs_with_earlier_encodings_on(tmp_path, tiny_llama,
                                                               default_tokenizer) -> None:
    """Re-observe two inputs with the HF forward: o_proj of block 0 with q/k/v quantized, q_proj of block 1
    with all of block 0 quantized; their ranges are the calibrated ones."""
    ckpt = quantize(tiny_llama, tmp_path / "q", 8, bits=4, group_size=32, sym=True)
    enc = ckpt.activations
    assert enc.bits == 8 and set(enc.layers) == set(ckpt.layers)
    block0 = [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                "mlp.down_proj")]
    assert enc.layers[block0[0]] == enc.layers[block0[1]] == enc.layers[block0[2]]  # one shared input
    ids = calibration_batch(default_tokenizer, "wikitext2", CALIB["nsamples"], CALIB["seqlen"], 0)
    assert enc.calibration == {"data": "wikitext2", **CALIB, "seed": 0, "tokens": int(ids.numel())}
    for observed, earlier in (("model.layers.0.self_attn.o_proj", block0[:3]),
                              ("model.layers.1.self_attn.q_proj", block0)):
        model = load_fakequant_model(ckpt, activations=False)
        install_input_quantization(model, enc, earlier)
        seen: list[torch.Tensor] = []
        module = model.get_submodule(observed)
        module.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].detach()))
        with torch.no_grad():
            model(input_ids=ids)
        lo, hi = float(torch.stack(seen).min()), float(torch.stack(seen).max())
        e = enc.layers[observed]
        assert lo == pytest.approx(e.lo, rel=1e-5) and hi == pytest.approx(e.hi, rel=1e-5), observed
        assert e.lo < 0 < e.hi and 0 < e.zero_point < 255


def test_qdir_round_trip_and_calibrate_replaces_atomically(tmp_path, tiny_llama, windows) -> None:
    q = tmp_path / "q"
    plain = quantize(tiny_llama, q, None, bits=4, group_size=32, sym=True)
    assert plain.activations is None
    assert "activations" not in json.loads((q / "quant_config.json").read_text())
    weights = (q / "quantized.safetensors").read_bytes()
    x = windows[0][None]
    with torch.no_grad():
        float_acts = load_fakequant_model(plain)(input_ids=x).logits
    enc8 = calibrate_qdir(str(q), 8, device="cpu", progress=False)
    ckpt = load_qdir(q)
    assert ckpt.activations.bits == 8 and ckpt.activations.layers.keys() == ckpt.layers.keys()
    for name, e in enc8.layers.items():
        back = ckpt.activations.layers[name]
        assert torch.equal(back.scale, e.scale) and back.zero_point == e.zero_point
    with torch.no_grad():
        a8 = load_fakequant_model(ckpt)(input_ids=x).logits
        assert torch.equal(load_fakequant_model(ckpt, activations=False)(input_ids=x).logits, float_acts)
    assert not torch.equal(a8, float_acts)
    # the same calibration as quantize --act-bits 8 on the same data
    direct = quantize(tiny_llama, tmp_path / "direct", 8, bits=4, group_size=32, sym=True)
    assert {n: (float(e.scale), e.zero_point) for n, e in direct.activations.layers.items()} == \
        {n: (float(e.scale), e.zero_point) for n, e in enc8.layers.items()}
    calibrate_qdir(str(q), 16, nsamples=2, device="cpu", progress=False)
    ckpt = load_qdir(q)
    assert ckpt.activations.bits == 16 and ckpt.activations.calibration["nsamples"] == 2
    assert json.loads((q / "quant_config.json").read_text())["activations"]["dtype"] == "uint16"
    assert (q / "quantized.safetensors").read_bytes() == weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["direct", "q"]  # no temporary folders left
    with pytest.raises(UserError, match="--act-bits 4"):
        calibrate_qdir(str(q), 4, device="cpu", progress=False)


# --- onnxruntime runs the same quantizers -------------------------------------------------------------------


def forced_comparison(path, ckpt, window: torch.Tensor) -> tuple[float, int, int]:
    """Run the graph with every activation QuantizeLinear's input and DequantizeLinear's output exposed, then
    the torch fake-quant model whose hooks (1) check that torch's quantized input equals onnxruntime's except
    where a rounding boundary lies between torch's and onnxruntime's ``x / s`` (float noise upstream flipped
    a rounding, the quantizers agree), and (2) go on with onnxruntime's value, so both sides see the same
    quantized inputs. Returns (max |logit diff| / max |logit|, flipped elements, quantized elements)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    enc = ckpt.activations
    raw_of = {n.name[: -len("/InputQuantize")]: n.input[0] for n in model.graph.node
              if n.name.endswith("/InputQuantize")}
    assert set(raw_of) == set(enc.layers)
    extra = sorted(set(raw_of.values()) | {f"{name}/InputDequantize" for name in raw_of})
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in extra)
    session = ort.InferenceSession(model.SerializeToString(), session_options(2),
                                   providers=["CPUExecutionProvider"])
    names = ["logits", *extra]
    values = dict(zip(names, session.run(names, {"input_ids": window[None].numpy()}), strict=True))
    torch_model = load_fakequant_model(ckpt, activations=False)
    counts = [0, 0]

    def hook(name: str):
        e = enc.layers[name]

        def run(module, args):
            x = args[0]
            ours = fake_quant(x, e.scale, e.zero_point, enc.bits)
            theirs = torch.from_numpy(values[f"{name}/InputDequantize"]).reshape(x.shape)
            their_x = torch.from_numpy(values[raw_of[name]]).reshape(x.shape)
            # the same input up to float noise
            assert float((x - their_x).abs().max()) <= 1e-5 * float(x.abs().max()), name
            flipped = ours != theirs
            t1, t2 = x[flipped] / e.scale, their_x[flipped] / e.scale
            lo, hi = torch.minimum(t1, t2), torch.maximum(t1, t2)
            boundary = torch.floor(hi - 0.5) >= torch.ceil(lo - 0.5)  # a k + 1/2 in [lo, hi]
            assert bool(boundary.all()), f"{name}: a flip without a rounding boundary"
            counts[0] += int(flipped.sum())
            counts[1] += x.numel()
            return (theirs, *args[1:])

        return run

    for name in enc.layers:
        torch_model.get_submodule(name).register_forward_pre_hook(hook(name))
    with torch.no_grad():
        ref = torch_model(input_ids=window[None]).logits
    got = torch.from_numpy(values["logits"])
    return float((got - ref).abs().max() / ref.abs().max()), counts[0], counts[1]


@pytest.mark.parametrize("bits", [8, 16])
def test_tiny_model_runs_the_same_quantizers_in_onnxruntime(tmp_path, tiny_llama, windows, bits) -> None:
    ckpt = quantize(tiny_llama, tmp_path / "q", bits, bits=4, group_size=32, sym=True)
    for profile, options in (("generic", {}), ("npu", {"seqlen": 64})):
        path = export_onnx(ckpt, tmp_path / f"{profile}.onnx", profile=profile, act_bits=bits, **options)
        assert max(check_onnx_weights(path, ckpt).values()) == 0.0
        model = onnx.load(str(path))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("QuantizeLinear") == len(ckpt.activations.layers) == len(ckpt.layers)
        zero_points = [t for t in model.graph.initializer if t.name.endswith(".input_zero_point")]
        assert {t.data_type for t in zero_points} == {TensorProto.UINT8 if bits == 8 else TensorProto.UINT16}
        props = {p.key: p.value for p in model.metadata_props}
        assert props["turboboa.act_bits"] == str(bits)
        assert json.loads(props["turboboa.activations"])["dtype"] == f"uint{bits}"
        for window in windows:
            gap, flips, total = forced_comparison(path, ckpt, window)
            plain = relative_gap(path, ckpt, [window])
            print(f"a{bits} {profile}: forced {gap:.2e} ({flips} of {total} quantized activations flipped by "
                  f"float noise at a rounding boundary), unforced {plain:.2e}")
            assert gap < REL_BOUND


def test_session_keeps_the_activation_qdq(tmp_path, tiny_llama) -> None:
    """The evaluator's pinned options neither fold nor fuse the activation QuantizeLinear/DequantizeLinear:
    in the graph onnxruntime runs, every quantized MatMul still reads DequantizeLinear(QuantizeLinear(x)) with
    its layer's encoding. (Its QDQ propagation copies o_proj's pair up through the Reshape and Transpose in
    front of it: the same values, as quantizing a grid value again gives it back.)"""
    import onnxruntime as ort

    ckpt = quantize(tiny_llama, tmp_path / "q", 8, bits=4, group_size=32, sym=True)
    path = export_onnx(ckpt, tmp_path / "m.onnx")
    opts = session_options(2)
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    graph = onnx.load(str(tmp_path / "opt.onnx")).graph
    producer = {out: n for n in graph.node for out in n.output}
    inits = {t.name: t for t in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1].endswith(".weight_dq")]
    assert len(matmuls) == len(ckpt.layers)
    for mm in matmuls:
        name = mm.input[1][: -len(".weight_dq")]
        dq = producer[mm.input[0]]
        q = producer[dq.input[0]]
        assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear"), name
        assert dq.input[1:] == q.input[1:]
        enc = ckpt.activations.layers[name]  # (q/k/v's equal encodings may share one pair of constants)
        assert float(onnx.numpy_helper.to_array(inits[q.input[1]])) == float(enc.scale)
        assert int(onnx.numpy_helper.to_array(inits[q.input[2]])) == enc.zero_point
    ops = {n.op_type for n in graph.node}
    fused = {"QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"}
    assert not fused & ops


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_calibrate_export_eval_and_errors(tmp_path, tiny_llama, cli_main) -> None:
    q = tmp_path / "q"
    quantize(tiny_llama, q, None, bits=4, group_size=-1, sym=True)
    out = tmp_path / "m.onnx"
    export = ("export", str(q), "--to", "onnx", "--profile", "npu", "--seqlen", "64", "-o", str(out))
    assert_one_line_error(cli_main(*export, "--act-bits", "8"), "no activation encodings",
                          "turboboa calibrate")
    assert_one_line_error(cli_main("quantize", str(tiny_llama), "--act-bits", "4", "--act-scope", "inputs",
                                   "-o", str(tmp_path / "x")), "--act-bits 4", "8 or 16")
    assert_one_line_error(cli_main("calibrate", str(tmp_path), "--act-bits", "8"), "not a turboboa QDIR")
    r = run_cli("calibrate", str(q), "--act-bits", "16", "--nsamples", "2", "--seqlen", "32", "-q", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dtype"] == "uint16" and json.loads(r.stdout)["layers"] == 14
    assert_one_line_error(cli_main(*export, "--act-bits", "8"), "does not match", "--act-bits 16")
    r = run_cli(*export, "--act-bits", "16")
    assert r.returncode == 0, r.stderr
    torch_run = run_cli("eval", str(q), "--seqlen", "64", "--max-windows", "2", "--json")
    onnx_run = run_cli("eval", str(out), "--seqlen", "64", "--max-windows", "2", "--json", "--threads", "2")
    assert torch_run.returncode == 0 and onnx_run.returncode == 0, torch_run.stderr + onnx_run.stderr
    ref, got = json.loads(torch_run.stdout), json.loads(onnx_run.stdout)
    assert ref["activations"]["dtype"] == got["activations"]["dtype"] == "uint16"
    print(f"tiny a16: fake-quant ppl {ref['ppl']:.6f}, onnxruntime ppl {got['ppl']:.6f}")
    assert abs(got["ppl"] / ref["ppl"] - 1) < 1e-4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- the default model --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_npu_a16_onnx_ppl_matches_fake_quant(tmp_path) -> None:
    """SmolLM2-135M, RTN w4 per-channel symmetric with 16-bit static activations, exported under
    --profile npu: every DequantizeLinear output equals the fake-quant weight and onnxruntime's PPL is within
    0.1% of the fake-quant model's (which simulates the same activation quantization)."""
    from exporters import get_exporter

    q = tmp_path / "q"
    cfg = QuantConfig(method="rtn", bits=4, group_size=-1, sym=True, nsamples=2, seqlen=128)
    quantization.quantize("smollm2-135m", cfg, q, device="cpu", progress=False, act_bits=16)
    ckpt = load_qdir(q)
    # every linear layer's input is encoded; the embedding (q8_0 by default) is a table, not a layer
    assert ckpt.activations.bits == 16 and set(ckpt.activations.layers) == set(ckpt.layers) - {EMBEDDING}
    path = get_exporter("onnx")(ckpt, tmp_path / "m.onnx", profile="npu", seqlen=256, act_bits=16)
    gaps = check_onnx_weights(path, ckpt)
    assert len(gaps) == len(ckpt.layers) and max(gaps.values()) == 0.0
    got, ref, rel = onnx_vs_fake_quant(path, q)
    print(f"smollm2-135m rtn w4 per-channel a16 npu: fake-quant ppl {ref.ppl:.6f}, onnxruntime ppl "
          f"{got['ppl']:.6f}, relative {rel:.2e}")
    assert ref.extra["activations"]["dtype"] == got["activations"]["dtype"] == "uint16"
    assert rel < 1e-3
