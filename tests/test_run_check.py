"""``turboboa check`` and ``turboboa run``: honest files pass, one altered code step fails and is named, a run
writes every file with a manifest that verifies, and bad export requests are refused before quantizing.

Tiny random Llamas (seconds each); one slow case runs the default model end to end on few windows.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import signal
import struct

import numpy as np
import pytest
import torch

from exporters import export
from runtime_check.metrics import Reference, StreamMetrics
from turboboa import quantization
from turboboa.checkpoint import load_qdir
from turboboa.config import QuantConfig
from turboboa.errors import UserError
from turboboa.eval.perplexity import perplexity
from workflows.end_to_end import choose_format, parse_exports, possible_formats

from .conftest import assert_one_line_error, run_cli

CHECK_WINDOWS = ("--seqlen", "64", "--max-windows", "2")
GGUF_ALTERED = "model.layers.1.mlp.down_proj"  # HF name of the GGUF tensor blk.1.ffn_down.weight
ONNX_ALTERED = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def q4_0_gguf(tmp_path_factory, tiny_llama_dir):
    """An RTN q4_0 QDIR of the tiny Llama and its GGUF file."""
    folder = tmp_path_factory.mktemp("gguf")
    quantization.quantize(str(tiny_llama_dir), QuantConfig(method="rtn", format="q4_0", nsamples=2, seqlen=32),
                 folder / "q", device="cpu", progress=False)
    return folder / "q", export(load_qdir(folder / "q"), "gguf", folder / "m.gguf")


@pytest.fixture(scope="module")
def int_onnx(tmp_path_factory, tiny_llama_dir):
    """An RTN w4 g32 (uniform grid, uint4 + zero point) QDIR of the tiny Llama and its ONNX file."""
    folder = tmp_path_factory.mktemp("onnx")
    quantization.quantize(str(tiny_llama_dir), QuantConfig(method="rtn", group_size=32, nsamples=2, seqlen=32),
                 folder / "q", device="cpu", progress=False)
    return folder / "q", export(load_qdir(folder / "q"), "onnx", folder / "m.onnx")


# --- metrics ----------------------------------------------------------------------------------------------


def test_stream_metrics_match_their_definitions() -> None:
    gen = torch.Generator().manual_seed(0)
    window = torch.randint(0, 50, (9,), generator=gen)
    ref_logits, logits = torch.randn(9, 50, generator=gen), torch.randn(9, 50, generator=gen)
    ref = Reference.from_logits(ref_logits)
    same, other = StreamMetrics(), StreamMetrics()
    same.update(ref_logits, window, ref)
    other.update(logits, window, ref)
    assert same.kl == 0.0 and same.top1 == 1.0 and same.tokens == 8
    p, q = torch.log_softmax(ref_logits[:-1], -1), torch.log_softmax(logits[:-1], -1)
    kl = torch.nn.functional.kl_div(q, p, log_target=True, reduction="sum") / 8  # KL(p || q)
    assert math.isclose(other.kl, float(kl), rel_tol=1e-5)
    assert other.top1 == float((p.argmax(-1) == q.argmax(-1)).float().mean())
    expected = perplexity(lambda ids: logits[None], window[None], "x", progress=False).ppl
    assert math.isclose(other.ppl, expected, rel_tol=1e-12)


# --- check ------------------------------------------------------------------------------------------------


def test_check_passes_on_honest_gguf(tmp_path, q4_0_gguf) -> None:
    qdir, gguf = q4_0_gguf
    r = run_cli("check", str(qdir), "--gguf", str(gguf), *CHECK_WINDOWS, "--json", "-o", str(tmp_path / "rep"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] is True
    rows = {row["backend"]: row for row in report["backends"]}
    assert set(rows) == {"float", "fake-quant", "llama.cpp"}
    assert all(row["tokens"] == 2 * 63 for row in rows.values())
    assert rows["fake-quant"]["gap"] == 0.0 and rows["fake-quant"]["kl"] == 0.0
    assert abs(rows["llama.cpp"]["gap"]) <= 0.01 and rows["llama.cpp"]["top1"] > 0.9
    w = report["weights"]["gguf"]
    assert w["tensors"] == 15 and w["max_abs_diff"] == 0.0 and not w["failing"]  # 14 layers and the embedding
    size = report["sizes"]["gguf"]
    assert size["bytes"] == gguf.stat().st_size
    assert size["bits_per_weight"] == round(8 * size["bytes"] / load_qdir(qdir).meta["parameters"], 4)
    assert report["runtime"]["llama.cpp"]["n_ctx"] == 64 and report["settings"]["gguf_tol"] == 0.01
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["passed"] is True
    assert "| llama.cpp |" in (tmp_path / "rep" / "report.md").read_text()


def test_check_gguf_graph_scores_the_fakequant_weights_as_f32(tmp_path, q4_0_gguf, int_onnx,
                                                              cli_main) -> None:
    """--gguf-graph: the F32 GGUF of the fake-quant weights holds them exactly; llama.cpp scores it with float
    products (within the graph tolerance, closer than the q4_0 file whose activations it rounds to 8 bits); the
    temporary file is gone afterwards; without a GGUF file the option is refused in one line."""
    from exporters.gguf.export import export_fakequant_f32
    from runtime_check.backends import LLAMACPP_F32
    from runtime_check.checker import GRAPH_TOL, weight_diffs

    qdir, gguf = q4_0_gguf
    f32 = export_fakequant_f32(load_qdir(qdir), tmp_path / "f32.gguf")
    diffs = weight_diffs("gguf", f32, load_qdir(qdir))
    assert len(diffs) == 15 and max(diffs.values()) == 0.0
    r = run_cli("check", str(qdir), "--gguf", str(gguf), "--gguf-graph", *CHECK_WINDOWS, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    rows = {row["backend"]: row for row in report["backends"]}
    graph, kernels = rows[LLAMACPP_F32], rows["llama.cpp"]
    assert abs(graph["gap"]) <= GRAPH_TOL and graph["kl"] < kernels["kl"] and graph["tokens"] == 2 * 63
    check = next(c for c in report["checks"] if c["check"] == f"{LLAMACPP_F32} |PPL gap|")
    assert check["passed"] and check["limit"] == GRAPH_TOL
    assert not list(gguf.parent.glob(".f32-*"))
    onnx_qdir, onnx = int_onnx
    assert_one_line_error(cli_main("check", str(onnx_qdir), "--onnx", str(onnx), "--gguf-graph"), "--gguf")


def test_gguf_tolerance_is_the_model_family_s() -> None:
    """The llama.cpp tolerance of a check is its family's ``GgufArch.kernel_tol`` (Gemma 3's own, measured)."""
    from transformers import Gemma3TextConfig, LlamaConfig

    from runtime_check.checker import default_gguf_tol
    from turboboa.arch.base import GgufArch
    from turboboa.arch.gemma3 import Gemma3Adapter

    assert default_gguf_tol(LlamaConfig()) == GgufArch.kernel_tol == 0.01
    assert default_gguf_tol(Gemma3TextConfig()) == Gemma3Adapter.GGUF.kernel_tol > 0.01


def test_check_passes_on_honest_onnx(int_onnx) -> None:
    from runtime_check.checker import CheckSettings, check

    qdir, onnx_file = int_onnx
    report = check(qdir, onnx=onnx_file, settings=CheckSettings(seqlen=64, max_windows=2, threads=2),
                   progress=False)
    assert report["passed"] is True
    rows = {row["backend"]: row for row in report["backends"]}
    assert abs(rows["onnxruntime"]["gap"]) <= 1e-3 and rows["onnxruntime"]["top1"] == 1.0
    assert report["weights"]["onnx"]["max_abs_diff"] == 0.0
    assert report["runtime"]["onnxruntime"]["graph_optimization_level"] == "ORT_ENABLE_BASIC"


def flip_q4_0_code(path, tensor: str) -> None:
    """Move the first 4-bit code of ``tensor``'s first q4_0 block (fp16 d, then 16 bytes of nibbles) by one
    step, in the file's bytes."""
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(path).tensors if t.name == tensor)
    offset = int(t.data_offset)
    with open(path, "r+b") as f:
        f.seek(offset)
        block = bytearray(f.read(18))
        assert struct.unpack("<e", bytes(block[:2]))[0] != 0.0  # a nonzero scale: the step changes the weight
        low = block[2] & 0x0F
        block[2] = (block[2] & 0xF0) | (low + 1 if low < 15 else low - 1)
        f.seek(offset)
        f.write(block)


def test_check_fails_and_names_one_altered_gguf_code(tmp_path, q4_0_gguf) -> None:
    qdir, gguf = q4_0_gguf
    altered = shutil.copy(gguf, tmp_path / "altered.gguf")
    flip_q4_0_code(altered, "blk.1.ffn_down.weight")
    r = run_cli("check", str(qdir), "--gguf", str(altered), *CHECK_WINDOWS, "-q")
    assert r.returncode == 1, r.stderr
    assert GGUF_ALTERED in r.stdout and "FAIL" in r.stdout
    r = run_cli("check", str(qdir), "--gguf", str(altered), *CHECK_WINDOWS, "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 1 and report["passed"] is False
    assert list(report["weights"]["gguf"]["failing"]) == [GGUF_ALTERED]


def test_check_fails_and_names_one_altered_onnx_code(tmp_path, int_onnx) -> None:
    import onnx
    from onnx import numpy_helper

    qdir, onnx_file = int_onnx
    model = onnx.load(str(onnx_file))
    init = next(t for t in model.graph.initializer if t.name == f"{ONNX_ALTERED}.weight_q")
    codes = numpy_helper.to_array(init)
    values = codes.astype(np.int16)
    values[0, 0] += 1 if values[0, 0] < 15 else -1  # uint4 codes: one step inside [0, 15]
    init.CopyFrom(numpy_helper.from_array(values.astype(codes.dtype), init.name))
    altered = tmp_path / "altered.onnx"
    onnx.save(model, str(altered))
    r = run_cli("check", str(qdir), "--onnx", str(altered), *CHECK_WINDOWS, "--json", "-q")
    assert r.returncode == 1, r.stderr
    report = json.loads(r.stdout)
    assert report["passed"] is False
    assert list(report["weights"]["onnx"]["failing"]) == [ONNX_ALTERED]


def test_check_needs_a_file(q4_0_gguf, cli_main) -> None:
    qdir, _ = q4_0_gguf
    assert_one_line_error(cli_main("check", str(qdir)), "--gguf", "--onnx")


def test_check_refuses_corrupt_and_foreign_files(tmp_path, q4_0_gguf, cli_main) -> None:
    """A truncated GGUF, and a valid GGUF that turboboa did not write: one line, exit 2."""
    import gguf

    qdir, path = q4_0_gguf
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_one_line_error(cli_main("check", str(qdir), "--gguf", str(cut)), "cut.gguf")
    foreign = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(str(foreign), "llama")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_one_line_error(cli_main("check", str(qdir), "--gguf", str(foreign)), "foreign.gguf")


# --- run --------------------------------------------------------------------------------------------------


def test_run_shares_every_quantize_option() -> None:
    from cli import app

    quantize = {p.name for p in app.commands["quantize"].params} - {"output"}
    assert quantize <= {p.name for p in app.commands["run"].params}


def test_export_names_and_format_choice() -> None:
    assert parse_exports("gguf, onnx,gguf") == ("gguf", "onnx")
    with pytest.raises(UserError, match="unknown export format 'tflite'"):
        parse_exports("gguf,tflite")
    cfg, note = choose_format(QuantConfig(), ("gguf", "onnx"), format_given=False)
    assert cfg.format == "q4_0" and "q4_0" in note
    assert choose_format(QuantConfig(), ("onnx",), format_given=False) == (QuantConfig(), None)
    assert choose_format(QuantConfig(format="int"), ("gguf",), format_given=True)[0].format == "int"
    assert possible_formats(QuantConfig(preset="Q4_K_M")) == {"q4_k", "q5_0", "q6_k", "q8_0"}


def test_run_writes_every_file_and_a_manifest_that_verifies(tmp_path, tiny_llama_dir) -> None:
    out = tmp_path / "run"
    r = run_cli("run", str(tiny_llama_dir), "--method", "rtn", "--nsamples", "2", "--seqlen", "32",
                "--export", "gguf,onnx", "--eval-seqlen", "64", "--max-windows", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == str(out / "report.md")
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and report["run"]["config"]["format"] == "q4_0"
    assert "q4_0" in report["run"]["format_choice"]
    assert {row["backend"] for row in report["backends"]} == {"float", "fake-quant", "llama.cpp", "onnxruntime"}
    expected = {"model.gguf", "model.onnx", "report.json", "report.md", "qdir/quant_config.json",
                "qdir/quantized.safetensors", "qdir/float.safetensors"}
    try:
        import matplotlib  # noqa: F401

        expected.add("report.png")
    except ImportError:
        pass
    listed = {}
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    assert expected <= set(listed)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == set(listed) | {"SHA256SUMS"}  # every file written is listed; no temporary left over
    for name, digest in listed.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, name


def test_run_unknown_export_is_one_line(tmp_path, tiny_llama_dir, cli_main) -> None:
    out = tmp_path / "run"
    assert_one_line_error(cli_main("run", str(tiny_llama_dir), "--export", "gguf,tflite", "-o", str(out)),
                          "tflite", "gguf, onnx")
    assert not out.exists()


@pytest.mark.parametrize("args,words", [
    (("--export", "gguf", "--format", "int"), ("--export gguf", "int")),
    (("--export", "gguf", "--format", "lpbq4"), ("--export gguf", "lpbq4")),
    (("--export", "onnx", "--format", "q4_k"), ("--export onnx", "q4_k")),
    (("--export", "gguf,onnx", "--preset", "Q4_K_M"), ("--export onnx", "q4_k")),
    (("--export", "gguf", "--format", "q4_0", "--act-bits", "8"), ("--export gguf", "--act-bits")),
    (("--export", "onnx", "--onnx-profile", "npu"), ("npu", "--sym")),
    (("--export", "onnx", "--onnx-profile", "npu", "--format", "q3_k"), ("npu", "q3_k")),
    (("--export", "onnx", "--onnx-profile", "edge"), ("edge",)),
], ids=["gguf-int", "gguf-lpbq", "onnx-q4_k", "onnx-preset", "gguf-act-bits", "npu-asym", "npu-q3_k",
        "unknown-profile"])
def test_run_refuses_formats_the_exports_cannot_hold_before_quantizing(tmp_path, args, words,
                                                                        cli_main) -> None:
    # the model does not exist: a refusal about the format proves it came before loading and quantizing
    out = tmp_path / "run"
    assert_one_line_error(cli_main("run", str(tmp_path / "no-model"), *args, "-o", str(out)), *words)
    assert not out.exists()


def test_run_npu_profile_passes(tmp_path, tiny_llama_dir) -> None:
    """One q4_0 QDIR, GGUF plus an npu-profile ONNX (static shapes of the check's windows): the check passes."""
    import onnx

    out = tmp_path / "run"
    r = run_cli("run", str(tiny_llama_dir), "--method", "rtn", "--nsamples", "2", "--seqlen", "32", "--export",
                "gguf,onnx", "--onnx-profile", "npu", "--eval-seqlen", "64", "--max-windows", "2", "-q", "-o",
                str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "report.json").read_text())["passed"] is True
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert props["turboboa.profile"] == "npu" and props["turboboa.seqlen"] == "64"


@pytest.mark.slow
def test_default_model_run_passes(tmp_path) -> None:
    """SmolLM2-135M, RTN q4_0, exported to GGUF and ONNX and checked on 2 windows of 256 tokens."""
    out = tmp_path / "run"
    r = run_cli("run", "--method", "rtn", "--nsamples", "2", "--seqlen", "128", "--export", "gguf,onnx",
                "--eval-seqlen", "256", "--max-windows", "2", "-q", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {row["backend"]: row for row in report["backends"]}
    print({name: (round(row["ppl"], 4), row["gap"]) for name, row in rows.items()})
    assert report["passed"] is True and rows["float"]["ppl"] < rows["fake-quant"]["ppl"]


RUN_ARGS = ("--method", "gptq", "--nsamples", "2", "--seqlen", "32", "--export", "gguf", "--no-check", "-q")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, tiny_llama_dir):
    """OUTDIR of an uninterrupted `turboboa run` (GPTQ, GGUF only, no check)."""
    out = tmp_path_factory.mktemp("whole") / "run"
    r = run_cli("run", str(tiny_llama_dir), *RUN_ARGS, "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("point", ["solve:1", "state-write:1", "export:gguf"])
def test_run_killed_and_resumed_gives_the_same_files(tmp_path, tiny_llama_dir, whole_run, point,
                                                     cli_main) -> None:
    """Issue 6's and 20's check: `turboboa run` SIGKILLed while solving block 1, halfway through writing the
    resume state, or halfway through writing model.gguf, leaves no file half-written under its name (the QDIR
    and the GGUF are absent or complete); the same command with --resume cleans what the kill left and writes
    a QDIR and a GGUF byte-identical to an uninterrupted run's (quant_config.json but for its timings)."""
    out = tmp_path / "run"
    argv = ["run", str(tiny_llama_dir), *RUN_ARGS, "-o", str(out)]
    cut = run_cli(*argv, kill_at=point)
    assert cut.returncode == -signal.SIGKILL, cut.stderr
    assert not (out / "model.gguf").exists() and not (out / "SHA256SUMS").exists()
    hidden = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    if point == "export:gguf":  # the QDIR is complete and verifies; the GGUF is a hidden temporary
        assert load_qdir(out / "qdir").digests and not (out / "qdir.partial").exists()
        assert len(hidden) == 1 and hidden[0].startswith(".model.gguf.") and hidden[0].endswith(".tmp")
    else:  # the QDIR is not there; the state of the finished blocks is
        assert not (out / "qdir").exists() and hidden == []
        assert json.loads((out / "qdir.partial" / "state.json").read_text())["next_block"] == 1
        assert_one_line_error(cli_main("export", str(out / "qdir.partial"), "--to", "gguf", "-o",
                                      str(tmp_path / "x.gguf")), str(out / "qdir.partial"))
        assert not (tmp_path / "x.gguf").exists()
    again = run_cli(*argv, "--resume")
    assert again.returncode == 0, again.stderr
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    assert on_disk == sorted(p.relative_to(whole_run).as_posix() for p in whole_run.rglob("*"))  # no leftovers
    assert (out / "model.gguf").read_bytes() == (whole_run / "model.gguf").read_bytes()
    for name in on_disk:
        if name.startswith("qdir/") and name not in ("qdir/quant_config.json", "qdir/SHA256SUMS"):
            assert (out / name).read_bytes() == (whole_run / name).read_bytes(), name
    a, b = (json.loads((d / "qdir" / "quant_config.json").read_text()) for d in (out, whole_run))
    assert {**a, "timings": None} == {**b, "timings": None}


def test_export_checks_take_float_tables_and_refuse_a_grid_gguf_lacks() -> None:
    """``--embed-format float`` keeps the tables float32, which GGUF holds; an embedding format GGUF has no type
    for is refused before quantizing."""
    from turboboa.config import QuantConfig
    from turboboa.errors import UserError
    from workflows.end_to_end import check_exports

    check_exports(QuantConfig(format="q4_0", embed_format="float"), ("gguf", "onnx"), None)
    check_exports(QuantConfig(format="q4_0", embed_format="q8_0"), ("gguf",), None)
    with pytest.raises(UserError, match="lpbq4"):
        check_exports(QuantConfig(format="q4_0", embed_format="lpbq4"), ("gguf",), None)
