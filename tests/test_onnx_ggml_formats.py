"""One QDIR on a symmetric ggml type exports to both GGUF and ONNX QDQ with bit-identical weights.

q4_0, q5_0, q8_0, q3_k and q6_k dequantize as ``w = scale_g * (q - l_0)`` with no offset, so each is one
blocked DequantizeLinear: the signed level in int4 (q4_0, q3_k) or int8 (q5_0, q8_0, q6_k), no zero point,
the float32 group scale (``d``, or the exact ``fp32(d * sc_g)`` of the k-quants), ``block_size`` 32 or 16.

* random grids over the whole ranges: DequantizeLinear's output equals the fake-quant weight and ggml's
  dequantization of the packed bytes, bit for bit (signed zeros included);
* RTN and GPTQ QDIRs of a tiny Llama of width 256/512 (an all-zero row and all-zero blocks in its weights):
  ``check_onnx_weights`` and ``check_gguf_weights`` give 0 for every layer of the same QDIR, the full ONNX
  checker passes, the logits match the torch fake-quant model;
* a tiny random Llama quantized with ``--format q4_0`` (the coming default): logits within 1e-4 relative,
  under the generic and the npu profile;
* formats with a float offset (q4_1, q5_1, q2_k, q4_k, q5_k) and iq4_nl are refused in one line naming the
  layer, the type and the formats that export; ``--profile npu`` refuses the 16-column groups of q3_k/q6_k.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from exporters.gguf.export import check_gguf_weights, export_gguf
from exporters.onnx import check_onnx_weights, export_onnx
from exporters.onnx.builder import GraphBuilder
from exporters.onnx.check import run_alone
from exporters.onnx.containers import LEVEL_FORMATS, level_container
from exporters.onnx.profiles import make_profile
from exporters.onnx.weights import ONNX_FORMATS, check_onnx_format, encode_weight, onnx_expressible
from turboboa import quantization
from turboboa.blockwise import quantize_layer
from turboboa.checkpoint import load_qdir
from turboboa.config import QuantConfig
from turboboa.errors import UserError
from turboboa.formats import GgmlGrid, all_format_names, get_format
from turboboa.formats.lpbq import LPBQ_BLOCKS
from turboboa.quantized import QuantizedLinear
from turboboa.solvers import LayerProblem

from .conftest import EMBEDDING, make_tiny_llama, run_cli
from .test_format_solvers import problem
from .test_onnx_export import REL_BOUND, assert_one_line_error, one_weight_model, perturbed_tiny, relative_gap

EXPORTABLE = ("q4_0", "q5_0", "q8_0", "q3_k", "q6_k")
REFUSED = ("q4_1", "q5_1", "q2_k", "q4_k", "q5_k", "iq4_nl")
# format -> (weight element type, block size, signed level range)
EXPECTED = {
    "q4_0": (TensorProto.INT4, 32, (-8, 7)), "q5_0": (TensorProto.INT8, 32, (-16, 15)),
    "q8_0": (TensorProto.INT8, 32, (-128, 127)), "q3_k": (TensorProto.INT4, 16, (-4, 3)),
    "q6_k": (TensorProto.INT8, 16, (-32, 31)),
}
ZERO_ROW = ("model.layers.0.mlp.down_proj", 3)  # (layer, row) set to 0 in the tiny model
ZERO_BLOCK = ("model.layers.0.mlp.up_proj", 5)  # (layer, row) whose first 256 columns are 0


# --- helpers ----------------------------------------------------------------------------------------------


def bits_of(x: np.ndarray) -> np.ndarray:
    """The float32 bit patterns of ``x`` (so -0.0 and 0.0 differ)."""
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


def random_ggml_layer(fmt: str, rows: int = 24, columns: int = 512, seed: int = 0) -> QuantizedLinear:
    """Random codes over the whole range, signed fp16 ``d`` of mixed magnitudes (zeros, fp16 subnormals and
    the fp16 extremes included), sub-scales over their whole range (both ends), as the QDIR stores them."""
    f = get_format(fmt)
    gen = torch.Generator().manual_seed(seed)
    n_blocks, n_groups = columns // f.block_size, columns // f.group_size
    codes = torch.randint(0, f.code_max() + 1, (rows, columns), generator=gen, dtype=torch.uint8)
    codes[0, :2] = torch.tensor([0, f.code_max()], dtype=torch.uint8)
    sign = torch.sign(torch.randn(rows, n_blocks, generator=gen))
    d = torch.exp(torch.randn(rows, n_blocks, generator=gen) * 2) * sign
    d[1, 0], d[2, 0], d[3, 0], d[4, 0] = 0.0, 2.0**-24, 65504.0, -6.1e-5  # zero, subnormal, max, tiny normal
    d = d.to(torch.float16).to(torch.float32)
    sc = None
    if f.sc_range is not None:
        lo, hi = f.sc_range
        sc = torch.randint(lo, hi + 1, (rows, n_groups), generator=gen, dtype=torch.int32)
        sc[0, :2] = torch.tensor([lo, hi], dtype=torch.int32)
    grid = GgmlGrid(d=d, sc=sc)
    scale, offset = f.group_scale_offset(grid)
    return QuantizedLinear(codes=codes, scale=scale, zero=offset, bits=f.bits, group_size=f.group_size, sym=True,
                           fmt=fmt, grid=grid)


def solved_layer(fmt: str, method: str = "rtn") -> QuantizedLinear:
    """A random 32 x 512 layer (an all-zero row, an all-zero 256-column block) quantized onto ``fmt``."""
    W, H, _ = problem(C=512, R=32)
    return quantize_layer(LayerProblem("layer", W, H, fmt=fmt), QuantConfig(method=method, format=fmt))


def props_of(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.fixture(scope="module")
def tiny_wide(tmp_path_factory, default_tokenizer):
    """A one-block Llama of width 256 and MLP 512 (every layer takes every k-quant), realistic weight scales,
    with an all-zero row, an all-zero 256-column block and an all-zero 32-column block."""
    from transformers import AutoModelForCausalLM

    folder = make_tiny_llama(tmp_path_factory.mktemp("wide") / "tiny-wide", default_tokenizer, hidden=256,
                             heads=4, kv_heads=2, layers=1, intermediate=512)
    model = AutoModelForCausalLM.from_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for p in params.values():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if p.dim() == 1 else 0.05 * noise)
        params[f"{ZERO_ROW[0]}.weight"][ZERO_ROW[1]] = 0
        params[f"{ZERO_BLOCK[0]}.weight"][ZERO_BLOCK[1], :256] = 0
        params["model.layers.0.mlp.gate_proj.weight"][7, :32] = 0
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qdirs(tmp_path_factory, tiny_wide):
    """``get(fmt, method)``: the QDIR of the wide tiny model on ``fmt`` (made once per module)."""
    root = tmp_path_factory.mktemp("qdirs")
    made: dict[tuple[str, str], object] = {}

    def get(fmt: str, method: str = "rtn"):
        if (fmt, method) not in made:
            out = root / f"{fmt}-{method}"
            cfg = QuantConfig(method=method, format=fmt, embed_format="float", nsamples=2, seqlen=32)
            quantization.quantize(str(tiny_wide), cfg, out, device="cpu", progress=False)
            made[(fmt, method)] = out
        return made[(fmt, method)]

    return get


@pytest.fixture(scope="module")
def window(default_tokenizer) -> torch.Tensor:
    from turboboa.data import eval_tokens

    return eval_tokens(default_tokenizer, "wikitext2")[:64]


# --- (1) which formats export ------------------------------------------------------------------------------


def test_onnx_formats_are_the_symmetric_uniform_ggml_types() -> None:
    assert LEVEL_FORMATS == EXPORTABLE
    assert ONNX_FORMATS == {"int", *LPBQ_BLOCKS.values(), *EXPORTABLE}
    for name in all_format_names():  # the registry holds the uniform grid "int" too
        assert onnx_expressible(name) == (name in EXPORTABLE or name in LPBQ_BLOCKS.values() or name == "int"), name
        assert onnx_expressible(name.upper()) == onnx_expressible(name)
    assert onnx_expressible("int")
    assert {name: level_container(name).name for name in EXPORTABLE} == {
        "q4_0": "int4", "q5_0": "int8", "q8_0": "int8", "q3_k": "int4", "q6_k": "int8"}
    assert all(level_container(name) is None for name in (*REFUSED, "int", "lpbq4"))


def test_formats_can_be_refused_before_quantizing() -> None:
    for fmt in EXPORTABLE:
        check_onnx_format(fmt)
    for fmt in ("q4_0", "q5_0", "q8_0", "int", "lpbq4", "lpbq4_g64"):
        check_onnx_format(fmt, "npu")
    for fmt in REFUSED:
        with pytest.raises(UserError) as e:
            check_onnx_format(fmt)
        text = str(e.value)
        assert "\n" not in text and f"--format {fmt}" in text and "--to gguf" in text
        assert "int, lpbq4, q4_0, q5_0, q8_0, q3_k or q6_k" in text
    for fmt in ("q3_k", "q6_k"):
        with pytest.raises(UserError) as e:
            check_onnx_format(fmt, make_profile("npu"))
        text = str(e.value)
        assert "\n" not in text and "groups of 16" in text and "32, 64, 128" in text
        assert "--format q4_0, q5_0 or q8_0" in text and "--profile generic" in text
    with pytest.raises(UserError, match="unknown format 'q9_9'"):
        check_onnx_format("q9_9")


# --- (2) DequantizeLinear == fake-quant weight == ggml's dequantization, bit for bit ------------------------


@pytest.mark.parametrize("fmt", EXPORTABLE)
def test_random_grids_decode_bit_for_bit(fmt: str) -> None:
    q = random_ggml_layer(fmt)
    want_type, block, (lo, hi) = EXPECTED[fmt]
    model = one_weight_model(q, 21)
    inits = {t.name: t for t in model.graph.initializer}
    assert set(inits) == {"layer.weight_q", "layer.weight_scale"}  # no zero point: it is 0
    assert inits["layer.weight_q"].data_type == want_type
    assert list(inits["layer.weight_q"].dims) == [q.shape[1], q.shape[0]]
    assert inits["layer.weight_scale"].data_type == TensorProto.FLOAT
    assert list(inits["layer.weight_scale"].dims) == [q.shape[1] // block, q.shape[0]]
    (node,) = model.graph.node
    assert node.op_type == "DequantizeLinear"
    assert {a.name: a.i for a in node.attribute} == {"axis": 0, "block_size": block}
    levels = onnx.numpy_helper.to_array(inits["layer.weight_q"]).astype(np.int16)
    assert levels.min() == lo and levels.max() == hi  # the whole signed range is used
    got = run_alone(model).T
    expected = q.dequantize().numpy()
    assert np.array_equal(bits_of(got), bits_of(expected))
    f = get_format(fmt)
    ggml = gguf.quants.dequantize(f.pack(q.codes, q.grid), f.ggml_type).reshape(q.shape)
    assert np.array_equal(bits_of(got), bits_of(ggml))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("fmt", EXPORTABLE)
def test_solved_layers_decode_exactly(fmt: str, method: str) -> None:
    q = solved_layer(fmt, method)
    got = run_alone(one_weight_model(q, 21)).T
    assert np.array_equal(bits_of(got), bits_of(q.dequantize().numpy()))
    assert not got[3].any() and not got[5, :256].any()  # the all-zero row and block stay exactly 0


# --- (3) one QDIR, both files ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("fmt", EXPORTABLE)
def test_one_qdir_exports_to_gguf_and_onnx_exactly(tmp_path, qdirs, window, fmt: str, method: str) -> None:
    ckpt = load_qdir(qdirs(fmt, method))  # (tables float: the props below describe the layers' format alone)
    assert {q.fmt for q in ckpt.layers.values()} == {fmt}
    onnx_path = export_onnx(ckpt, tmp_path / "m.onnx")
    gguf_path = export_gguf(ckpt, tmp_path / "m.gguf")
    onnx.checker.check_model(str(onnx_path), full_check=True)
    onnx_gaps, gguf_gaps = check_onnx_weights(onnx_path, ckpt), check_gguf_weights(gguf_path, ckpt)
    assert set(onnx_gaps) == set(gguf_gaps) == set(ckpt.layers)
    assert max(onnx_gaps.values()) == 0.0 and max(gguf_gaps.values()) == 0.0
    zero_row, zero_block = ckpt.layers[ZERO_ROW[0]], ckpt.layers[ZERO_BLOCK[0]]
    assert not zero_row.dequantize()[ZERO_ROW[1]].any()
    assert not zero_block.dequantize()[ZERO_BLOCK[1], :256].any()
    props = props_of(onnx_path)
    assert props["turboboa.format"] == fmt and json.loads(props["turboboa.layer_formats"]) == {fmt: 7}
    f = get_format(fmt)
    assert (props["turboboa.bits"], props["turboboa.group_size"], props["turboboa.sym"]) == (
        str(f.bits), str(f.group_size), "true")
    assert json.loads(props["turboboa.containers"]) == {str(f.bits): level_container(fmt).name}
    assert fmt in props["turboboa.weight_pattern"]
    gap = relative_gap(onnx_path, ckpt, [window])
    print(f"{fmt} {method}: max |onnxruntime - torch| / max |logit| = {gap:.3g}")
    assert gap < REL_BOUND


# --- (4) --format q4_0 on a tiny random Llama, both profiles ------------------------------------------------


@pytest.fixture(scope="module")
def q4_0_qdir(tmp_path_factory, default_tokenizer):
    folder = perturbed_tiny(tmp_path_factory.mktemp("q4_0") / "llama", default_tokenizer)
    out = tmp_path_factory.mktemp("q4_0") / "q"
    quantization.quantize(str(folder), QuantConfig(method="gptq", format="q4_0", nsamples=2, seqlen=32), out,
                 device="cpu", progress=False)
    return out


def test_q4_0_tiny_llama_logits_match_fake_quant(tmp_path, q4_0_qdir, window) -> None:
    ckpt = load_qdir(q4_0_qdir)  # what turboboa run makes by default: q4_0 layers, the tied embedding q8_0
    assert {q.fmt for name, q in ckpt.layers.items() if name != EMBEDDING} == {"q4_0"}
    assert ckpt.layers[EMBEDDING].fmt == "q8_0"
    for profile, options, windows in (("generic", {}, [window, window[:17]]), ("npu", {"seqlen": 64}, [window])):
        path = export_onnx(ckpt, tmp_path / f"{profile}.onnx", profile=profile, **options)
        onnx.checker.check_model(str(path), full_check=True)
        assert max(check_onnx_weights(path, ckpt).values()) == 0.0
        inits = onnx.load(str(path)).graph.initializer
        layers_q = {t.data_type for t in inits if t.name.endswith(".weight_q") and not t.name.startswith(EMBEDDING)}
        assert layers_q == {TensorProto.INT4}
        table_q = {t.data_type for t in inits if t.name == f"{EMBEDDING}.weight_q"}
        assert table_q == ({TensorProto.INT8} if profile == "generic" else set())  # npu: the table stays float
        assert not any(t.name.endswith("zero_point") for t in inits)
        gap = relative_gap(path, ckpt, windows)
        print(f"q4_0 gptq {profile}: max |onnxruntime - torch| / max |logit| = {gap:.3g}")
        assert gap < REL_BOUND
        assert props_of(path)["turboboa.profile"] == profile


# --- (5) refusals --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", REFUSED)
def test_offset_and_non_uniform_formats_are_refused_in_one_line(fmt: str) -> None:
    q = solved_layer(fmt)
    with pytest.raises(UserError) as e:
        encode_weight(GraphBuilder(), "model.layers.0.mlp.up_proj", q, make_profile())
    text = str(e.value)
    assert "\n" not in text
    for word in ("model.layers.0.mlp.up_proj", f"ggml type {fmt}", "--to gguf",
                 "--format int, lpbq4, q4_0, q5_0, q8_0, q3_k or q6_k"):
        assert word in text, text


@pytest.mark.parametrize("fmt", EXPORTABLE)
def test_npu_profile_takes_the_32_column_types_only(fmt: str) -> None:
    q = solved_layer(fmt)
    npu = make_profile("npu", seqlen=64)
    if get_format(fmt).group_size == 32:
        out = encode_weight(GraphBuilder(), "layer", q, npu)
        assert out.fmt == fmt and out.container == level_container(fmt).name
        return
    with pytest.raises(UserError) as e:
        encode_weight(GraphBuilder(), "model.layers.0.self_attn.o_proj", q, npu)
    text = str(e.value)
    assert "\n" not in text
    for word in ("--profile npu", "model.layers.0.self_attn.o_proj", fmt, "groups of 16", "32, 64, 128",
                 "q4_0, q5_0 or q8_0"):
        assert word in text, text


def test_damaged_ggml_grids_are_refused() -> None:
    q = random_ggml_layer("q3_k")
    q.grid = None
    with pytest.raises(UserError, match="damaged: a q3_k layer without its grid"):
        one_weight_model(q, 21)
    q = random_ggml_layer("q6_k")
    q.grid.sc[0, 0] = 200  # outside the int8 sub-scale range
    with pytest.raises(UserError, match="damaged.*sc must lie in -128..127"):
        one_weight_model(q, 21)


def test_cli_refusals_are_one_line_and_q4_0_passes_npu(tmp_path, qdirs, q4_0_qdir, cli_main) -> None:
    out = tmp_path / "m.onnx"
    export = ("export", "--to", "onnx", "-o", str(out))
    assert_one_line_error(cli_main(*export, str(qdirs("q4_k"))), "ggml type q4_k", "--to gguf",
                          "q4_0, q5_0, q8_0, q3_k or q6_k")
    assert_one_line_error(cli_main(*export, str(qdirs("q3_k")), "--profile", "npu"), "q3_k", "groups of 16",
                          "--format q4_0, q5_0 or q8_0")
    assert not out.exists()
    r = run_cli(*export, str(q4_0_qdir), "--profile", "npu", "--seqlen", "64")
    assert r.returncode == 0, r.stderr
    assert out.is_file()
