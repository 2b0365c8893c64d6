"""``bench/gguf_vs_llamacpp.py`` checks each of our files against the QDIR it was exported from (weights decode
exactly, llama.cpp's PPL within 1% of the fake-quant model's), and checks a reused row only when its files are
the ones it measured; on a tiny random Llama."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from exporters import export
from turboboa import quantization
from turboboa.arch.base import GgufArch
from turboboa.checkpoint import load_qdir
from turboboa.config import QuantConfig

from .conftest import run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gguf_vs_llamacpp as bench  # noqa: E402
import provenance as pv  # noqa: E402

ARGS = argparse.Namespace(model="tiny", eval_seqlen=32, max_windows=2, device="cpu", nsamples=2, seqlen=32)


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama_dir) -> Path:
    """A bench work folder holding one of our rows' files: an RTN q4_0 QDIR of the tiny Llama and its GGUF."""
    work = tmp_path_factory.mktemp("bench-gguf")
    target, qdir = bench.file_paths(work, ARGS.model, "Q4_0", "turboboa")
    quantization.quantize(str(tiny_llama_dir), QuantConfig(method="rtn", format="q4_0", nsamples=2, seqlen=32),
                          qdir, device="cpu", progress=False)
    export(load_qdir(qdir), "gguf", target)
    return work


def llama_cpp_ppl(target: Path, qdir: Path) -> float:
    """The file's PPL in llama.cpp on the windows the bench scores (the QDIR's tokenizer)."""
    r = run_cli("eval", str(target), "--tokenizer", str(qdir), "--seqlen", str(ARGS.eval_seqlen),
                "--max-windows", str(ARGS.max_windows), "--threads", "1", "-q", "--json")
    assert r.returncode == 0, r.stderr
    return float(json.loads(r.stdout.strip().splitlines()[-1])["ppl"])


def test_a_reused_row_is_checked_only_against_its_own_files(work) -> None:
    ctx = pv.Context.start("cpu")
    target, qdir = bench.file_paths(work, ARGS.model, "Q4_0", "turboboa")
    row = {"preset": "Q4_0", "maker": "turboboa", "ppl": llama_cpp_ppl(target, qdir),
           "file_mib": target.stat().st_size / 2**20}
    # llama.cpp's rows have no QDIR; a file of another size, or of another hash, is not the one the row measured
    assert not bench.backfill_check(ctx, ARGS, {**row, "maker": "llama.cpp+imatrix"}, work)
    assert not bench.backfill_check(ctx, ARGS, {**row, "file_mib": row["file_mib"] + 1 / 2**20}, work)
    assert not bench.backfill_check(ctx, ARGS, {**row, "file_sha256": "0" * 64}, work)
    assert not bench.backfill_check(ctx, ARGS, {**row, "preset": "Q2_K"}, work)  # no files
    assert bench.backfill_check(ctx, ARGS, row, work)
    c = row["file_check"]
    assert c["tensors"] == len(load_qdir(qdir).layers) > 0
    assert c["bit_exact_tensors"] == c["tensors"] and c["max_abs_diff"] == 0.0 and c["failing"] == []
    assert c["gap"] == pytest.approx(row["ppl"] / c["fake_quant_ppl"] - 1)
    tol = c["provenance"]["settings"]["gap_tol"]
    assert tol == GgufArch.kernel_tol and abs(c["gap"]) <= tol and c["passed"]  # the tiny Llama's family's
    assert c["provenance"]["measured"]["eval_windows"] == ARGS.max_windows
    assert row["file_sha256"] == bench.sha256_file(target)  # the file the check read, named by the row
    assert not bench.backfill_check(ctx, ARGS, row, work)  # checked once

    # a file whose PPL in llama.cpp is 2% away from the fake-quant model's fails
    far = {**row, "ppl": 1.02 * c["fake_quant_ppl"]}
    del far["file_check"]
    assert bench.backfill_check(ctx, ARGS, far, work) and not far["file_check"]["passed"]


def test_table_reports_the_check_and_the_shared_importance_matrix(tmp_path) -> None:
    ctx = pv.Context.start("cpu")
    prov = ctx.record({"s": 1}, {"d": 1}, {"wall_seconds": 1.0})
    checked = ctx.record({"gap_tol": 0.01}, {"d": 1}, {"wall_seconds": 1.0})
    check = {"tensors": 198, "bit_exact_tensors": 198, "max_abs_diff": 0.0, "failing": [], "fake_quant_ppl": 38.4,
             "llama_cpp_ppl": 38.5, "gap": 38.5 / 38.4 - 1, "passed": True, "provenance": checked}
    rows = [{"preset": "IQ2_XXS", "maker": "llama.cpp+imatrix", "ppl": 67.2, "kld": 1.19, "file_mib": 560.4,
             "bpw": 2.6, "quantize_seconds": 227.0, "provenance": prov},
            {"preset": "IQ2_XXS", "maker": "turboboa", "ppl": 38.5, "kld": 0.61, "file_mib": 560.4, "bpw": 2.6,
             "quantize_seconds": 3031.0, "provenance": prov, "file_check": check},
            {"preset": "IQ2_XS", "maker": "turboboa", "ppl": 30.0, "kld": 0.5, "file_mib": 597.9, "bpw": 2.8,
             "quantize_seconds": 3000.0, "provenance": prov}]
    doc = {"settings": {"nsamples": 32, "seqlen": 512, "eval_seqlen": 512, "windows": 16, "n_params": 10**9,
                        "model": "m"}, "rows": rows, "imatrix": {"seconds": 386.4, "provenance": prov}}
    bench.write_table(doc, tmp_path / "t.md")
    text = (tmp_path / "t.md").read_text()
    assert "importance matrix, shared by every llama.cpp+imatrix file and not in their time, took 386 s" in text
    assert "| IQ2_XXS | turboboa | 198/198 | 38.500 | 38.400 | +0.26% | yes |" in text
    assert "passes within 1% (`turboboa check`'s tolerance for the model family)" in text
    assert "| IQ2_XS | turboboa | not checked | 30.000 |" in text
    assert "| IQ2_XXS | 67.200 / 560.4 | 38.500 / 560.4 | IQ2_XXS turboboa | yes |" in text


def test_makers_map_to_quantize_options() -> None:
    """A maker's ``+pad256``, ``+hadamard``, ``+act`` and ``+damp<x>`` parts become our quantize options; a maker
    the script cannot make is named with the fix."""
    args = argparse.Namespace(**vars(ARGS), method="turboboa")
    plain = bench.quantize_args(args, "Q2_K", "turboboa")
    assert "--damp" not in plain and "--pad-to" not in plain
    damped = bench.quantize_args(args, "Q2_K", "turboboa+pad256+hadamard+damp0.2")
    assert damped[len(plain):] == ["--pad-to", "256", "--rotate", "hadamard", "--damp", "0.2"]
    placed = bench.quantize_args(args, "IQ2_XS", "turboboa+pad256+act")
    assert placed[len(plain):] == ["--pad-to", "256", "--rotate", "none", "--pad-order", "activation"]
    for maker in ("llama.cpp", "llama.cpp+imatrix", "turboboa", "turboboa+damp0.2", "turboboa+pad256+hadamard",
                  "turboboa+pad256+act"):
        assert bench.check_maker(maker) is None
    assert "+damp<number>" in bench.check_maker("turboboa+dampx")
    assert "unknown part 'hadamard'" in bench.check_maker("turboboa+hadamard")
    assert "unknown part 'act'" in bench.check_maker("turboboa+act")
    assert "unknown maker" in bench.check_maker("gptq")
    assert bench.file_paths(Path("w"), "m", "Q2_K", "turboboa+damp0.2")[0].name == "m-Q2_K-turboboa-damp02.gguf"
