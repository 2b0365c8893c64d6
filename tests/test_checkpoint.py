"""The QDIR: save and load are exact, the fake-quant model needs nothing but the QDIR, and one changed byte in
any of its files is refused (in one line naming the file) by every command that reads it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from exporters import export
from turboboa import quantization
from turboboa.blockwise import quantize_model
from turboboa.checkpoint import QDIR_VERSION, load_fakequant_model, load_qdir, save_qdir
from turboboa.checksums import SUMS_FILE, folder_files, read_sealed_sums, write_sealed_sums
from turboboa.config import QuantConfig
from turboboa.errors import UserError
from turboboa.models import load_float_model

from .conftest import EMBEDDING, assert_one_line_error, run_cli, run_main


def test_qdir_round_trip_is_exact(tmp_path, tiny_llama_dir):
    loaded = load_float_model(str(tiny_llama_dir))
    cfg = QuantConfig(method="turboboa", bits=3, group_size=32, rows=4, nsamples=4, seqlen=48)
    ids = torch.randint(0, 1000, (4, 48), generator=torch.Generator().manual_seed(0))
    result = quantize_model(loaded.model, ids, cfg, torch.device("cpu"), progress=False)
    qdir = save_qdir(tmp_path / "Q", loaded.model, loaded.tokenizer, result.layers, cfg, {"calibration": {}})
    assert not [p for p in qdir.parent.iterdir() if ".tmp-" in p.name]
    ckpt = load_qdir(qdir)
    assert ckpt.config == cfg
    assert set(ckpt.layers) == set(result.layers)
    for name, q in result.layers.items():
        r = ckpt.layers[name]
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)
        assert int(r.codes.max()) <= (7 if name != EMBEDDING else 255)  # the embedding's default type: q8_0
    model = load_fakequant_model(ckpt)
    # the fake-quant model computes exactly what the in-memory quantized model computes
    x = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded.model(input_ids=x).logits)
    for name, q in result.layers.items():
        assert torch.equal(model.get_submodule(name).weight, q.dequantize())


@pytest.mark.parametrize("tied", [True, False])
def test_lazy_fakequant_model_computes_the_same_logits(tmp_path, tiny_llama_dir, tied):
    """``lazy=True`` (turboboa check on the CPU): the linear layers keep only their codes and dequantize at
    every forward pass; the logits are those of the materialized fake-quant model, bit for bit."""
    from turboboa.checkpoint import CodesWeight

    loaded = load_float_model(str(tiny_llama_dir))
    if not tied:  # an untied head is a quantized Linear of its own (HEAD)
        loaded.model.config.tie_word_embeddings = False
        loaded.model.lm_head.weight = torch.nn.Parameter(loaded.model.lm_head.weight.detach().clone() * 0.9)
    cfg = QuantConfig(method="rtn", format="q4_0", nsamples=2, seqlen=32)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    result = quantize_model(loaded.model, ids, cfg, torch.device("cpu"), progress=False)
    ckpt = load_qdir(save_qdir(tmp_path / "Q", loaded.model, loaded.tokenizer, result.layers, cfg, {}))
    eager, lazy = load_fakequant_model(ckpt), load_fakequant_model(ckpt, lazy=True)
    codes_served = {name for name, m in lazy.named_modules() if isinstance(m, CodesWeight)}
    assert len(codes_served) == len(ckpt.layers) - 1  # all but the embedding
    assert ("lm_head.parametrizations.weight.0" in codes_served) == (not tied)
    for name, q in ckpt.layers.items():
        assert torch.equal(lazy.get_submodule(name).weight, q.dequantize())
    x = torch.randint(0, 1000, (1, 40))
    with torch.inference_mode():
        assert torch.equal(lazy(input_ids=x).logits, eager(input_ids=x).logits)
    lazy_weights = sum(q.codes.numel() for name, q in ckpt.layers.items() if name != EMBEDDING)
    assert sum(p.numel() for p in lazy.parameters()) == sum(p.numel() for p in eager.parameters()) - lazy_weights


def test_qdir_version_and_marker_are_checked(tmp_path, tiny_llama_dir):
    loaded = load_float_model(str(tiny_llama_dir))
    cfg = QuantConfig(method="rtn", bits=4, group_size=-1)
    ids = torch.randint(0, 1000, (2, 16))
    result = quantize_model(loaded.model, ids, cfg, torch.device("cpu"), progress=False)
    qdir = save_qdir(tmp_path / "Q", loaded.model, None, result.layers, cfg, {})
    doc = json.loads((qdir / "quant_config.json").read_text())
    doc["version"] = 999
    (qdir / "quant_config.json").write_text(json.dumps(doc))
    write_sealed_sums(qdir)  # as a newer turboboa would have written it
    try:
        load_qdir(qdir)
        raise AssertionError("a QDIR of another version must be refused")
    except UserError as e:
        assert "version 999" in str(e)


# --- integrity: SHA256SUMS ------------------------------------------------------------------------------------
CORE_FILES = {"quant_config.json", "quantized.safetensors", "float.safetensors", "config.json", SUMS_FILE}


@pytest.fixture(scope="module")
def q4_qdir(tmp_path_factory, tiny_llama_dir) -> Path:
    """An RTN q4_0 QDIR of the tiny Llama (exportable to GGUF)."""
    out = tmp_path_factory.mktemp("integrity") / "Q"
    quantization.quantize(str(tiny_llama_dir), QuantConfig(method="rtn", format="q4_0", nsamples=2, seqlen=32), out,
                 device="cpu", progress=False)
    return out


def flip_middle_byte(path: Path) -> None:
    """Change one bit of the byte in the middle of the file ``path``."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def damaged_copy(qdir: Path, folder: Path, name: str) -> Path:
    """A copy of ``qdir`` in ``folder`` with one byte of its file ``name`` flipped."""
    copy = folder / "Q"
    shutil.copytree(qdir, copy)
    flip_middle_byte(copy / name)
    return copy


def test_qdir_lists_every_file_with_a_sealed_sha256(q4_qdir) -> None:
    digests = read_sealed_sums(q4_qdir, "")
    assert set(digests) == set(folder_files(q4_qdir)) - {SUMS_FILE} and CORE_FILES - {SUMS_FILE} <= set(digests)
    assert load_qdir(q4_qdir).digests == digests
    if shutil.which("sha256sum"):  # the list is sha256sum's format; the seal is a comment line to it
        check = subprocess.run(["sha256sum", "--strict", "-c", SUMS_FILE], cwd=q4_qdir, capture_output=True,
                               text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_one_flipped_byte_in_any_file_is_refused_by_export(tmp_path, q4_qdir, capsys) -> None:
    """Every file of the QDIR (the list of digests included), one flipped byte each: ``turboboa export`` exits 2
    with one line naming that file and writes nothing."""
    names = folder_files(q4_qdir)
    assert CORE_FILES <= set(names)
    out = tmp_path / "x.gguf"
    assert run_main("export", str(q4_qdir), "--to", "gguf", "-q", "-o", str(out), capsys=capsys).returncode == 0
    out.unlink()
    for i, name in enumerate(names):
        bad = damaged_copy(q4_qdir, tmp_path / f"case{i}", name)
        r = run_main("export", str(bad), "--to", "gguf", "-q", "-o", str(out), capsys=capsys)
        assert_one_line_error(r, str(bad / name), "damaged")
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"case{j}" for j in range(i + 1)]  # no x.gguf


def test_damaged_float_file_is_refused_by_the_command(tmp_path, q4_qdir) -> None:
    """The issue's case through a fresh ``turboboa`` process: one byte in the middle of float.safetensors."""
    bad = damaged_copy(q4_qdir, tmp_path, "float.safetensors")
    r = run_cli("export", str(bad), "--to", "gguf", "-o", str(tmp_path / "x.gguf"))
    assert_one_line_error(r, str(bad / "float.safetensors"), "SHA-256")
    assert not (tmp_path / "x.gguf").exists()


def test_missing_listed_file_is_refused(tmp_path, q4_qdir, capsys) -> None:
    copy = tmp_path / "Q"
    shutil.copytree(q4_qdir, copy)
    (copy / "config.json").unlink()
    r = run_main("export", str(copy), "--to", "gguf", "-o", str(tmp_path / "x.gguf"), capsys=capsys)
    assert_one_line_error(r, str(copy / "config.json"), "missing")
    (copy / SUMS_FILE).unlink()
    r = run_main("export", str(copy), "--to", "gguf", "-o", str(tmp_path / "x.gguf"), capsys=capsys)
    assert_one_line_error(r, f"lacks {SUMS_FILE}", "quantize again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Q"]


@pytest.mark.parametrize("command,name", [("eval", "float.safetensors"), ("check", "quantized.safetensors"),
                                          ("calibrate", SUMS_FILE), ("calibrate", "quant_config.json")])
def test_eval_check_and_calibrate_refuse_a_damaged_file(tmp_path, q4_qdir, capsys, command, name) -> None:
    bad = damaged_copy(q4_qdir, tmp_path, name)
    before = {n: (bad / n).read_bytes() for n in folder_files(bad)}
    if command == "eval":
        argv = ["eval", str(bad), "--seqlen", "32", "--max-windows", "1", "-q"]
    elif command == "check":
        gguf = export(load_qdir(q4_qdir), "gguf", tmp_path / "m.gguf")
        argv = ["check", str(bad), "--gguf", str(gguf), "--seqlen", "32", "--max-windows", "1", "-q"]
    else:
        argv = ["calibrate", str(bad), "--act-bits", "8", "--nsamples", "2", "--seqlen", "32", "-q"]
    assert_one_line_error(run_main(*argv, capsys=capsys), str(bad / name), "damaged")
    assert {n: (bad / n).read_bytes() for n in folder_files(bad)} == before  # nothing rewritten


def test_calibrate_records_the_new_files_and_keeps_the_others(tmp_path, q4_qdir, capsys) -> None:
    copy = tmp_path / "Q"
    shutil.copytree(q4_qdir, copy)
    old = read_sealed_sums(copy, "")
    r = run_main("calibrate", str(copy), "--act-bits", "8", "--nsamples", "2", "--seqlen", "32", "-q",
                 capsys=capsys)
    assert r.returncode == 0, r.stderr
    new = read_sealed_sums(copy, "")
    assert set(new) == set(folder_files(copy)) - {SUMS_FILE} and "activations.safetensors" in new
    assert {k: v for k, v in new.items() if k not in ("quant_config.json", "activations.safetensors")} == \
        {k: v for k, v in old.items() if k != "quant_config.json"}
    assert load_qdir(copy).activations is not None  # verifies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Q"]  # no temporary folder left
    flip_middle_byte(copy / "activations.safetensors")
    with pytest.raises(UserError, match="activations.safetensors is damaged"):
        load_qdir(copy)


def test_qdir_of_the_previous_version_is_refused_by_its_version(tmp_path, q4_qdir, capsys) -> None:
    """A version-1 QDIR (written before SHA256SUMS) is refused in one line by its version, not as damaged."""
    copy = tmp_path / "Q"
    shutil.copytree(q4_qdir, copy)
    (copy / SUMS_FILE).unlink()
    doc = json.loads((copy / "quant_config.json").read_text())
    (copy / "quant_config.json").write_text(json.dumps({**doc, "version": 1}))
    r = run_main("export", str(copy), "--to", "gguf", "-o", str(tmp_path / "x.gguf"), capsys=capsys)
    assert_one_line_error(r, "format version 1", f"reads version {QDIR_VERSION}", "quantize again")
