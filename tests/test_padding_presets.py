"""``--pad-to`` keeps the model's function; ``--preset`` picks ggml types per tensor as llama-quantize does."""

from __future__ import annotations

import pytest
import torch

from turboboa.config import QuantConfig
from turboboa.formats.presets import ModelShape, preset_format, use_more_bits
from turboboa.models.padding import (
    head_positions,
    pad_model,
    padded_heads,
    residual_peaks,
    residual_placement,
)

from .conftest import make_tiny_llama


@pytest.mark.parametrize("model_type,order", [("llama", "natural"), ("qwen2", "natural"), ("llama", "activation")])
def test_padding_preserves_the_function_and_survives_a_reload(tmp_path, default_tokenizer, model_type,
                                                               order) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_tiny_llama(tmp_path / "m", default_tokenizer, hidden=96, heads=6, kv_heads=2, intermediate=200,
                             model_type=model_type)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ids = torch.randint(0, 1000, (2, 48), generator=gen)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        index = residual_placement(residual_peaks(model, ids), 128, 64) if order == "activation" else None
        report = pad_model(model, 64, hidden_index=index)
        got = model(input_ids=ids).logits
    if index is not None:  # zeros sit beside the 32 largest channels, in block 0
        emb = model.get_input_embeddings().weight
        assert (emb[:, 32:64] == 0).all() and (emb[:, index] != 0).any(0).all()
        assert report.pop("hidden_index") == index.tolist()
    assert report == {"hidden": 96, "hidden_padded": 128, "heads": 6, "heads_padded": 8, "intermediate": 200,
                      "intermediate_padded": 256}
    assert all(m.in_features % 64 == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    model.save_pretrained(tmp_path / "padded")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "padded").eval()
    with torch.no_grad():
        assert (again(input_ids=ids).logits - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_residual_placement_puts_the_largest_channels_beside_the_zeros() -> None:
    peaks = torch.tensor([5.0, 1.0, 9.0, 2.0, 7.0, 3.0])
    index = residual_placement(peaks, padded=8, multiple=4)  # 2 zeros: block 0 = 2 largest + 2 zeros
    assert index.tolist() == [4, 5, 0, 6, 1, 7]  # 9 -> 0, 7 -> 1, the others in order after the zeros at 2, 3
    # zeros filling a whole block: they come first, the channels follow in their own order
    assert residual_placement(peaks, padded=10, multiple=4).tolist() == [4, 5, 6, 7, 8, 9]


def test_padded_heads_keep_their_kv_head() -> None:
    assert padded_heads(9, 3, 64, 256) == 12  # SmolLM2-135M: 9 heads of 64 -> 12 (768 columns)
    positions = head_positions(9, 3, 12)
    assert positions == [0, 1, 2, 4, 5, 6, 8, 9, 10]
    assert [p // 4 for p in positions] == [h // 3 for h in range(9)]  # KV head of every original head kept


@pytest.mark.slow
def test_padded_default_model_has_the_same_perplexity() -> None:
    from turboboa.data import eval_tokens
    from turboboa.eval.perplexity import make_windows, perplexity, torch_logits_fn
    from turboboa.models import load_float_model

    loaded = load_float_model("smollm2-135m")
    windows = make_windows(eval_tokens(loaded.tokenizer, "wikitext2"), 256, 2)
    ref = perplexity(torch_logits_fn(loaded.model), windows, "torch", progress=False)
    pad_model(loaded.model, 256)
    got = perplexity(torch_logits_fn(loaded.model), windows, "torch", progress=False)
    print(f"PPL {ref.ppl:.6f} -> padded {got.ppl:.6f}")
    assert abs(got.ppl / ref.ppl - 1) < 1e-5


def test_presets_follow_llama_quantize() -> None:
    shape = ModelShape(n_layers=30, n_gqa=3, tied=True)
    layer = "model.layers.{}.{}"
    assert preset_format("Q2_K", layer.format(5, "self_attn.q_proj"), shape) == "q2_k"
    assert preset_format("Q2_K", layer.format(5, "self_attn.v_proj"), shape) == "q3_k"  # n_gqa 3 < 4
    assert preset_format("Q2_K", layer.format(5, "self_attn.v_proj"), ModelShape(30, 4, True)) == "q4_k"
    assert preset_format("Q2_K", layer.format(5, "mlp.down_proj"), shape) == "q3_k"
    assert preset_format("Q2_K", layer.format(5, "self_attn.o_proj"), shape) == "q3_k"
    assert preset_format("Q3_K_S", layer.format(5, "mlp.down_proj"), shape) == "q3_k"
    assert preset_format("Q3_K_M", layer.format(1, "self_attn.v_proj"), shape) == "q5_k"
    assert preset_format("Q3_K_M", layer.format(2, "self_attn.v_proj"), shape) == "q4_k"
    assert preset_format("Q3_K_M", layer.format(0, "mlp.down_proj"), shape) == "q5_k"  # 0 < 30 // 16
    assert preset_format("Q3_K_M", layer.format(9, "mlp.down_proj"), shape) == "q4_k"
    more = [i for i in range(30) if use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    for i in range(30):
        want = "q6_k" if i in more else "q4_k"
        assert preset_format("Q4_K_M", layer.format(i, "mlp.down_proj"), shape) == want
        assert preset_format("Q4_K_M", layer.format(i, "self_attn.v_proj"), shape) == want
    assert preset_format("Q4_K_M", "model.embed_tokens", shape) == "q6_k"  # tied: the output's type
    assert preset_format("Q4_K_M", "model.embed_tokens", ModelShape(30, 3, False)) == "q4_k"
    # through the config: 576-wide layers fall back as llama.cpp does, 1536-wide down_proj keeps its k-quant
    cfg = QuantConfig(preset="q4_k_m")
    assert cfg.layer_format(layer.format(3, "self_attn.q_proj"), 576, shape) == "q5_0"
    assert cfg.layer_format(layer.format(5, "mlp.down_proj"), 1536, shape) == "q6_k"
    assert cfg.embedding_format(576, shape) == "q8_0"
    assert cfg.embedding_format(768, shape) == "q6_k"
    assert QuantConfig(embed_format="q4_0").embedding_format(576, shape) == "q4_0"
    assert QuantConfig(embed_format="float").embedding_format(576, shape) == ""
    # Q4_0 (the same types as --format q4_0): q4_0 layers, the output type for the head or a tied embedding
    assert preset_format("Q4_0", layer.format(5, "self_attn.v_proj"), shape) == "q4_0"
    assert preset_format("Q4_0", "lm_head", shape) == "q6_k"
    assert preset_format("Q4_0", "model.embed_tokens", ModelShape(30, 3, False)) == "q4_0"


def test_default_embedding_and_head_types_follow_the_file_type() -> None:
    """Without --embed-format, the tables take llama-quantize's types for the file the layers make: the output
    type (q6_k, q8_0 for a q8_0 file) for the head and a tied embedding, the layers' type for an untied
    embedding, the width fallback q6_k -> q8_0 where 256 does not divide the width; q6_k for a uniform grid;
    float only where no block fits the width."""
    tied, untied = ModelShape(30, 3, True), ModelShape(30, 3, False)
    q4_0 = QuantConfig(format="q4_0")
    assert q4_0.embedding_format(576, tied) == "q8_0"  # what llama-quantize's Q4_0 of SmolLM2 stores
    assert q4_0.embedding_format(768, tied) == "q6_k"
    assert q4_0.embedding_format(576, untied) == "q4_0"
    assert q4_0.embedding_format(576, untied, "lm_head") == "q8_0"
    assert QuantConfig(format="q8_0").embedding_format(768, tied) == "q8_0"
    assert QuantConfig(format="q4_k").embedding_format(768, untied) == "q4_k"
    assert QuantConfig(format="q4_k").embedding_format(576, untied) == "q5_0"  # q4_k's width fallback
    assert QuantConfig().embedding_format(576, tied) == "q8_0"  # uniform grid
    assert QuantConfig().embedding_format(768, untied) == "q6_k"
    assert QuantConfig().embedding_format(48, tied) == ""  # no 32-column block fits 48
