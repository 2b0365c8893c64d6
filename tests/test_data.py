"""Dataset resolution, calibration sampling and the token cache."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from turboboa import data
from turboboa.data import calibration_batch, eval_tokens, resolve_rows, resolve_text, tokenize_cached
from turboboa.errors import UserError
from turboboa.models import load_float_model


@pytest.fixture(scope="module")
def tokenizer():
    """The default model's tokenizer (converted once into the user's cache, then read from it)."""
    return load_float_model().tokenizer


def write_jsonl(path: Path, rows: list[object]) -> Path:
    """Write ``rows`` as JSON lines to ``path`` and return it."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_txt_path_is_the_whole_text(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("line one\n\nline two\n", encoding="utf-8")
    text, description = resolve_text(str(path), "eval")
    assert text == "line one\n\nline two\n"
    assert str(path) in description


def test_jsonl_rows_are_joined_with_blank_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, {"text": ""}, {"text": " b \n", "id": 3}])
    text, description = resolve_text(str(path), "calib")
    assert text == "a\n\n\n\n b \n"
    assert "3 rows" in description


def test_jsonl_without_text_field_is_a_user_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(UserError, match=r'rows\.jsonl:2 has no string "text" field'):
        resolve_text(str(path), "calib")


def test_missing_path_and_unknown_name_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dataset file not found"):
        resolve_text(str(tmp_path / "nope.jsonl"), "eval")
    with pytest.raises(UserError, match="unknown dataset 'wikitext3'"):
        resolve_text("wikitext3", "eval")


def test_wikitext2_resolves_to_the_shared_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TURBOBOA_DATASETS", raising=False)
    calib, calib_desc = resolve_rows("wikitext2", "calib")
    test, test_desc = resolve_rows("wikitext2", "eval")
    assert len(calib) == 3760 and "wikitext-2-v1.validation.jsonl" in calib_desc
    assert len(test) == 4358 and "wikitext-2-raw-v1.test.jsonl" in test_desc
    assert test[1] == " = Robert Boulter = \n"
    assert "<unk>" in "".join(calib) and "<unk>" not in "".join(test)
    text, _ = resolve_text("wikitext2", "eval")
    assert text == "\n\n".join(test)


def test_turboboa_datasets_overrides_the_shared_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    write_jsonl(folder / "wikitext-2-v1.validation.jsonl", [{"text": "first"}, {"text": "second"}])
    monkeypatch.setenv("TURBOBOA_DATASETS", str(tmp_path))
    text, description = resolve_text("wikitext2", "calib")
    assert text == "first\n\nsecond"
    assert str(tmp_path) in description
    # The eval split is not in the override folder, so it falls back to the shared copy.
    rows, _ = resolve_rows("wikitext2", "eval")
    assert len(rows) == 4358


def test_wikitext2_nowhere_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOBOA_DATASETS", str(tmp_path))
    monkeypatch.setattr(data, "SHARED_DATASETS", tmp_path / "absent")
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(UserError, match="set TURBOBOA_DATASETS"):
        resolve_text("wikitext2", "eval")


def test_calibration_batch_is_deterministic_per_seed(tokenizer) -> None:
    a = calibration_batch(tokenizer, "wikitext2", nsamples=4, seqlen=64, seed=0)
    b = calibration_batch(tokenizer, "wikitext2", nsamples=4, seqlen=64, seed=0)
    c = calibration_batch(tokenizer, "wikitext2", nsamples=4, seqlen=64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Every sample is a contiguous window of the tokenized calibration text.
    ids = tokenize_cached(tokenizer, resolve_text("wikitext2", "calib")[0])
    for row in a:
        starts = (ids[: ids.numel() - 63] == row[0]).nonzero()[:, 0]
        assert any(torch.equal(ids[s : s + 64], row) for s in starts.tolist())


def test_calibration_text_too_short(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOBOA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "short.txt"
    path.write_text("Only a handful of words here.", encoding="utf-8")
    with pytest.raises(UserError, match="fewer than seqlen"):
        calibration_batch(tokenizer, str(path), nsamples=2, seqlen=512, seed=0)


def test_eval_tokens_match_tokenizer_and_are_cached(tokenizer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOBOA_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": " = Heading = \n"}, {"text": " Some text , here .\n"}])
    first = eval_tokens(tokenizer, str(path))
    expected = tokenizer(" = Heading = \n\n\n Some text , here .\n", return_tensors="pt").input_ids[0]
    assert first.dtype == torch.long and torch.equal(first, expected)
    cached = list((tmp_path / "cache" / "tokens").glob("*.pt"))
    assert len(cached) == 1
    assert torch.equal(eval_tokens(tokenizer, str(path)), first)
