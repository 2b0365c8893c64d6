"""``turboboa export --to openvino`` and the OpenVINO runtime backend (:mod:`runtime_check.openvinort`).

On a tiny random Llama (2 blocks, 14 quantized linear layers), RTN QDIRs: w4 symmetric per channel (``npu``
profile), w4 g32 asymmetric (``generic`` profile), and w4 per channel with 8-bit and 16-bit static
activation encodings (``npu``):

* the IR keeps every quantized weight compressed: one integer Constant per layer (i4 for the symmetric grid,
  u4 plus a u4 zero point for the asymmetric one), packed at 4 bits, no float copy of it; OpenVINO's
  decompression subgraph (Constant -> Convert [-> Subtract] -> Multiply [-> Reshape]) evaluates to the
  QDIR's fake-quant weight bit for bit; the ``turboboa.*`` metadata (tokenizer relative to the IR, max
  positions, ...) is in the IR's ``rt_info``;
* OpenVINO's logits, on the IR and on the ``.onnx`` file itself, match onnxruntime's on the same graph
  within :data:`REL_BOUND` (see there for the measured gap and why the bound is what it is);
* 16-bit activation encodings export (65536-level FakeQuantize in the IR) but OpenVINO's CPU plugin strips
  them (``describe()`` says so), so their logits are not compared;
* bad input is one line: an output not ending in ``.xml``, unknown options, a grid the profile refuses, a
  missing ``openvino`` package; the exporter is registered (built-in and ``turboboa.exporters`` entry point).
"""

from __future__ import annotations

import json
import math
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from exporters import ENTRY_POINT_GROUP, export, exporter_names, get_exporter
from exporters.onnx import export_onnx
from exporters.openvino import export_openvino, read_rt_info
from exporters.openvino.check import compressed_weight_types, tensor_sources
from exporters.openvino.package import MISSING
from runtime_check.onnxrt import onnx_logits_fn
from runtime_check.openvinort import PINNED, openvino_logits_fn
from turboboa import quantization
from turboboa.checkpoint import load_qdir
from turboboa.config import QuantConfig
from turboboa.data import eval_tokens
from turboboa.errors import UserError

from .conftest import EMBEDDING, ROOT, assert_one_line_error, run_cli
from .test_onnx_export import perturbed_tiny

ov = pytest.importorskip("openvino")

# max |OpenVINO logits - onnxruntime logits| / max |onnxruntime logits|, same graph, same windows. Measured
# on these models (OpenVINO 2026.4 CPU, onnxruntime 1.32, 2 threads): 4.3e-7 (w4 sym per channel), 4.6e-7
# (w4 g32 asym), 3.4e-7 (w4 + 8-bit activations), max |diff| about 1e-6 on logits of magnitude ~2: float32
# rounding of two float32 implementations summing in different orders (oneDNN vs MLAS GEMMs, fused vs
# unfused attention). 1e-5 leaves a 20x margin for other CPUs' kernels while staying three orders of
# magnitude below what a wrong setting costs: OpenVINO's default bf16 inference precision or its dynamic
# int8 quantization of compressed-weight MatMul activations give 1e-2.
REL_BOUND = 1e-5
# With static 8-bit activations a float32 rounding difference upstream of a quantizer can move one activation
# across a rounding boundary (one 8-bit step; tests/test_activation_quant.py sees the same between torch and
# onnxruntime). That token's row of logits then differs by up to ~1e-2 (measured: 5.9e-3, one row, the IR's
# first window); the other rows stay within REL_BOUND. Allowed: FLIPPED_ROWS rows of a window beyond
# REL_BOUND, none beyond FLIP_BOUND. bf16 or int8 dynamic activations would move every row.
FLIPPED_ROWS = 2
FLIP_BOUND = 5e-2
SEQLEN = 64
N_LAYERS = 14  # 2 blocks x (q, k, v, o, gate, up, down)

# name -> (QuantConfig fields, act_bits, export profile, integer element type of the weights in the IR)
CASES = {
    "w4-sym-per-channel": (dict(bits=4, group_size=-1, sym=True), None, "npu", "i4"),
    "w4-g32-asym": (dict(bits=4, group_size=32, sym=False), None, "generic", "u4"),
    "w4-sym-act8": (dict(bits=4, group_size=-1, sym=True), 8, "npu", "i4"),
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_tokenizer) -> Path:
    return perturbed_tiny(tmp_path_factory.mktemp("ov") / "llama", default_tokenizer)


@pytest.fixture(scope="module")
def windows(default_tokenizer) -> list[torch.Tensor]:
    ids = eval_tokens(default_tokenizer, "wikitext2")
    return [ids[:SEQLEN], ids[SEQLEN:2 * SEQLEN]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama):
    """``case -> (QDIR checkpoint, IR path, ONNX path)``: each case quantized and exported once per module."""
    root = tmp_path_factory.mktemp("ov-exports")
    done: dict[str, tuple] = {}

    def get(case: str):
        if case not in done:
            cfg, act_bits, profile, _ = CASES[case]
            quantization.quantize(str(tiny_llama), QuantConfig(method="rtn", nsamples=4, seqlen=32, **cfg), root / case,
                         device="cpu", progress=False, act_bits=act_bits)
            ckpt = load_qdir(root / case)
            options = dict(profile=profile, seqlen=SEQLEN, act_bits=act_bits)
            done[case] = (ckpt, export_openvino(ckpt, root / f"{case}.xml", **options),
                          export_onnx(ckpt, root / f"{case}.onnx", **options))
        return done[case]

    return get


def row_gaps(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per position: max |got - ref| over the vocabulary / max |ref| (float32 logits (1, L, V) -> (L,))."""
    assert got.dtype == torch.float32 and got.shape == ref.shape
    return (got - ref).abs().amax(-1)[0] / ref.abs().max()


def constant_weight(out) -> np.ndarray:
    """The float32 tensor an IR's weight subgraph (ending at ``out``) computes, evaluated by OpenVINO."""
    compiled = ov.Core().compile_model(ov.Model([out], [], "weight"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({})[compiled.output(0)]


# --- (a) integer weights, metadata -----------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_ir_keeps_every_weight_an_integer_constant(exported, case) -> None:
    ckpt, xml, onnx_path = exported(case)
    etype = CASES[case][3]
    layers = [name for name in ckpt.layers if name != EMBEDDING]
    assert len(layers) == N_LAYERS
    assert xml.is_file() and xml.with_suffix(".bin").is_file()
    assert sorted(p.name for p in xml.parent.iterdir() if p.name.startswith(".")) == []  # no temporary left
    ir = ov.Core().read_model(str(xml))
    types = compressed_weight_types(ir, onnx.load(str(onnx_path)))
    embedding = types.pop(EMBEDDING, None)  # generic: the q8_0 table is a DequantizeLinear weight too
    assert types == {name: etype for name in layers}
    assert embedding == (None if CASES[case][2] != "generic" else "i8"), embedding
    sources = tensor_sources(ir)
    for name in layers:
        out = sources[f"{name}.weight_dq"]
        consts = [n for n in _upstream(out.get_node()) if n.get_type_name() == "Constant"]
        q = ckpt.layers[name]
        weight = [c for c in consts if c.get_element_type().to_string() == etype
                  and math.prod(c.get_output_shape(0)) == q.codes.numel()]
        assert len(weight) == 1
        assert weight[0].get_byte_size() == q.codes.numel() // 2  # packed: two 4-bit codes per byte
        floats = [c for c in consts if c.get_element_type().is_real()]
        assert all(math.prod(c.get_output_shape(0)) < q.codes.numel() for c in floats)  # scales only
        assert np.array_equal(constant_weight(out), q.dequantize().T.numpy()), name
    meta = read_rt_info(ir)
    assert meta["turboboa.tokenizer"] == case  # the QDIR, relative to the IR's folder
    assert meta["turboboa.max_positions"] == "2048" and meta["turboboa.seqlen"] == str(SEQLEN)
    assert meta["turboboa.method"] == "rtn" and meta["turboboa.profile"] == CASES[case][2]
    table = {"i8": 1} if CASES[case][2] == "generic" else {}  # generic: the q8_0 embedding's int8 codes
    assert json.loads(meta["turboboa.ir_weight_types"]) == {etype: N_LAYERS, **table}
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert {k: v for k, v in meta.items() if k in props} == props  # every ONNX key, the same values
    with openvino_logits_fn(xml, threads=2) as fn:
        assert Path(fn.tokenizer()).resolve() == Path(ckpt.path).resolve()


def _upstream(node) -> list:
    """Every node ``node`` is computed from (itself included)."""
    seen, stack, found = set(), [node], []
    while stack:
        n = stack.pop()
        if n.get_name() not in seen:
            seen.add(n.get_name())
            found.append(n)
            stack.extend(i.get_source_output().get_node() for i in n.inputs())
    return found


def test_exports_are_reproducible(exported) -> None:
    ckpt, xml, _ = exported("w4-sym-per-channel")
    before = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    assert export_openvino(ckpt, xml, profile="npu", seqlen=SEQLEN) == xml  # replaces both files in place
    assert (xml.read_bytes(), xml.with_suffix(".bin").read_bytes()) == before


def test_a_float_weight_is_refused(tmp_path, exported) -> None:
    """Had OpenVINO folded a weight into a float Constant, the check names the layer in one line: here the
    ONNX model's first DequantizeLinear is replaced by a float32 Constant of its output."""
    from onnx import helper, numpy_helper

    _, _, onnx_path = exported("w4-sym-per-channel")
    model = onnx.load(str(onnx_path))
    node = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    q = next(t for t in model.graph.initializer if t.name == node.input[0])
    dense = numpy_helper.from_array(np.full(tuple(q.dims), 0.01, dtype=np.float32), "dense")
    node.CopyFrom(helper.make_node("Constant", [], [node.output[0]], value=dense))
    onnx.save(model, str(tmp_path / "float.onnx"))
    with pytest.raises(UserError, match="model.layers.0.self_attn.q_proj.*--to onnx") as e:
        compressed_weight_types(ov.convert_model(str(tmp_path / "float.onnx")), onnx.load(str(onnx_path)))
    assert "\n" not in str(e.value)


def test_a_failed_check_leaves_the_old_files(monkeypatch, exported) -> None:
    """The read-back check fails after the IR was saved: the temporary files go, the IR already under the
    output name (and its .bin) stay as they were."""
    import exporters.openvino.export as ov_export

    ckpt, xml, _ = exported("w4-sym-per-channel")
    before = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    calls = []

    def fail_on_read_back(model, onnx_model):
        calls.append(1)
        if len(calls) == 2:
            raise UserError("check failed")
        return compressed_weight_types(model, onnx_model)

    monkeypatch.setattr(ov_export, "compressed_weight_types", fail_on_read_back)
    with pytest.raises(UserError, match="check failed"):
        export_openvino(ckpt, xml, seqlen=SEQLEN)
    assert len(calls) == 2 and (xml.read_bytes(), xml.with_suffix(".bin").read_bytes()) == before
    assert not [p for p in xml.parent.iterdir() if p.name.startswith(".")]


# --- (b), (c) logits against onnxruntime ----------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_onnxruntime(exported, windows, case) -> None:
    _, xml, onnx_path = exported(case)
    with onnx_logits_fn(onnx_path, threads=2) as ort_fn:
        refs = [ort_fn(w[None]) for w in windows]
    flips = FLIPPED_ROWS if CASES[case][1] is not None else 0  # rounding flips need quantized activations
    for path in (xml, onnx_path):  # the IR, and OpenVINO reading the ONNX file directly
        with openvino_logits_fn(path, threads=2) as fn:
            assert fn.static_seqlen == SEQLEN and fn.max_positions == 2048
            gaps = [row_gaps(fn(w[None]), ref) for w, ref in zip(windows, refs, strict=True)]
            settings = fn.describe()
        for gap in gaps:
            assert int((gap >= REL_BOUND).sum()) <= flips, (path.name, gap.max().item(), gap.argmax().item())
            assert float(gap.max()) < (FLIP_BOUND if flips else REL_BOUND), (path.name, gap.max().item())
        assert settings["INFERENCE_PRECISION_HINT"] == "f32" and settings["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == 0
        assert settings["INFERENCE_NUM_THREADS"] == 2 and settings["NUM_STREAMS"] == 1
        assert settings["openvino"] == ov.get_version() and settings["device"] == "CPU"
        assert "activation_quantization" not in settings


def test_static_length_is_checked(exported, windows) -> None:
    _, xml, _ = exported("w4-sym-per-channel")
    with openvino_logits_fn(xml, threads=2) as fn, pytest.raises(UserError, match="--seqlen 64") as e:
        fn(windows[0][None, :32])
    assert "\n" not in str(e.value)


# --- 16-bit activation encodings ------------------------------------------------------------------------


def test_16_bit_activations_export_but_openvino_strips_them(tmp_path, tiny_llama, windows) -> None:
    """The IR holds the encodings (one 65536-level FakeQuantize per distinct quantized MatMul input: 4 per
    block) and integer weights. OpenVINO's CPU plugin strips 65536-level FakeQuantize (its low-precision
    ``FQStrippingTransformation``), so it runs those activations unquantized: measured 1.8e-2 (on the
    ``.onnx``) and 3.4e-2 (on the IR) relative from onnxruntime's logits, which quantize them. That is
    OpenVINO's behavior, not a numbers check, and ``describe()`` reports it."""
    quantization.quantize(str(tiny_llama), QuantConfig(method="rtn", bits=4, group_size=-1, sym=True, nsamples=4,
                                              seqlen=32), tmp_path / "q", device="cpu", progress=False,
                 act_bits=16)
    ckpt = load_qdir(tmp_path / "q")
    xml = export_openvino(ckpt, tmp_path / "m.xml", seqlen=SEQLEN, act_bits=16)
    ir = ov.Core().read_model(str(xml))
    levels = [op.get_attributes()["levels"] for op in ir.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert levels == [65536] * 8
    assert json.loads(read_rt_info(ir)["turboboa.ir_weight_types"]) == {"i4": N_LAYERS}
    assert read_rt_info(ir)["turboboa.act_bits"] == "16"
    with openvino_logits_fn(xml, threads=2) as fn:
        logits = fn(windows[0][None])
        assert "8 16-bit activation quantizers stripped" in fn.describe()["activation_quantization"]
    assert logits.shape[:2] == (1, SEQLEN) and bool(torch.isfinite(logits).all())


# --- (d) bad input, one line ----------------------------------------------------------------------------


def test_bad_input_is_one_line(tmp_path, exported) -> None:
    ckpt, xml, onnx_path = exported("w4-g32-asym")
    cases = [
        (lambda: export_openvino(ckpt, tmp_path / "m.onnx", profile="generic"), "must end in .xml"),
        (lambda: export_openvino(ckpt, tmp_path / "m.xml", opset=21), "takes no options"),
        (lambda: export_openvino(ckpt, tmp_path / "m.xml", profile="npu"), "--profile npu needs symmetric weights"),
        (lambda: openvino_logits_fn(tmp_path / "none.xml"), "not found"),
        (lambda: openvino_logits_fn(onnx_path.with_suffix(".data")), "not found"),
        (lambda: openvino_logits_fn(xml, device="NOPE"), "not available"),
    ]
    for call, words in cases:
        with pytest.raises(UserError, match=words) as e:
            call()
        assert "\n" not in str(e.value)
    lone = tmp_path / "lone.xml"
    lone.write_bytes(xml.read_bytes())  # an IR without its .bin
    with pytest.raises(UserError, match="no weights file lone.bin"):
        openvino_logits_fn(lone)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone.xml"]  # nothing written by the failed exports


def test_cli_refuses_a_file_name_without_xml(tmp_path, exported) -> None:
    ckpt, _, _ = exported("w4-sym-per-channel")
    r = run_cli("export", str(ckpt.path), "--to", "openvino", "-o", str(tmp_path / "m.bin"), "-q")
    assert_one_line_error(r, "must end in .xml")


def test_missing_openvino_is_one_line(monkeypatch, exported) -> None:
    ckpt, xml, _ = exported("w4-sym-per-channel")
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    for call in (lambda: export_openvino(ckpt, xml.with_name("x.xml")), lambda: openvino_logits_fn(xml)):
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == MISSING and "\n" not in MISSING


# --- registration ---------------------------------------------------------------------------------------


def test_openvino_is_a_registered_exporter(tmp_path, exported) -> None:
    assert "openvino" in exporter_names() and get_exporter("openvino") is export_openvino
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    points = project["entry-points"]["turboboa.exporters"]
    assert sorted(points) == ["gguf", "onnx", "openvino"]
    for name, target in points.items():  # each entry point names the function the built-in table loads
        module, _, attr = target.partition(":")
        assert getattr(__import__(module, fromlist=[attr]), attr) is get_exporter(name)
    assert "openvino>=2026.0" in project["optional-dependencies"]["npu"]
    installed = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}  # `make venv` installs them
    assert all(installed[name].load() is get_exporter(name) for name in points)
    ckpt, _, _ = exported("w4-sym-per-channel")
    path = export(ckpt, "openvino", tmp_path / "m.xml", seqlen=SEQLEN)  # the generic export() entry point
    assert path.is_file() and path.with_suffix(".bin").is_file()
    assert set(PINNED) >= {"INFERENCE_PRECISION_HINT", "DYNAMIC_QUANTIZATION_GROUP_SIZE"}
