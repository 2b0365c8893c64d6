"""``turboboa export --to onnx``: integer weights feeding DequantizeLinear, exactly the QDIR's, and onnxruntime
computes the fake-quant model.

* every bit width, group size and grid kind: onnxruntime's DequantizeLinear output equals
  ``QuantizedLinear.dequantize()`` bit for bit, in the container the bit width calls for;
* tiny random Llama / Qwen2 (q/k/v bias) / padded checkpoints: onnxruntime's logits match the torch
  fake-quant model's within 1e-4 relative (max |diff| / max |logit|);
* the npu profile refuses grids it cannot express in one line (exit 2); int2 at opset 25; byte-identical
  files; external data; the session options keep float activations;
* slow: the default model at 4 bits g32, ONNX PPL within 0.1% of the fake-quant PPL.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from exporters import exporter_names, get_exporter
from exporters.onnx import check_onnx_weights, export_onnx
from exporters.onnx import export as onnx_export
from exporters.onnx.builder import GraphBuilder
from exporters.onnx.check import run_alone
from exporters.onnx.profiles import make_profile
from exporters.onnx.weights import encode_weight
from runtime_check.onnxrt import onnx_logits_fn
from turboboa import quantization
from turboboa.checkpoint import load_fakequant_model, load_qdir
from turboboa.config import QuantConfig
from turboboa.errors import UserError
from turboboa.eval.evaluate import evaluate as evaluate_torch
from turboboa.quantized import QuantizedLinear

from .conftest import assert_one_line_error, make_tiny_llama, onnx_vs_fake_quant, run_cli

REL_BOUND = 1e-4  # max |onnxruntime - torch| / max |torch logit|

# (bits, sym, native int2) -> (weight element type, zero point element type or None)
EXPECTED_CONTAINER = {
    (8, False, False): (TensorProto.UINT8, TensorProto.UINT8), (8, True, False): (TensorProto.INT8, None),
    (4, False, False): (TensorProto.UINT4, TensorProto.UINT4), (4, True, False): (TensorProto.INT4, None),
    (3, False, False): (TensorProto.INT4, None), (3, True, False): (TensorProto.INT4, None),
    (2, False, False): (TensorProto.INT4, None), (2, True, False): (TensorProto.INT4, None),
    (2, False, True): (TensorProto.UINT2, TensorProto.UINT2), (2, True, True): (TensorProto.INT2, None),
}


# --- helpers ---------------------------------------------------------------------------------------------


def random_layer(bits: int, group: int, sym: bool, rows: int = 48, columns: int = 200, seed: int = 0) -> QuantizedLinear:
    """Random codes over the whole grid, scales of mixed magnitudes, integer zero points (``2^(b-1)`` when
    symmetric, anywhere in ``[0, 2^b - 1]`` otherwise, both ends included). 200 columns: ragged last groups."""
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    groups = 1 if group <= 0 else math.ceil(columns / group)
    codes = torch.randint(0, maxq + 1, (rows, columns), generator=gen, dtype=torch.uint8)
    codes[0, 0], codes[0, 1] = 0, maxq
    scale = torch.exp(torch.randn(rows, groups, generator=gen) * 3).float()
    if sym:
        zero = torch.full((rows, groups), float(2 ** (bits - 1)))
    else:
        zero = torch.randint(0, maxq + 1, (rows, groups), generator=gen).float()
        zero[0, 0], zero[-1, -1] = 0.0, float(maxq)
    return QuantizedLinear(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group, sym=sym)


def one_weight_model(q: QuantizedLinear, opset: int) -> onnx.ModelProto:
    """A model whose only output is the DequantizeLinear output of ``q`` as the exporter writes it."""
    b = GraphBuilder()
    out = encode_weight(b, "layer", q, make_profile("generic", opset)).output
    value = helper.make_tensor_value_info(out, TensorProto.FLOAT, [q.shape[1], q.shape[0]])
    graph = helper.make_graph(b.nodes, "w", [], [value], initializer=b.initializers)
    ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=ids, ir_version=helper.find_min_ir_version_for(ids))
    onnx.checker.check_model(model, full_check=True)
    return model


def perturbed_tiny(path, tokenizer, tied: bool = True, **kwargs):
    """A tiny random model with weights of a realistic scale (std 0.05, norms near 1, nonzero biases);
    ``tied=False`` gives it a head of its own."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_llama(path, tokenizer, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if not tied:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)
    model.save_pretrained(folder)
    return folder


def quantize(folder, out, **cfg):
    """An RTN QDIR of ``folder`` (2 calibration samples of 32 tokens)."""
    quantization.quantize(str(folder), QuantConfig(method="rtn", nsamples=2, seqlen=32, **cfg), out, device="cpu",
                 progress=False)
    return load_qdir(out)


def relative_gap(path, ckpt, windows) -> float:
    """max over windows of max |onnxruntime logits - torch fake-quant logits| / max |torch logits|."""
    model = load_fakequant_model(ckpt)
    worst = 0.0
    with onnx_logits_fn(path, threads=2) as fn:
        for window in windows:
            with torch.no_grad():
                ref = model(input_ids=window[None]).logits
            got = fn(window[None])
            assert got.dtype == torch.float32 and got.shape == ref.shape
            worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    return worst


def weight_types(path) -> dict[str, int]:
    """Element type of every initializer of the file, by name."""
    return {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_tokenizer):
    return perturbed_tiny(tmp_path_factory.mktemp("onnx") / "llama", default_tokenizer)


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, default_tokenizer):
    return perturbed_tiny(tmp_path_factory.mktemp("onnx") / "qwen2", default_tokenizer, model_type="qwen2")


@pytest.fixture(scope="module")
def tiny_untied(tmp_path_factory, default_tokenizer):
    return perturbed_tiny(tmp_path_factory.mktemp("onnx") / "untied", default_tokenizer, tied=False)


@pytest.fixture(scope="module")
def windows(text_windows) -> list[torch.Tensor]:
    return text_windows


# --- (1) DequantizeLinear output == dequantize(), every bit width and grid --------------------------------


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [32, 128, -1], ids=["g32", "g128", "per-channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dequantize_linear_equals_fake_quant_weight(bits, group, sym) -> None:
    q = random_layer(bits, group, sym)
    native = bits == 2
    for opset in (21, 25) if native else (21,):
        model = one_weight_model(q, opset)
        inits = {t.name: t for t in model.graph.initializer}
        want_w, want_zp = EXPECTED_CONTAINER[(bits, sym, opset >= 25 and native)]
        assert inits["layer.weight_q"].data_type == want_w
        assert inits["layer.weight_q"].dims == [q.shape[1], q.shape[0]]  # [K, N]
        assert ("layer.weight_zero_point" in inits) == (want_zp is not None)
        if want_zp is not None:
            assert inits["layer.weight_zero_point"].data_type == want_zp
        assert inits["layer.weight_scale"].data_type == TensorProto.FLOAT
        got = run_alone(model)
        assert got.dtype == np.float32
        assert np.array_equal(got.T, q.dequantize().numpy()), f"opset {opset}"


def test_ggml_layers_have_no_encoder() -> None:
    q = random_layer(4, 32, False)
    q.fmt = "q4_1"  # a float offset per block: no integer zero point expresses it
    with pytest.raises(UserError, match="--to gguf.*--format int"):
        encode_weight(GraphBuilder(), "layer", q, make_profile())


def test_damaged_grids_are_refused() -> None:
    q = random_layer(3, 32, False)
    q.zero[1, 1] = 0.5
    with pytest.raises(UserError, match="zero point is not an integer"):
        one_weight_model(q, 21)
    q = random_layer(4, 32, True)
    q.zero[2, 0] = 3.0  # a "symmetric" grid whose zero point is not 2^(b-1): z - z0 leaves int4
    with pytest.raises(UserError, match="do not fit int4"):
        one_weight_model(q, 21)


# --- (2) logits of tiny models -----------------------------------------------------------------------------


CASES = {
    "llama-w4-g32-asym": ("llama", dict(bits=4, group_size=32), {}),
    "qwen2-bias-w8-per-channel": ("qwen2", dict(bits=8, group_size=-1), {}),
    "qwen2-bias-w3-g32-sym": ("qwen2", dict(bits=3, group_size=32, sym=True), {}),
    "llama-padded-w2-g32-static": ("llama", dict(bits=2, group_size=32, pad_to=96), {"seqlen": 64}),
    "llama-q8_0-embedding-w4-g16-sym": ("llama", dict(bits=4, group_size=16, sym=True, embed_format="q8_0"), {}),
    "llama-untied-head-w8-g32-sym": ("untied", dict(bits=8, group_size=32, sym=True), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_model_logits_match_fake_quant(tmp_path, tiny_llama, tiny_qwen2, tiny_untied, windows, case) -> None:
    arch, cfg, options = CASES[case]
    folder = {"llama": tiny_llama, "qwen2": tiny_qwen2, "untied": tiny_untied}[arch]
    ckpt = quantize(folder, tmp_path / "q", **cfg)
    if arch == "qwen2":
        assert any(name.endswith("q_proj.bias") for name in ckpt.float_tensors)
    if arch == "untied":  # the untied head takes the output type (q8_0 at 8 bits), a DequantizeLinear weight
        assert ckpt.layers["lm_head"].fmt == "q8_0" and "lm_head.weight" not in ckpt.float_tensors
    path = export_onnx(ckpt, tmp_path / "m.onnx", **options)
    gaps = check_onnx_weights(path, ckpt)
    assert len(gaps) == len(ckpt.layers) and max(gaps.values()) == 0.0
    used = [w for w in windows if "seqlen" not in options or len(w) == options["seqlen"]]
    gap = relative_gap(path, ckpt, used)
    print(f"{case}: max |onnxruntime - torch| / max |logit| = {gap:.3g}")
    assert gap < REL_BOUND
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["turboboa.bits"] == str(cfg["bits"]) and props["turboboa.method"] == "rtn"
    assert json.loads(props["turboboa.calibration"]) == {"data": "wikitext2", "nsamples": 2, "seqlen": 32, "seed": 0}
    assert props["turboboa.tokenizer"] == "q"  # relative to the model's folder (tmp_path)
    assert props["turboboa.seqlen"] == str(options.get("seqlen", "dynamic"))


# --- (3) profile and format errors, through the command line -------------------------------------------------


@pytest.mark.parametrize("model_type,options,expected", [
    ("mistral", {"sliding_window": 8}, (8, 8)),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}, (None, 8)),
], ids=["mistral-every-layer", "qwen2-upper-layers"])
def test_sliding_windows_match_fake_quant(tmp_path, default_tokenizer, windows, model_type, options, expected) -> None:
    """Per-layer sliding windows (8 keys; windows of 64 and 17 tokens, so the 64-token one is cut): the graph
    masks each layer as the model does, in the dynamic graph and in a static one."""
    from transformers import AutoConfig

    from turboboa.arch import decoder_spec

    folder = perturbed_tiny(tmp_path / model_type, default_tokenizer, model_type=model_type, **options)
    assert decoder_spec(AutoConfig.from_pretrained(folder)).windows == expected
    ckpt = quantize(folder, tmp_path / "q", bits=4, group_size=32)
    for options in ({}, {"seqlen": 64}):
        path = export_onnx(ckpt, tmp_path / "m.onnx", **options)
        used = [w for w in windows if not options or len(w) == 64]
        assert relative_gap(path, ckpt, used) < REL_BOUND


def test_profile_errors_are_one_line(tmp_path, tiny_llama, cli_main) -> None:
    quantize(tiny_llama, tmp_path / "asym", bits=4, group_size=32)
    quantize(tiny_llama, tmp_path / "g16", bits=4, group_size=16, sym=True)
    quantize(tiny_llama, tmp_path / "ggml", format="q4_1")
    out = tmp_path / "m.onnx"
    export = ("export", "--to", "onnx", "-o", str(out))
    assert_one_line_error(cli_main(*export, str(tmp_path / "asym"), "--profile", "npu"), "symmetric", "--sym")
    assert_one_line_error(cli_main(*export, str(tmp_path / "g16"), "--profile", "npu"), "groups of 16",
                          "32, 64, 128")
    assert_one_line_error(cli_main(*export, str(tmp_path / "ggml")), "q4_1", "--to gguf", "--format int")
    assert_one_line_error(cli_main(*export, str(tmp_path / "g16"), "--opset", "28"), "--opset 28", "21")
    assert_one_line_error(cli_main(*export, str(tmp_path / "g16"), "--profile", "npu", "--opset", "25"),
                          "--opset 25")
    assert not out.exists() and not list(tmp_path.glob(".m.onnx*"))


def test_profiles_and_options_in_python(tmp_path, tiny_llama) -> None:
    ckpt = quantize(tiny_llama, tmp_path / "q", bits=4, group_size=32, sym=True)
    with pytest.raises(UserError, match="unknown --profile 'htp'"):
        export_onnx(ckpt, tmp_path / "m.onnx", profile="htp")
    with pytest.raises(UserError, match="must end in .onnx"):
        export_onnx(ckpt, tmp_path / "m.bin")
    with pytest.raises(UserError, match="exceeds the model's 2048 positions"):
        export_onnx(ckpt, tmp_path / "m.onnx", seqlen=4096)
    with pytest.raises(UserError, match="no options"):
        get_exporter("gguf")(ckpt, tmp_path / "m.gguf", opset=21)
    assert "onnx" in exporter_names()
    path = export_onnx(ckpt, tmp_path / "npu.onnx", profile="npu")
    model = onnx.load(str(path))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 512] and model.opset_import[0].version == 21
    assert not {"Shape", "Range"} & {n.op_type for n in model.graph.node}  # static shapes only
    types = {t.data_type for t in model.graph.initializer if t.name.endswith(".weight_q")}
    assert types == {TensorProto.INT4} and not any(t.name.endswith("zero_point") for t in model.graph.initializer)


def test_cli_export_and_eval_in_onnxruntime(tmp_path, tiny_llama, cli_main) -> None:
    q = tmp_path / "q"
    quantize(tiny_llama, q, bits=4, group_size=-1, sym=True)
    out = tmp_path / "m.onnx"
    r = run_cli("export", str(q), "--to", "onnx", "--profile", "npu", "--seqlen", "64", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "bits per weight" in r.stderr
    r = run_cli("eval", str(out), "--seqlen", "64", "--max-windows", "2", "--json", "--threads", "2")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["backend"] == "onnxruntime" and got["windows"] == 2 and got["tokens"] == 2 * 63
    assert got["onnxruntime"]["graph_optimization_level"] == "ORT_ENABLE_BASIC"
    ref = evaluate_torch(str(q), seqlen=64, max_windows=2, device="cpu", progress=False)
    assert abs(got["ppl"] / ref.ppl - 1) < 1e-5
    assert_one_line_error(cli_main("eval", str(out), "--seqlen", "32"), "static sequence length of 64",
                          "--seqlen 64")
    assert_one_line_error(cli_main("eval", str(out), "--backend", "torch"), "--backend onnxruntime")
    moved = tmp_path / "elsewhere"
    q.rename(moved)
    assert_one_line_error(cli_main("eval", str(out), "--seqlen", "64"), "tokenizer", "--tokenizer")
    r = run_cli("eval", str(out), "--seqlen", "64", "--max-windows", "1", "--tokenizer", str(moved), "--json")
    assert r.returncode == 0, r.stderr


# --- (4) native int2 at opset 25 ------------------------------------------------------------------------------


@pytest.mark.parametrize("sym", [False, True], ids=["asym", "sym"])
def test_native_int2_round_trips_at_opset_25(tmp_path, tiny_llama, windows, sym) -> None:
    ckpt = quantize(tiny_llama, tmp_path / "q", bits=2, group_size=32, sym=sym)
    portable = export_onnx(ckpt, tmp_path / "m21.onnx")
    native = export_onnx(ckpt, tmp_path / "m25.onnx", opset=25)
    name = "model.layers.0.mlp.down_proj"
    assert weight_types(portable)[f"{name}.weight_q"] == TensorProto.INT4
    types = weight_types(native)
    assert types[f"{name}.weight_q"] == (TensorProto.INT2 if sym else TensorProto.UINT2)
    assert (f"{name}.weight_zero_point" in types) == (not sym)
    model = onnx.load(str(native))
    codes = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == f"{name}.weight_q"))
    q = ckpt.layers[name]
    expected = q.codes.numpy().astype(np.int16) - (2 if sym else 0)
    assert np.array_equal(codes.astype(np.int16).T, expected)  # the stored codes themselves, unpacked
    props = {p.key: p.value for p in model.metadata_props}
    # the layers' 2-bit container and the embedding's q8_0 (int8) one
    assert json.loads(props["turboboa.containers"]) == {"2": "int2" if sym else "uint2+zp", "8": "int8"}
    assert max(check_onnx_weights(native, ckpt).values()) == 0.0
    assert relative_gap(native, ckpt, windows) < REL_BOUND


# --- (5) reproducible files, external data ------------------------------------------------------------------


def test_exports_are_byte_identical(tmp_path, tiny_qwen2) -> None:
    ckpt = quantize(tiny_qwen2, tmp_path / "q", bits=4, group_size=32)
    a = export_onnx(ckpt, tmp_path / "a.onnx").read_bytes()
    b = export_onnx(load_qdir(tmp_path / "q"), tmp_path / "b.onnx").read_bytes()
    assert a == b
    assert export_onnx(ckpt, tmp_path / "c.onnx", seqlen=32).read_bytes() != a


def test_external_data_when_large(tmp_path, tiny_llama, windows, monkeypatch) -> None:
    ckpt = quantize(tiny_llama, tmp_path / "q", bits=4, group_size=32)
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    path = export_onnx(ckpt, tmp_path / "m.onnx")
    data = onnx_export.external_data_path(path)
    assert data.is_file() and data.stat().st_size > 10 * path.stat().st_size
    first = path.read_bytes(), data.read_bytes()
    assert export_onnx(ckpt, tmp_path / "m.onnx") and (path.read_bytes(), data.read_bytes()) == first
    onnx.checker.check_model(str(path), full_check=True)
    assert max(check_onnx_weights(path, ckpt).values()) == 0.0
    assert relative_gap(path, ckpt, windows) < REL_BOUND
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 2**31)
    export_onnx(ckpt, tmp_path / "m.onnx")
    assert not data.exists()  # a later inline export removes the stale tensor file


# --- the session options keep float activations ---------------------------------------------------------------


def test_session_keeps_dequantize_linear_and_float_activations(tmp_path, tiny_llama) -> None:
    """With our options the graph that runs still has DequantizeLinear -> MatMul (no int8-activation
    MatMulNBits); onnxruntime's default options would have fused it with accuracy_level 4 (so this test
    would notice a change of options)."""
    import onnxruntime as ort

    from runtime_check.onnxrt import session_options

    ckpt = quantize(tiny_llama, tmp_path / "q", bits=4, group_size=32)
    path = export_onnx(ckpt, tmp_path / "m.onnx")

    def optimized(opts) -> list[onnx.NodeProto]:
        opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return list(onnx.load(str(tmp_path / "opt.onnx")).graph.node)

    ours = optimized(session_options(2))
    assert not [n for n in ours if n.op_type == "MatMulNBits"]
    # one DequantizeLinear per stored weight (onnxruntime may give a shared one a copy per consumer)
    assert len({n.input[0] for n in ours if n.op_type == "DequantizeLinear"}) == len(ckpt.layers)
    default = optimized(ort.SessionOptions())
    levels = {a.i for n in default if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
    assert levels == {4}


# --- (6) the default model ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_onnx_ppl_matches_fake_quant(tmp_path) -> None:
    """SmolLM2-135M, RTN 4-bit g32: every DequantizeLinear output equals the fake-quant weight and
    onnxruntime's PPL (``turboboa eval model.onnx``) is within 0.1% of the fake-quant model's."""
    q = tmp_path / "q"
    quantization.quantize("smollm2-135m", QuantConfig(method="rtn", bits=4, group_size=32, nsamples=2, seqlen=128), q,
                 device="cpu", progress=False)
    ckpt = load_qdir(q)
    path = get_exporter("onnx")(ckpt, tmp_path / "m.onnx")
    gaps = check_onnx_weights(path, ckpt)
    assert len(gaps) == len(ckpt.layers) and max(gaps.values()) == 0.0
    got, ref, rel = onnx_vs_fake_quant(path, q)
    print(f"smollm2-135m rtn w4 g32: fake-quant ppl {ref.ppl:.6f}, onnxruntime ppl {got['ppl']:.6f}, "
          f"relative {rel:.2e}, file {path.stat().st_size / 2**20:.1f} MiB")
    assert rel < 1e-3  # the bound
    # float activations throughout (measured 1.2e-7); MatMulNBits with int8 activations would be 3e-5 to 3e-4
    assert rel < 1e-5
