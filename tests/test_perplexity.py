"""The perplexity protocol against a hand computation on a tiny vocabulary."""

from __future__ import annotations

import math

import pytest
import torch

from turboboa.errors import UserError
from turboboa.eval import PerplexityResult, make_windows, perplexity, torch_logits_fn

VOCAB = 5


def fake_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (1, L, VOCAB) that depend on the current token only: logit[v] = (t + 1) * v / 4 at token t."""
    ids = input_ids[0].double()
    v = torch.arange(VOCAB, dtype=torch.float64)
    return ((ids[:, None] + 1) * v[None, :] / 4).float()[None]


def hand_nll(prev: int, target: int) -> float:
    """NLL of ``target`` after ``prev`` under fake_logits, computed with math only."""
    logits = [(prev + 1) * v / 4 for v in range(VOCAB)]
    log_z = math.log(sum(math.exp(x) for x in logits))
    return log_z - logits[target]


def test_make_windows_drops_tail_and_limits_count() -> None:
    tokens = torch.arange(23)
    windows = make_windows(tokens, 5, None)
    assert windows.shape == (4, 5)
    assert windows.dtype == torch.long
    assert windows[0].tolist() == [0, 1, 2, 3, 4]
    assert windows[-1].tolist() == [15, 16, 17, 18, 19]  # 20..22 is an incomplete tail
    assert make_windows(tokens, 5, 2).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert make_windows(tokens, 5, 100).shape == (4, 5)
    assert make_windows(tokens, 23, None).shape == (1, 23)


def test_make_windows_needs_one_window() -> None:
    with pytest.raises(UserError, match="fewer than one window"):
        make_windows(torch.arange(7), 8, None)


def test_perplexity_matches_hand_computation() -> None:
    tokens = torch.tensor([3, 1, 4, 1, 0, 2, 4, 4, 0, 3, 2])  # 11 tokens, seqlen 4 -> 2 windows + tail of 3
    windows = make_windows(tokens, 4, None)
    result = perplexity(fake_logits, windows, backend="fake", progress=False)

    # Each window is scored independently: its first token is context only, never predicted.
    nlls = []
    for window in ([3, 1, 4, 1], [0, 2, 4, 4]):
        for prev, target in zip(window[:-1], window[1:], strict=True):
            nlls.append(hand_nll(prev, target))
    expected_nll = sum(nlls) / len(nlls)

    assert isinstance(result, PerplexityResult)
    assert result.tokens == 6
    assert result.windows == 2
    assert result.seqlen == 4
    assert result.backend == "fake"
    assert result.nll == pytest.approx(expected_nll, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(expected_nll), rel=1e-6)
    assert result.seconds >= 0
    assert result.to_dict()["ppl"] == result.ppl


def test_perplexity_first_k_windows() -> None:
    tokens = torch.tensor([3, 1, 4, 1, 0, 2, 4, 4, 0, 3, 2, 1])
    first = perplexity(fake_logits, make_windows(tokens, 4, 1), backend="fake", progress=False)
    expected = sum(hand_nll(p, t) for p, t in [(3, 1), (1, 4), (4, 1)]) / 3
    assert first.windows == 1 and first.tokens == 3
    assert first.nll == pytest.approx(expected, rel=1e-6)


def test_uniform_logits_give_vocab_size() -> None:
    windows = make_windows(torch.randint(0, 7, (40,), generator=torch.Generator().manual_seed(0)), 10, None)
    result = perplexity(lambda ids: torch.zeros(1, ids.shape[1], 7), windows, backend="uniform", progress=False)
    assert result.ppl == pytest.approx(7.0, rel=1e-6)  # log-softmax runs in float32


def test_bad_logits_shape_is_reported() -> None:
    windows = make_windows(torch.arange(8), 4, None)
    with pytest.raises(ValueError, match="expected"):
        perplexity(lambda ids: torch.zeros(1, 3, 5), windows, backend="broken", progress=False)


def test_torch_logits_fn_runs_a_module() -> None:
    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, input_ids: torch.Tensor):  # noqa: ANN201 - mimics a HF output object
            return type("Out", (), {"logits": self.emb(input_ids)})()

    model = Tiny()
    with torch.no_grad():
        model.emb.weight.copy_(fake_logits(torch.arange(VOCAB)[None])[0])
    windows = make_windows(torch.tensor([3, 1, 4, 1, 0, 2, 4, 4]), 4, None)
    via_module = perplexity(torch_logits_fn(model, torch.device("cpu")), windows, "torch", progress=False)
    direct = perplexity(fake_logits, windows, "fake", progress=False)
    assert via_module.nll == pytest.approx(direct.nll, rel=1e-6)
