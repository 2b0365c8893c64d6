"""The command line: bad input is one line on stderr, exit code 2, and nothing written; a tiny run works."""

from __future__ import annotations

import json

import pytest

from .conftest import assert_one_line_error, run_cli


def test_bits_outside_supported_set(tmp_path):
    out = tmp_path / "Q"
    proc = run_cli("quantize", "--bits", "5", "-o", str(out))
    assert_one_line_error(proc, "--bits 5", "2, 3, 4, 8")
    assert not out.exists()


def test_unknown_model_path(tmp_path):
    out = tmp_path / "Q"
    proc = run_cli("quantize", str(tmp_path / "nope.gguf"), "-o", str(out))
    assert_one_line_error(proc, "not found")
    assert not out.exists()


def test_unsupported_architecture(tmp_path, default_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(default_tokenizer))).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    out = tmp_path / "Q"
    proc = run_cli("quantize", str(folder), "--nsamples", "2", "--seqlen", "32", "-o", str(out))
    assert_one_line_error(proc, "GPT2LMHeadModel", "llama")
    assert not out.exists()


def test_group_wider_than_layer(tmp_path, tiny_llama_dir):
    out = tmp_path / "Q"
    proc = run_cli("quantize", str(tiny_llama_dir), "--group-size", "256", "--nsamples", "2", "--seqlen", "32",
                   "-o", str(out))
    assert_one_line_error(proc, "--group-size 256", "64")
    assert not out.exists()


def test_missing_calibration_data(tmp_path, tiny_llama_dir):
    out = tmp_path / "Q"
    proc = run_cli("quantize", str(tiny_llama_dir), "--group-size", "32", "--calib", str(tmp_path / "missing.jsonl"),
                   "-o", str(out))
    assert_one_line_error(proc, "missing.jsonl")
    assert not out.exists()


def test_unknown_option_is_one_line(tmp_path, cli_main):
    assert_one_line_error(cli_main("quantize", "--bogus", "-o", str(tmp_path / "Q")), "--bogus")


@pytest.mark.parametrize("method", ["rtn", "gptq", "turboboa"])
def test_tiny_model_quantize_then_eval(tmp_path, tiny_llama_dir, method):
    out = tmp_path / f"Q-{method}"
    proc = run_cli("quantize", str(tiny_llama_dir), "--method", method, "--bits", "4", "--group-size", "32",
                   "--nsamples", "4", "--seqlen", "64", "--rows", "4", "-q", "--json", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["layers"] == 15  # 2 blocks x 7 linear layers and the tied embedding (q8_0 by default)
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["method"] == method and meta["calibration"]["nsamples"] == 4
    assert meta["versions"]["torch"]
    proc = run_cli("eval", str(out), "--seqlen", "64", "--max-windows", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["backend"] == "torch-fakequant" and res["windows"] == 2 and res["tokens"] == 2 * 63
    assert res["ppl"] > 1


def test_command_and_python_api_share_their_defaults(tmp_path, tiny_llama_dir) -> None:
    """``turboboa quantize`` with only the sizes given and ``turboboa.quantize`` with a ``QuantConfig`` of
    the same sizes build the same configuration and write the same QDIR: every tensor file byte for byte, and
    ``quant_config.json`` equal but for the run's timings (the only thing that differs between two runs)."""
    from turboboa import quantization
    from turboboa.checksums import folder_files
    from turboboa.config import QuantConfig

    sizes = {"group_size": 32, "nsamples": 4, "seqlen": 32}
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    proc = run_cli("quantize", str(tiny_llama_dir), "--group-size", "32", "--nsamples", "4", "--seqlen", "32",
                   "-q", "--json", "-o", str(cli_out))
    assert proc.returncode == 0, proc.stderr
    summary = quantization.quantize(str(tiny_llama_dir), QuantConfig(**sizes), api_out, progress=False)
    assert json.loads(proc.stdout)["config"] == json.loads(json.dumps(summary.config.to_dict()))
    names = folder_files(cli_out)
    assert names == folder_files(api_out)
    assert "quantized.safetensors" in names and "float.safetensors" in names
    for name in names:
        if name in ("quant_config.json", "SHA256SUMS"):
            continue
        assert (cli_out / name).read_bytes() == (api_out / name).read_bytes(), name
    a, b = (json.loads((d / "quant_config.json").read_text()) for d in (cli_out, api_out))
    assert a.pop("timings") and b.pop("timings")
    assert a == b
