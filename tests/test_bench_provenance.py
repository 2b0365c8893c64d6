"""Benchmark rows record their provenance, are reused only when everything that made them matches, and result
files are written atomically (``bench/provenance.py``); no model runs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import provenance as pv  # noqa: E402

from turboboa.config import QuantConfig  # noqa: E402

SCRIPTS = ("methods.py", "rotation.py", "gguf_vs_llamacpp.py", "npu.py", "solver_time.py")


@pytest.fixture(scope="module")
def ctx() -> pv.Context:
    return pv.Context.start("cpu")


def quantize_row(ctx: pv.Context, method: str = "gptq") -> tuple[dict, dict, dict]:
    """A row as a benchmark writes it, with its settings and data."""
    settings = {"quantize": pv.quantize_settings(["smollm2-135m", "--method", method, "--bits", "3",
                                                  "--nsamples", "16", "--seqlen", "512", "--device", ctx.device]),
                "eval": pv.command_options(["eval", "QDIR", "--seqlen", "512", "--max-windows", "16", "--json"])}
    data = {"calibration": pv.calibration_data(16, 512), "evaluation": pv.evaluation_data(16, 512)}
    meter = pv.RowMeter()
    meter.add(rss=2**30)
    row = {"ppl": 42.0, "provenance": ctx.record(settings, data, meter.result(eval_tokens=16 * 511))}
    return json.loads(json.dumps(row)), settings, data  # as read back from the JSON file


def test_record_has_every_field(ctx):
    row, settings, _ = quantize_row(ctx)
    prov = row["provenance"]
    assert set(prov) == {"schema", "commit", "dirty", "measured_at", "settings", "data", "machine", "versions",
                         "measured"}
    assert prov["commit"] is None or len(prov["commit"]) == 40
    assert prov["dirty"] in (True, False, None)
    assert set(prov["machine"]) == {"cpu", "cpus", "threads", "gpu", "os"} and prov["machine"]["cpu"]
    assert prov["machine"]["threads"] >= 1
    for name in ("turboboa", "torch", "transformers", "numpy", "gguf", "onnx", "onnxruntime"):
        assert prov["versions"][name]
    # every QuantConfig field, resolved (--rotate auto is decided with the model: the QDIR records it)
    qc = prov["settings"]["quantize"]["quant_config"]
    assert set(qc) == {f.name for f in dataclasses.fields(QuantConfig)}
    assert qc["rotate"] == "auto" and qc["group_size"] == 128 and qc["percdamp"] == 0.05
    assert prov["settings"]["quantize"]["device"] == "cpu"
    assert prov["settings"]["eval"]["max_windows"] == 16 and "as_json" not in prov["settings"]["eval"]
    assert prov["data"] == {"calibration": {"nsamples": 16, "seqlen": 512, "tokens": 8192},
                            "evaluation": {"windows": 16, "seqlen": 512, "tokens": 8192}}
    m = prov["measured"]
    assert m["wall_seconds"] >= 0 and m["peak_rss_bytes"] == 2**30 and m["peak_gpu_bytes"] is None
    assert pv.quantize_settings(["--method", "rtn"])["quant_config"]["rotate"] == "none"


def test_extra_versions_are_recorded(ctx):
    import importlib.metadata as md

    versions = ctx.versions(("llama_cpp_python", "no-such-package-xyz"))
    assert "no-such-package-xyz" not in versions
    try:
        assert versions["llama_cpp_python"] == md.version("llama_cpp_python")
    except md.PackageNotFoundError:
        assert "llama_cpp_python" not in versions


def test_row_is_reused_only_when_everything_matches(ctx):
    row, settings, data = quantize_row(ctx)
    assert ctx.reusable(row, settings, data)
    # a later commit still reuses the row, which keeps the commit and date that measured it
    later = dataclasses.replace(ctx, git={"commit": "f" * 40, "dirty": False})
    assert later.reusable(row, settings, data) and row["provenance"]["commit"] == ctx.git["commit"]

    other_settings = {**settings, "quantize": pv.quantize_settings(["--method", "gptq", "--bits", "3", "--nsamples",
                                                                     "16", "--seqlen", "512", "--damp", "0.01"])}
    assert ctx.mismatch(row, other_settings, data) == "settings differ"
    other_data = {**data, "evaluation": pv.evaluation_data(8, 512)}
    assert ctx.mismatch(row, settings, other_data) == "data differ"
    other_machine = dataclasses.replace(ctx, machine={**ctx.machine, "threads": ctx.machine["threads"] + 1})
    assert other_machine.mismatch(row, settings, data) == "machine differ"
    gpu_machine = dataclasses.replace(ctx, machine={**ctx.machine, "gpu": "NVIDIA H100"})
    assert not gpu_machine.reusable(row, settings, data)
    other_versions = dataclasses.replace(ctx, _versions={})
    other_versions._versions[()] = {**ctx.versions(), "torch": "0.0.1"}
    assert other_versions.mismatch(row, settings, data) == "versions differ"
    # a row recorded for other extra packages (llama.cpp's) is not one measured without them
    extra = ("llama_cpp_python", "openvino", "onnxruntime-qnn")
    if ctx.versions(extra) != ctx.versions():
        assert ctx.mismatch(row, settings, data, extra) == "versions differ"
    assert ctx.mismatch(None, settings, data) == "not measured yet"


def test_rows_without_provenance_are_never_reused(ctx, tmp_path):
    """A row written before rows recorded provenance, or with another schema, is never reused; a document of
    the same settings keeps such rows (shown as not recorded until measured again)."""
    import methods

    row, settings, data = quantize_row(ctx)
    legacy = {k: v for k, v in row.items() if k != "provenance"}
    assert "provenance" in ctx.mismatch(legacy, settings, data)
    older_schema = {**row, "provenance": {**row["provenance"], "schema": 0}}
    assert not ctx.reusable(older_schema, settings, data)
    path = tmp_path / "methods.json"
    doc_settings = {"methods": ["rtn"], "nsamples": 16, "seqlen": 512}
    path.write_text(json.dumps({"settings": doc_settings, "machine": {"cpus": 2}, "runs": {"rtn-w4-g-1": legacy}}))
    doc = methods.load_doc(path, doc_settings, None)
    assert doc["runs"] == {"rtn-w4-g-1": json.loads(json.dumps(legacy))}
    assert not ctx.reusable(doc["runs"]["rtn-w4-g-1"], settings, data)
    assert methods.load_doc(path, {**doc_settings, "nsamples": 8}, None)["runs"] == {}


def test_fresh_reuses_nothing(ctx, tmp_path):
    row, settings, data = quantize_row(ctx)
    fresh = dataclasses.replace(ctx, fresh=True)
    assert ctx.reusable(row, settings, data)
    assert fresh.mismatch(row, settings, data) == "--fresh"
    # intermediate files: under --fresh only this invocation's own are valid
    path = tmp_path / "shared.json"
    path.write_text("{}")
    clean = dataclasses.replace(ctx, git={"commit": "a" * 40, "dirty": False})
    clean.mark_cache(path, settings, data)
    assert clean.cache_valid(path, settings, data)
    assert not dataclasses.replace(clean, git={"commit": "b" * 40, "dirty": False}).cache_valid(path, settings, data)
    fresh_clean = dataclasses.replace(clean, fresh=True, invocation="one")
    assert not fresh_clean.cache_valid(path, settings, data)
    fresh_clean.mark_cache(path, settings, data)
    assert fresh_clean.cache_valid(path, settings, data)
    assert not dataclasses.replace(fresh_clean, invocation="two").cache_valid(path, settings, data)


def test_every_script_takes_device_and_fresh():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for script in SCRIPTS:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True,
                              text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "--device" in proc.stdout and "--fresh" in proc.stdout, script


def test_makefile_bench_runs_every_script():
    text = (ROOT / "Makefile").read_text()
    target = text[text.index("\nbench:"):]
    for script in SCRIPTS:
        assert f"bench/{script}" in target, script
    assert "$(BENCH_ARGS)" in target


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    pv.write_json_atomic(path, {"runs": {"a": 1}})
    before = path.read_text()
    with pytest.raises(TypeError):  # fails while serializing: nothing written
        pv.write_json_atomic(path, {"runs": {"a": object()}})
    assert path.read_text() == before

    import turboboa.output_files

    def refuse(*args: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(turboboa.output_files.os, "replace", refuse)
    with pytest.raises(OSError):  # fails after the temporary file was written
        pv.write_json_atomic(path, {"runs": {"a": 2}})
    monkeypatch.undo()
    assert path.read_text() == before and json.loads(before) == {"runs": {"a": 1}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    pv.save_figure(fig, tmp_path / "chart.png")
    plt.close(fig)
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chart.png", "results.json"]


def test_child_wall_time_and_peak_memory(tmp_path):
    meter = pv.RowMeter()
    child = meter.run([sys.executable, "-c", "x = bytearray(150 * 2**20); print('done')"])
    assert child.stdout.strip() == "done" and child.seconds > 0
    assert child.peak_rss_bytes >= 150 * 2**20
    meter.run([sys.executable, "-c", "print('small')"], log=tmp_path / "log")
    assert "small" in (tmp_path / "log").read_text()
    result = meter.result()
    assert result["peak_rss_bytes"] == child.peak_rss_bytes  # the largest child's
    with pytest.raises(pv.ChildFailed, match="boom"):
        meter.run([sys.executable, "-c", "import sys; sys.exit('boom')"])
    assert meter.run([sys.executable, "-c", "raise SystemExit(1)"], ok=(0, 1)).returncode == 1
    shared = pv.RowMeter()
    shared.absorb({"wall_seconds": 100.0, "peak_rss_bytes": 5, "peak_gpu_bytes": 7})
    assert shared.result()["wall_seconds"] >= 100.0 and shared.result()["peak_gpu_bytes"] == 7


def test_markdown_shows_commit_and_machine(ctx):
    row, _, _ = quantize_row(ctx)
    legend = pv.Legend()
    cell = legend.cell(row)
    assert pv.short_commit(row["provenance"]) in cell and "M1" in cell and "V1" in cell
    assert row["provenance"]["measured_at"][:10] in cell
    assert legend.cell({"ppl": 1.0}) == "not recorded" and legend.cell(None) == "-"
    text = "\n".join(legend.section({"float model": row}, legacy_machine={"platform": "Linux", "cpus": 2}))
    assert f"- M1: {ctx.machine['cpu']}" in text and f"torch {ctx.versions()['torch']}" in text
    assert "float model: `" in text and "never reused" in text and "platform Linux" in text
    assert pv.short_commit({"commit": "0123456789abcdef", "dirty": True}) == "0123456+dirty"


def test_document_machine_line_is_kept_until_every_row_has_provenance(ctx):
    row, _, _ = quantize_row(ctx)
    doc = {"machine": {"platform": "then"}, "runs": {"a": row, "b": {"ppl": 1.0}}}
    pv.drop_legacy_fields(doc, doc["runs"].values())
    assert doc["machine"] == {"platform": "then"}
    doc["runs"]["b"] = row
    pv.drop_legacy_fields(doc, doc["runs"].values())
    assert "machine" not in doc


def test_git_state_ignores_result_folders(tmp_path):
    repo = tmp_path / "repo"
    (repo / "bench" / "results").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "bench" / "results" / "r.json").write_text("{}\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    sha = git("rev-parse", "HEAD").strip()
    assert pv.git_state(repo) == {"commit": sha, "dirty": False}
    (repo / "bench" / "results" / "r.json").write_text('{"rows": []}\n')  # a benchmark writing its results
    (repo / "out").mkdir()
    (repo / "out" / "methods.json").write_text("{}\n")
    assert pv.git_state(repo, exclude=[repo / "out"])["dirty"] is False
    assert pv.git_state(repo)["dirty"] is True  # an untracked file elsewhere
    (repo / "code.py").write_text("x = 2\n")
    assert pv.git_state(repo, exclude=[repo / "out"]) == {"commit": sha, "dirty": True}
    assert pv.git_state(tmp_path / "missing") == {"commit": None, "dirty": None}


def test_scripts_resolve_every_rows_settings():
    """Each script's rows resolve their settings from their command lines (the CLI's parser, no model)."""
    import argparse

    import gguf_vs_llamacpp
    import npu
    import rotation

    a = argparse.Namespace(nsamples=8, seqlen=512, seed=0, eval_seqlen=512, max_windows=8, device="cpu",
                           windows=4, calib_seqlen=512, method="turboboa", model="smollm2-135m")
    ev = ["--seqlen", "512", "--json", "-q", "--device", "cpu", "--max-windows", "8"]
    wa = rotation.row_settings("turboboa", "W4A4KV4", "hadamard", a, ev)
    assert wa["quantize"]["quant_config"]["dyn_act_bits"] == 4 and wa["eval"]["kv_bits"] == 4
    assert wa["quantize"]["quant_config"]["online_rotate"] == "down,qk"
    # W4A8KV8 reads W4A4KV4's weights (solved with float activations): one quantization, recorded as made
    a8 = rotation.row_settings("turboboa", "W4A8KV8", "hadamard", a, ev)
    assert a8["quantize"] == wa["quantize"] and a8["eval"]["act_bits"] == 8
    assert rotation.weight_setting("W3A16") == "W3A16"
    assert rotation.gguf_settings(a, ev, "none")["quantize"]["quant_config"]["pad_to"] == 256
    for name in npu.CONFIGS:
        s = npu.config_settings(name, a)
        assert s["quantize"]["act_scope"] == "graph" and s["check"]["npu"] == "qnn-htp,openvino"
    for maker in ("llama.cpp", "llama.cpp+imatrix", "turboboa", "turboboa+pad256", "turboboa+pad256+hadamard"):
        s = gguf_vs_llamacpp.row_settings(a, "Q3_K_M", maker)
        assert s["maker"] == maker and s["eval"]["threads"] == gguf_vs_llamacpp.THREADS
    assert gguf_vs_llamacpp.row_settings(a, "Q2_K", "turboboa")["quantize"]["quant_config"]["rotate"] == "auto"
    assert gguf_vs_llamacpp.row_settings(a, "Q2_K", "turboboa+pad256")["quantize"]["quant_config"]["rotate"] == "none"
    iq = gguf_vs_llamacpp.row_settings(argparse.Namespace(**{**vars(a), "model": "qwen2.5-coder-1.5b"}), "IQ2_XS",
                                       "llama.cpp+imatrix")
    assert iq["llama_quantize"] == {"source": "F32 GGUF of qwen2.5-coder-1.5b", "type": "IQ2_XS", "threads": 2,
                                    "imatrix": {"tool": "llama-imatrix", "calibration": "wikitext2", "chunks": 8,
                                                "ctx": 512, "threads": 2}}
