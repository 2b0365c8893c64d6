"""Loading the default model from its GGUF, the conversion cache, and user errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from turboboa.errors import UserError
from turboboa.models import DEFAULT_MODEL, alias_gguf_path, load_float_model, model_id_for_config


@pytest.fixture(scope="module")
def loaded():
    """The default model, from the user's cache (converted there on the first run)."""
    return load_float_model()


def test_default_alias_loads_smollm2(loaded) -> None:
    model = loaded.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config.use_cache is False
    assert not model.training
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    # Tied embeddings survive the GGUF -> safetensors round trip.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert loaded.cache_dir is not None and (loaded.cache_dir / "config.json").is_file()
    assert DEFAULT_MODEL in loaded.source


def test_default_model_predicts_text(loaded) -> None:
    tok = loaded.tokenizer
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = loaded.model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], loaded.model.config.vocab_size)
    assert tok.decode(logits[0, -1].argmax()).strip() == "Berlin"


def test_second_load_reads_the_cache(loaded) -> None:
    start = time.perf_counter()
    again = load_float_model(DEFAULT_MODEL)
    assert time.perf_counter() - start < 60
    assert "cached" in again.source and again.cache_dir == loaded.cache_dir
    assert torch.equal(again.model.model.embed_tokens.weight, loaded.model.model.embed_tokens.weight)


def test_gguf_conversion_into_a_fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOBOA_CACHE", str(tmp_path / "cache"))
    gguf = alias_gguf_path(DEFAULT_MODEL)
    first = load_float_model(str(gguf), dtype=torch.bfloat16)
    assert "converted" in first.source and first.model.dtype == torch.bfloat16
    assert first.cache_dir is not None and first.cache_dir.parent == tmp_path / "cache" / "models"
    assert [p.name for p in first.cache_dir.parent.iterdir()] == [first.cache_dir.name]  # no temp folders left
    assert list(first.cache_dir.glob("*.safetensors"))
    second = load_float_model(str(gguf), dtype=torch.bfloat16)
    assert "cached" in second.source and second.cache_dir == first.cache_dir


def test_local_folder_loads(loaded) -> None:
    folder = load_float_model(str(loaded.cache_dir))
    assert folder.cache_dir is None and folder.model.config.use_cache is False
    assert torch.equal(folder.model.lm_head.weight, loaded.model.lm_head.weight)


def test_missing_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model path not found"):
        load_float_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(UserError, match="model path not found"):
        load_float_model("./no/such/folder")
    with pytest.raises(UserError, match="has no config.json"):
        load_float_model(str(tmp_path))


def test_hub_id_offline_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(UserError, match="hub is unreachable"):
        load_float_model("someone/some-model-that-is-not-here")
    assert time.perf_counter() - start < 10


def test_hub_id_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(UserError, match="no connection to the hub"):
        load_float_model("someone/some-model-that-is-not-here")
    assert time.perf_counter() - start < 10


def test_model_id_for_config(tmp_path: Path) -> None:
    assert model_id_for_config(DEFAULT_MODEL) == DEFAULT_MODEL
    assert model_id_for_config("owner/name") == "owner/name"
    assert model_id_for_config(str(tmp_path)) == str(tmp_path.resolve())


@pytest.mark.slow
def test_default_model_wikitext2_perplexity_is_sane() -> None:
    """The evaluation protocol on the real model: 2 windows of 512 WikiText-2 test tokens score a PPL in the
    range of a 135M-parameter model (about 30); `make accuracy` holds the measured values."""
    from turboboa.eval.evaluate import evaluate as evaluate_torch

    assert 20 < evaluate_torch("smollm2-135m", seqlen=512, max_windows=2, device="cpu", progress=False).ppl < 45
