"""Several ranks through torch.distributed (torchrun, gloo on the CPU): the QDIR of 2 ranks is byte-identical to
one process's; the shards and their ordered fold; errors from rank 0 only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from turboboa.distributed import World
from turboboa.hessians.covariance import CovarianceAccumulator, RunningMean
from turboboa.output_files import KILL_ENV

from .conftest import ROOT, assert_one_line_error, make_tiny_llama, run_main

# 64 windows of 256 tokens on 16 heads: two shards of 32 windows (turboboa.models.chunks.chunk_size: 32 x 16 x
# 256^2 attention probabilities fill MAX_ATTENTION_ELEMENTS), one per rank
CALIB = ("--format", "q4_0", "--rotate", "none", "--nsamples", "64", "--seqlen", "256", "-q")
HEADS = 16
METHODS = {"gptq": ("--method", "gptq"), "turboboa": ("--method", "turboboa", "--rows", "4")}
# quant_config.json fields that say how the run went, not what it made
RUN_FIELDS = ("timings", "device", "ranks")


def test_shards_are_contiguous_and_cover_the_set():
    for size in (1, 2, 3, 5):
        spans = [World(r, size).shard_span(7) for r in range(size)]
        assert [i for s in spans for i in s] == list(range(7))
        rows = [World(r, size).sequence_span(13, 2) for r in range(size)]
        assert [i for s in rows for i in range(13)[s]] == list(range(13))


def test_shard_fold_is_the_ordered_sum():
    """Folding one-shard accumulators in shard order gives the same bytes as updating one accumulator in that
    order, and the mean follows the running-mean recurrence mu <- mu n / (n + m) + S / (n + m)."""
    torch.manual_seed(0)
    xs = [torch.randn(5, 3, 8) for _ in range(4)]
    direct = CovarianceAccumulator()
    for x in xs:
        direct.add(x)
    folded = CovarianceAccumulator()
    for x in xs:
        shard = CovarianceAccumulator()
        shard.add(x)
        folded.merge(shard)
    assert torch.equal(direct.H, folded.H) and direct.n == folded.n == 60
    mu, n = None, 0
    for x in xs:
        t = x.reshape(-1, 8).T @ x.reshape(-1, 8)
        mu = t / 15 if mu is None else mu.mul_(n / (n + 15)).add_(t, alpha=1.0 / (n + 15))
        n += 15
    assert torch.equal(direct.H, 2.0 * mu)
    two = CovarianceAccumulator()
    two.add(xs[0])
    two.add(xs[1])
    with pytest.raises(ValueError, match="one batch"):  # a fold of several batches cannot be replayed
        folded.merge(two)
    mean = RunningMean()
    mean.update(torch.ones(2), 0)
    assert mean.value is None and mean.n == 0


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", KILL_ENV):
        env.pop(key, None)
    return env


def _quantize(ranks: int, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """``turboboa quantize`` in one process, or under ``torchrun --nproc-per-node ranks`` (this checkout's cli);
    ``kill_at``: every rank SIGKILLs itself there (:func:`turboboa.output_files.kill_point`)."""
    command = [sys.executable, "-m", "cli", "quantize", *args]
    if ranks > 1:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        command = [torchrun, "--standalone", "--nproc-per-node", str(ranks), "--no-python", *command]
    env = _env()
    if kill_at is not None:
        env[KILL_ENV] = kill_at
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _config(qdir: Path) -> dict:
    doc = json.loads((qdir / "quant_config.json").read_text())
    return {k: v for k, v in doc.items() if k not in RUN_FIELDS}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("dist") / "tiny", default_tokenizer, heads=HEADS)


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny):
    """The QDIR of one process per method, made on first use."""
    made: dict[str, Path] = {}

    def make(method: str) -> Path:
        if method not in made:
            out = tmp_path_factory.mktemp(f"one-{method}") / "Q"
            proc = _quantize(1, str(tiny), *METHODS[method], *CALIB, "-o", str(out))
            assert proc.returncode == 0, proc.stderr
            made[method] = out
        return made[method]

    return make


def assert_same_qdir(one: Path, two: Path) -> None:
    for name in ("quantized.safetensors", "float.safetensors"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert _config(one) == _config(two)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_ranks_write_the_qdir_of_one(tmp_path, tiny, single, method):
    """GPTQ and TurboBoA (attention statistics, F2 cross terms): 2 gloo ranks, each with half the calibration
    shards and half of each stage's layers, write the same bytes as one process."""
    two = tmp_path / "two"
    pair = _quantize(2, str(tiny), *METHODS[method], *CALIB, "-o", str(two))
    assert pair.returncode == 0, pair.stderr
    assert_same_qdir(single(method), two)
    assert json.loads((two / "quant_config.json").read_text())["ranks"] == 2
    assert pair.stderr.count("quantized 15 layers") == 1  # only rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]  # no work folder left


def test_two_ranks_resume_a_killed_run(tmp_path, tiny, single):
    """Both ranks killed while solving block 1: rank 0 had committed block 0 (the gathered streams); the resumed
    2-rank run continues from block 1 and still writes one process's bytes."""
    out = tmp_path / "Q"
    args = (str(tiny), *METHODS["turboboa"], *CALIB, "-o", str(out))
    assert _quantize(2, *args, kill_at="solve:1").returncode != 0
    assert not out.exists() and (tmp_path / "Q.partial" / "state.json").is_file()
    resumed = _quantize(2, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "quant_config.json").read_text())["timings"]["resumed_from_block"] == 1
    assert_same_qdir(single("turboboa"), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Q"]


def test_bad_input_is_one_line_from_rank_zero(tmp_path, tiny):
    """More ranks than shards is refused on every rank with exit code 2, and said once (by rank 0); torchrun
    then fails itself (exit 1) and names the first rank's exit code. One process takes the same input."""
    args = (str(tiny), "--method", "gptq", "--format", "q4_0", "--nsamples", "2", "--seqlen", "32", "-q",
            "-o", str(tmp_path / "Q"))
    proc = _quantize(2, *args)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr
    assert "2 ranks" in errors[0] and "shards" in errors[0] and "exitcode  : 2" in proc.stderr, proc.stderr
    assert str(ROOT / "turboboa") not in proc.stderr and "cli.py" not in proc.stderr  # (torchrun's own aside)
    assert not (tmp_path / "Q").exists()
    single = _quantize(1, *args)
    assert single.returncode == 0, single.stderr


def test_run_refuses_ranks(tmp_path, tiny, monkeypatch, capsys):
    """`turboboa run` (quantize, export, check) stays one process: under torchrun it is refused in one line."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    proc = run_main("run", str(tiny), "-o", str(tmp_path / "out"), capsys=capsys)
    assert_one_line_error(proc, "torchrun", "turboboa quantize")
    assert not (tmp_path / "out").exists()


def test_two_ranks_write_the_qdir_of_one_for_gemma3(tmp_path, default_tokenizer):
    """TurboBoA on a tiny Gemma 3 (16 heads): the norm-weighted covariances of q, k, o and down, and the
    layers' own RoPE tables, fold across 2 ranks into the bytes of one process."""
    from .test_gemma3 import make_tiny_gemma3_dir

    folder = make_tiny_gemma3_dir(tmp_path / "gemma", default_tokenizer, heads=HEADS, kv_heads=4, head_dim=16)
    one, two = tmp_path / "one", tmp_path / "two"
    calib = (*CALIB[:4], "--nsamples", "16", "--seqlen", "512", "-q")  # two shards of 8 windows of 512
    proc = _quantize(1, str(folder), *METHODS["turboboa"], *calib, "-o", str(one))
    assert proc.returncode == 0, proc.stderr
    pair = _quantize(2, str(folder), *METHODS["turboboa"], *calib, "-o", str(two))
    assert pair.returncode == 0, pair.stderr
    assert_same_qdir(one, two)
    assert json.loads((two / "quant_config.json").read_text())["ranks"] == 2
