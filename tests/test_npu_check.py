"""The NPU backends end to end through the CLI, on a tiny random Llama (W4A16, every tensor quantized):

* a QDIR calibrated with ``--act-scope graph``; ``turboboa export --profile qnn-htp --qnn-context`` writes the
  graph and its compiled EPContext model; the OpenVINO exporter writes the IR (weights only);
* ``turboboa check --npu qnn-htp,openvino --localize``: the whole graph on the emulated HTP (100% of the
  nodes), the EPContext model reproduces the uncompiled graph's logits exactly, the IR keeps integer weights,
  the NPU rows are on the stated slice, and the per-block comparison is in the report;
* ``turboboa eval FILE --backend qnn-htp|openvino`` scores the files;
* a graph with a node the HTP lacks (Erf) is refused naming that node, and ``--allow-fallback`` runs it
  and lists the node left on the CPU;
* bad use is one line, exit 2.
"""

from __future__ import annotations

import json

import onnx
import pytest

from exporters import export
from exporters.onnx.export import qnn_context_path
from turboboa import quantization
from turboboa.checkpoint import load_qdir
from turboboa.config import QuantConfig

from .conftest import assert_one_line_error, make_tiny_llama, run_cli

pytest.importorskip("onnxruntime_qnn", reason="the npu extra (onnxruntime-qnn) is not installed")
pytest.importorskip("openvino", reason="the npu extra (openvino) is not installed")

SEQLEN = "64"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, default_tokenizer):
    """A W4A16 graph-calibrated QDIR of a tiny Llama, its qnn-htp ONNX (with the EPContext model, through the
    CLI) and OpenVINO IR (in process: the CLI's start-up is the slow part of these tests)."""
    root = tmp_path_factory.mktemp("npu")
    folder = make_tiny_llama(root / "llama", default_tokenizer)
    qdir = root / "q"
    cfg = QuantConfig(method="rtn", bits=4, group_size=-1, sym=True, nsamples=4, seqlen=int(SEQLEN))
    quantization.quantize(str(folder), cfg, qdir, device="cpu", progress=False, act_bits=16, act_scope="graph")
    onnx_path = root / "m.onnx"
    proc = run_cli("export", str(qdir), "--to", "onnx", "--profile", "qnn-htp", "--seqlen", SEQLEN,
                   "--qnn-context", "-o", str(onnx_path), "-q")
    assert proc.returncode == 0, proc.stderr
    assert qnn_context_path(onnx_path).is_file()
    ir = export(load_qdir(qdir), "openvino", root / "m.xml", profile="openvino", seqlen=int(SEQLEN))
    return {"qdir": qdir, "onnx": onnx_path, "ir": ir, "folder": folder, "root": root}


def test_check_with_npu_backends(exported) -> None:
    out = exported["root"] / "report"
    proc = run_cli("check", str(exported["qdir"]), "--onnx", str(exported["onnx"]), "--seqlen", SEQLEN,
                   "--max-windows", "3", "--npu", "qnn-htp,openvino", "--npu-windows", "2", "--openvino",
                   str(exported["ir"]), "--localize", "-o", str(out), "-q", "--json")
    assert proc.returncode in (0, 1), proc.stderr
    report = json.loads(proc.stdout)
    rows = {r["backend"]: r for r in report["backends"]}
    assert rows["qnn-htp"]["slice"] and rows["qnn-htp"]["tokens"] == 2 * (int(SEQLEN) - 1)
    assert rows["fake-quant (NPU slice)"]["tokens"] == rows["qnn-htp"]["tokens"] == rows["openvino"]["tokens"]
    assert rows["onnxruntime"]["tokens"] == 3 * (int(SEQLEN) - 1)
    assert report["runtime"]["qnn-htp"]["npu_share"] == 1.0
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["qnn-htp nodes on the NPU"]["passed"]
    context = next(c for name, c in checks.items() if "EPContext" in name)
    assert context["passed"] and context["value"] == 0.0
    assert checks["openvino IR weights are integer constants"]["passed"]
    assert len(report["localize"]["qnn-htp"]) == 3  # two blocks and the logits
    md = (out / "report.md").read_text()
    assert "NPU slice" in md and "--localize" in md


@pytest.mark.parametrize("backend,suffix", [("qnn-htp", "onnx"), ("openvino", "ir")])
def test_eval_on_npu_backends(exported, backend, suffix) -> None:
    proc = run_cli("eval", str(exported[suffix]), "--backend", backend, "--seqlen", SEQLEN, "--max-windows", "1",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["backend"] == backend and result["ppl"] > 1


def test_htp_refuses_a_graph_with_an_unsupported_node(exported) -> None:
    """The qnn-htp graph with one Sigmoid turned into Erf (which the QNN EP lacks): refused naming that node;
    with --allow-fallback it runs, the node listed on the CPU."""
    model = onnx.load(str(exported["onnx"]))
    node = next(n for n in model.graph.node if n.op_type == "Sigmoid")
    node.op_type = "Erf"
    bad = exported["root"] / "erf.onnx"
    onnx.save(model, str(bad))
    proc = run_cli("eval", str(bad), "--backend", "qnn-htp", "--seqlen", SEQLEN, "--max-windows", "1")
    assert_one_line_error(proc, "qnn-htp rejects node", node.name, "(Erf)")
    proc = run_cli("check", str(exported["qdir"]), "--onnx", str(bad), "--seqlen", SEQLEN, "--max-windows", "1",
                   "--npu", "qnn-htp", "--npu-windows", "1", "--allow-fallback", "--json", "-q")
    report = json.loads(proc.stdout)
    share = next(c for c in report["checks"] if c["check"] == "qnn-htp nodes on the NPU")
    assert share["value"] < 1.0 and any(node.name in n for n in share["fallback_nodes"])


def test_bad_npu_use(exported) -> None:
    proc = run_cli("check", str(exported["qdir"]), "--onnx", str(exported["onnx"]), "--seqlen", SEQLEN,
                   "--npu", "hexagon")
    assert_one_line_error(proc, "unknown --npu backend 'hexagon'")
    proc = run_cli("export", str(exported["qdir"]), "--to", "onnx", "--profile", "npu", "--qnn-context",
                   "-o", str(exported["root"] / "x.onnx"))
    assert_one_line_error(proc, "--qnn-context")
    proc = run_cli("eval", str(exported["qdir"]), "--backend", "qnn-htp")
    assert_one_line_error(proc, "--backend qnn-htp runs an exported graph")


def test_run_exports_a_qnn_htp_graph(exported) -> None:
    """``turboboa run --onnx-profile qnn-htp`` calibrates every tensor and checks the graph in onnxruntime."""
    out = exported["root"] / "run"
    proc = run_cli("run", str(exported["folder"]), "--method", "rtn", "--bits", "4", "--group-size", "-1", "--sym",
                   "--act-bits", "16", "--export", "onnx", "--onnx-profile", "qnn-htp", "--nsamples", "4",
                   "--seqlen", SEQLEN, "--eval-seqlen", SEQLEN, "--max-windows", "2", "-o", str(out), "-q", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["passed"] and report["quantization"]["activations"].startswith("static-graph")
    proc = run_cli("run", str(exported["folder"]), "--method", "rtn", "--export", "onnx", "--onnx-profile", "qnn-htp",
                   "--sym", "--group-size", "-1", "-o", str(exported["root"] / "run2"))
    assert_one_line_error(proc, "--act-bits 16")
