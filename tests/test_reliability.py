"""Reliability: resume after an interruption, non-finite values named, bad input refused in one line, atomic
and deterministic output files. Tiny random Llamas only: each test takes seconds."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli
from exporters import export
from turboboa import quantization
from turboboa.checkpoint import CONFIG_FILE, QDIR_VERSION, load_qdir
from turboboa.checksums import SUMS_FILE, folder_files, write_sealed_sums
from turboboa.config import QuantConfig
from turboboa.errors import UserError
from turboboa.resume import work_dir

from .conftest import make_tiny_llama, run_cli

BASE = QuantConfig(method="rtn", bits=4, format="q4_0", nsamples=4, seqlen=32, rows=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_tokenizer) -> Path:
    """A tiny Llama with three blocks (so a run can be interrupted in the middle)."""
    return make_tiny_llama(tmp_path_factory.mktemp("rel") / "tiny", default_tokenizer, layers=3, seed=3)


def quantize(model: Path, out: Path, cfg: QuantConfig = BASE, **kw) -> Path:
    quantization.quantize(str(model), cfg, out, device="cpu", progress=False, **kw)
    return out


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_main(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """``cli.main(argv)`` in process: (exit code, non-empty stderr lines, stdout)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    captured = capsys.readouterr()
    return exc.value.code, [ln for ln in captured.err.splitlines() if ln.strip()], captured.out


def assert_one_line_error(code: int, lines: list[str], *words: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for w in words:
        assert w in lines[0], lines[0]


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    """Names in ``folder`` other than ``keep``: temporary files, work folders, half-written outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# --- resume after a real kill ----------------------------------------------------------------------------
# `turboboa quantize` of the 3-block model, as command-line options (the killed run, its resume and the
# uninterrupted run take the same ones)
CALIB = ("--format", "q4_0", "--rotate", "none", "--nsamples", "4", "--seqlen", "32", "-q")
METHODS = {"rtn": ("--method", "rtn", *CALIB), "gptq": ("--method", "gptq", *CALIB),
           "turboboa-f2": ("--method", "turboboa", "--rows", "4", *CALIB)}
KILLS = {  # (method, where the process SIGKILLs itself, the block the resumed run starts from)
    "rtn-state-write": ("rtn", "state-write:1", 1),
    "rtn-qdir-write": ("rtn", "qdir-write", 3),
    "gptq-solve": ("gptq", "solve:2", 2),
    "turboboa-f2-state-write": ("turboboa-f2", "state-write:1", 1),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny):
    """The QDIR of an uninterrupted `turboboa quantize` per method (in this process), made on first use."""
    folder, made = tmp_path_factory.mktemp("whole"), {}

    def get(method: str) -> Path:
        if method not in made:
            with pytest.raises(SystemExit) as exc:
                cli.main(["quantize", str(tiny), *METHODS[method], "-o", str(folder / method / "Q")])
            assert exc.value.code == 0
            made[method] = folder / method / "Q"  # named as the resumed QDIR: the GGUF records the name
        return made[method]

    return get


def assert_same_qdir(whole: Path, resumed: Path) -> None:
    """Every file byte-identical, but quant_config.json's timings (and so its digest in SHA256SUMS)."""
    names = folder_files(whole)
    assert folder_files(resumed) == names
    for name in names:
        a, b = (whole / name).read_bytes(), (resumed / name).read_bytes()
        if name == CONFIG_FILE:
            a, b = ({k: v for k, v in json.loads(x).items() if k != "timings"} for x in (a, b))
        if name == SUMS_FILE:
            a, b = ([ln for ln in x.splitlines() if not ln.endswith(CONFIG_FILE.encode()) and not ln.startswith(b"#")]
                    for x in (a, b))
        assert a == b, name


@pytest.mark.parametrize("case", list(KILLS))
def test_killed_quantize_resumes_to_the_same_qdir(tmp_path, tiny, uninterrupted, capsys, case) -> None:
    """`turboboa quantize` SIGKILLed at a point of its work or of a write: no QDIR under its name, the state of
    the last committed block kept; the same command with --resume continues from there, cleans what the kill
    left, and writes a QDIR (and a GGUF) byte-identical to an uninterrupted run's."""
    method, point, start = KILLS[case]
    out = tmp_path / "Q"
    argv = ["quantize", str(tiny), *METHODS[method], "-o", str(out)]
    cut = run_cli(*argv, kill_at=point)
    assert cut.returncode == -signal.SIGKILL, cut.stderr
    assert not out.exists()  # never half there
    state = json.loads((work_dir(out) / "state.json").read_text())
    assert state["next_block"] == start
    hidden = sorted(p.name for p in work_dir(out).iterdir() if p.name.startswith("."))
    if point.startswith("state-write"):  # the half-written state file is a hidden temporary, never state.json
        assert len(hidden) == 1 and hidden[0].startswith(".state.json.") and hidden[0].endswith(".tmp")
        with pytest.raises(json.JSONDecodeError):
            json.loads((work_dir(out) / hidden[0]).read_text())
    else:
        assert hidden == []
    if method == "turboboa-f2":  # TurboBoA's F2 keeps its full-precision stream
        assert "X_fp" in load_file(str(work_dir(out) / f"streams-{start:04d}.safetensors"))
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".Q.tmp-")]
    assert len(partial) == (point == "qdir-write")
    for folder in (work_dir(out), *partial):  # neither the work folder nor a half-written QDIR exports
        r = run_main(["export", str(folder), "--to", "gguf", "-o", str(tmp_path / "x.gguf")], capsys)
        assert_one_line_error(*r[:2], str(folder))
    assert not (tmp_path / "x.gguf").exists()

    code, lines, _ = run_main([*argv, "--resume"], capsys)
    assert code == 0, lines
    assert not work_dir(out).exists() and leftovers(tmp_path, {"Q"}) == []
    assert json.loads((out / CONFIG_FILE).read_text())["timings"]["resumed_from_block"] == start
    whole = uninterrupted(method)
    assert_same_qdir(whole, out)
    a = export(load_qdir(whole), "gguf", tmp_path / "whole.gguf")
    assert digest(a) == digest(export(load_qdir(out), "gguf", tmp_path / "resumed.gguf"))


def test_killed_export_leaves_no_file_and_the_rerun_writes_the_same_bytes(tmp_path, qdir, gguf_file,
                                                                         capsys) -> None:
    out = tmp_path / "m.gguf"
    argv = ["export", str(qdir), "--to", "gguf", "-q", "-o", str(out)]
    cut = run_cli(*argv, kill_at="export:gguf")
    assert cut.returncode == -signal.SIGKILL, cut.stderr
    assert not out.exists()
    (tmp,) = tmp_path.iterdir()  # the half-written file, under a hidden temporary name
    assert tmp.name.startswith(".m.gguf.") and tmp.name.endswith(".tmp")
    assert 0 < tmp.stat().st_size < gguf_file.stat().st_size and tmp.read_bytes()[:4] == b"GGUF"
    code, lines, _ = run_main(argv, capsys)
    assert code == 0, lines
    assert leftovers(tmp_path, {"m.gguf"}) == [] and digest(out) == digest(gguf_file)


def test_resume_without_state_starts_over_and_without_resume_state_is_replaced(tmp_path, tiny) -> None:
    out = tmp_path / "Q"
    junk = work_dir(out)
    junk.mkdir()
    (junk / "state.json").write_text("{not json")
    quantize(tiny, out)  # without resume: the old work folder is ignored and replaced
    assert not junk.exists() and (out / CONFIG_FILE).is_file()


def test_mismatched_resume_is_refused(tmp_path, tiny, capsys) -> None:
    out = tmp_path / "Q"
    argv = ["quantize", str(tiny), *METHODS["rtn"], "-o", str(out)]
    assert run_cli(*argv, kill_at="solve:1").returncode == -signal.SIGKILL
    code, lines, _ = run_main([*argv, "--seed", "1", "--resume"], capsys)
    assert_one_line_error(code, lines, "cannot resume: ", "another model, configuration")
    assert not out.exists() and (work_dir(out) / "state.json").is_file()  # kept for the right command
    code, lines, _ = run_main([*argv, "--resume"], capsys)
    assert code == 0, lines
    assert (out / CONFIG_FILE).is_file() and not work_dir(out).exists()


# --- non-finite values ----------------------------------------------------------------------------------------
def corrupted_copy(src: Path, dst: Path, name: str, value: float, index: tuple[int, ...] = (0,)) -> Path:
    """A copy of the model folder ``src`` with one element of tensor ``name`` set to ``value``."""
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name][index] = value
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_nan_in_a_weight_is_named_and_nothing_is_written(tmp_path, tiny, capsys) -> None:
    bad = corrupted_copy(tiny, tmp_path / "bad", "model.layers.1.mlp.up_proj.weight", float("nan"), (3, 5))
    out = tmp_path / "out" / "Q"
    code, lines, _ = run_main(["quantize", str(bad), "--method", "rtn", "--group-size", "32", "--nsamples", "4",
                               "--seqlen", "32", "-q", "-o", str(out)], capsys)
    assert_one_line_error(code, lines, "model.layers.1.mlp.up_proj.weight", "NaN or Inf")
    assert not out.parent.exists() or leftovers(out.parent, set()) == []


def test_overflowing_hessian_is_named_and_no_work_folder_is_left(tmp_path, tiny) -> None:
    bad = corrupted_copy(tiny, tmp_path / "bad", "model.layers.1.input_layernorm.weight", 1e38, (slice(None),))
    out = tmp_path / "Q"
    with pytest.raises(UserError, match=r"layer model\.layers\.1\.self_attn\.q_proj: the input Hessian holds NaN"):
        quantize(bad, out, dataclasses.replace(BASE, method="gptq"))
    assert leftovers(tmp_path, {"bad"}) == []


# --- bad input through the command line -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def qdir(tmp_path_factory, tiny) -> Path:
    return quantize(tiny, tmp_path_factory.mktemp("q") / "Q")


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory, qdir) -> Path:
    return export(load_qdir(qdir), "gguf", tmp_path_factory.mktemp("g") / "model.gguf")


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, tiny) -> Path:
    q = quantize(tiny, tmp_path_factory.mktemp("qi") / "Q", dataclasses.replace(BASE, format="int", group_size=32))
    return export(load_qdir(q), "onnx", tmp_path_factory.mktemp("o") / "model.onnx")


def test_unknown_export_format(tmp_path, qdir, capsys) -> None:
    out = tmp_path / "model.tflite"
    code, lines, _ = run_main(["export", str(qdir), "--to", "tflite", "-o", str(out)], capsys)
    assert_one_line_error(code, lines, "tflite", "gguf", "onnx")
    assert leftovers(tmp_path, set()) == []


def test_output_below_a_file_is_refused(tmp_path, qdir, tiny, capsys) -> None:
    (tmp_path / "file").write_text("x")
    code, lines, _ = run_main(["export", str(qdir), "--to", "gguf", "-o", str(tmp_path / "file" / "m.gguf")], capsys)
    assert_one_line_error(code, lines, "is a file, not a folder")
    code, lines, _ = run_main(["quantize", str(tiny), "--nsamples", "2", "--seqlen", "32", "-q",
                               "-o", str(tmp_path / "file" / "Q")], capsys)
    assert_one_line_error(code, lines, "is a file, not a folder")
    assert leftovers(tmp_path, {"file"}) == []


def test_unwritable_output_location(tmp_path, qdir, tiny, monkeypatch, capsys) -> None:
    import turboboa.output_files

    folder = tmp_path / "ro"
    folder.mkdir()
    real = turboboa.output_files.os.access
    monkeypatch.setattr(turboboa.output_files.os, "access", lambda p, mode: False if Path(p) == folder else real(p, mode))
    code, lines, _ = run_main(["export", str(qdir), "--to", "gguf", "-o", str(folder / "m.gguf")], capsys)
    assert_one_line_error(code, lines, "not writable")
    code, lines, _ = run_main(["quantize", str(tiny), "--nsamples", "2", "--seqlen", "32", "-q",
                               "-o", str(folder / "Q")], capsys)
    assert_one_line_error(code, lines, "not writable")
    assert leftovers(folder, set()) == []


@pytest.mark.parametrize("target", ["gguf", "onnx", "qdir"])
def test_full_disk_is_refused_before_writing(tmp_path, qdir, tiny, monkeypatch, capsys, target) -> None:
    import turboboa.output_files

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(turboboa.output_files.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    if target == "qdir":
        argv = ["quantize", str(tiny), "--group-size", "32", "--nsamples", "2", "--seqlen", "32", "-q",
                "-o", str(tmp_path / "Q")]
    else:
        argv = ["export", str(qdir), "--to", target, "-o", str(tmp_path / f"m.{target}")]
    code, lines, _ = run_main(argv, capsys)
    assert_one_line_error(code, lines, "not enough free space", "MiB")
    assert leftovers(tmp_path, set()) == []


def test_disk_full_during_a_write_is_one_line(tmp_path, qdir, monkeypatch, capsys) -> None:
    import errno

    import exporters.gguf.writer as writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.GGUFWriter, "write_tensors_to_file", full)
    code, lines, _ = run_main(["export", str(qdir), "--to", "gguf", "-q", "-o", str(tmp_path / "m.gguf")], capsys)
    assert_one_line_error(code, lines, "no space left")
    assert leftovers(tmp_path, set()) == []


@pytest.mark.parametrize("version", [QDIR_VERSION + 1, None])
def test_qdir_of_another_version(tmp_path, qdir, capsys, version) -> None:
    copy = tmp_path / "Q"
    shutil.copytree(qdir, copy)
    doc = json.loads((copy / CONFIG_FILE).read_text())
    doc.pop("version") if version is None else doc.update(version=version)
    (copy / CONFIG_FILE).write_text(json.dumps(doc))
    write_sealed_sums(copy)  # intact, as the turboboa that wrote that version would have sealed it
    code, lines, _ = run_main(["export", str(copy), "--to", "gguf", "-o", str(tmp_path / "m.gguf")], capsys)
    assert_one_line_error(code, lines, f"format version {version}", f"reads version {QDIR_VERSION}",
                          "upgrade turboboa" if version else "quantize again")
    assert not (tmp_path / "m.gguf").exists()


def damaged(kind: str, good: Path, out: Path) -> Path:
    """``random``: random bytes under the file's name; ``truncated``: the first 60% of the file."""
    data = good.read_bytes()
    if kind == "random":
        gen = torch.Generator().manual_seed(0)
        data = bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist())
    else:
        data = data[: int(len(data) * 0.6)]
    out.write_bytes(data)
    return out


@pytest.mark.parametrize("kind", ["random", "truncated"])
@pytest.mark.parametrize("suffix", ["gguf", "onnx"])
def test_corrupt_runtime_file_given_to_eval(tmp_path, gguf_file, onnx_file, capsys, kind, suffix) -> None:
    good = gguf_file if suffix == "gguf" else onnx_file
    bad = damaged(kind, good, tmp_path / f"bad.{suffix}")
    code, lines, _ = run_main(["eval", str(bad), "--seqlen", "32", "--max-windows", "1", "-q"], capsys)
    assert_one_line_error(code, lines, str(bad))
    assert leftovers(tmp_path, {bad.name}) == []


def test_foreign_files_are_refused_where_ours_are_needed(tmp_path, gguf_file, onnx_file) -> None:
    import gguf
    import onnx
    from onnx import TensorProto, helper

    from runtime_check.llamacpp import validate_gguf
    from runtime_check.onnxrt import validate_onnx

    assert validate_gguf(gguf_file, require_ours=True)["turboboa.method"] == "rtn"
    assert "turboboa.method" in validate_onnx(onnx_file, require_ours=True)
    foreign = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(foreign, "llama")
    w.add_name("someone else's")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert validate_gguf(foreign) == {}
    with pytest.raises(UserError, match="turboboa did not write"):
        validate_gguf(foreign, require_ours=True)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph, producer_name="other"), tmp_path / "foreign.onnx")
    assert validate_onnx(tmp_path / "foreign.onnx") == {}
    with pytest.raises(UserError, match="turboboa did not write"):
        validate_onnx(tmp_path / "foreign.onnx", require_ours=True)


# --- determinism ------------------------------------------------------------------------------------------------
def test_exported_files_are_byte_identical_across_runs_and_thread_counts(tmp_path, tiny) -> None:
    threads = torch.get_num_threads()
    digests = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            g = quantize(tiny, tmp_path / "Qg", dataclasses.replace(BASE, method="turboboa"))
            o = quantize(tiny, tmp_path / "Qo", dataclasses.replace(BASE, method="turboboa", format="int",
                                                                    group_size=32))
            gguf = export(load_qdir(g), "gguf", tmp_path / "m.gguf")
            onnx = export(load_qdir(o), "onnx", tmp_path / "m.onnx")
            digests.append((digest(gguf), digest(onnx)))
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1]
    assert leftovers(tmp_path, {"Qg", "Qo", "m.gguf", "m.onnx"}) == []
