"""Architecture adapters: the adapter's own block computation must match the transformers layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from turboboa.arch import ArchAdapter, AttentionShape, get_adapter, supported_model_types
from turboboa.arch.llama import LlamaAdapter, apply_rope, causal_mask
from turboboa.errors import UserError

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.3,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def tiny_model(family: str, seed: int = 0, **overrides: object) -> nn.Module:
    """A tiny random eager-attention CausalLM with non-trivial norm weights."""
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**TINY, **extra, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
    return model


def hf_causal_mask(batch: int, seqlen: int) -> torch.Tensor:
    """Additive (B, 1, L, L) mask for the HF eager layer: 0 where allowed, finfo.min above the diagonal."""
    future = torch.triu(torch.ones(seqlen, seqlen, dtype=torch.bool), diagonal=1)
    mask = torch.zeros(seqlen, seqlen).masked_fill(future, torch.finfo(torch.float32).min)
    return mask.expand(batch, 1, seqlen, seqlen)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_forward_matches_hf_layer(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    batch, seqlen = 2, 7
    hidden = torch.randn(batch, seqlen, 32)
    cos, sin = adapter.rotary_cos_sin(model, seqlen, hidden.device)
    with torch.no_grad():
        for block in adapter.blocks(model):
            ours = adapter.block_forward(block, hidden, cos, sin)
            ref = block(
                hidden,
                attention_mask=hf_causal_mask(batch, seqlen),
                position_ids=torch.arange(seqlen).unsqueeze(0),
                position_embeddings=(cos[None], sin[None]),
            )
            ref = ref[0] if isinstance(ref, tuple) else ref
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("llama", {}),
        ("qwen2", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
        ("mistral", {"sliding_window": 4}),
    ],
)
def test_full_model_logits_match_hf(family: str, overrides: dict) -> None:
    """embed -> block_forward per block -> final norm -> lm_head equals HF logits (HF builds its own masks)."""
    model = tiny_model(family, seed=1, **overrides)
    adapter = get_adapter(model)
    input_ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        hidden = adapter.embed(model, input_ids)
        cos, sin = adapter.rotary_cos_sin(model, input_ids.shape[1], hidden.device)
        for block in adapter.blocks(model):
            hidden = adapter.block_forward(block, hidden, cos, sin)
        ours = adapter.lm_head(model)(adapter.final_norm(model)(hidden))
        ref = model(input_ids).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sliding_window_blocks() -> None:
    qwen = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert [LlamaAdapter.sliding_window(b) for b in qwen.model.layers] == [None, 4]
    mistral = tiny_model("mistral", sliding_window=4)
    assert LlamaAdapter.sliding_window(mistral.model.layers[0]) == 4
    assert LlamaAdapter.sliding_window(tiny_model("llama").model.layers[0]) is None
    masked = causal_mask(6, torch.device("cpu"), sliding_window=2)
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(masked, (j > i) | (i - j >= 2))


def test_llama3_rope_scaling_matches_hf_module() -> None:
    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = tiny_model("llama", rope_parameters=rope, num_attention_heads=2, num_key_value_heads=1)
    adapter = get_adapter(model)
    seqlen = 100
    cos, sin = adapter.rotary_cos_sin(model, seqlen, "cpu")
    assert cos.shape == sin.shape == (seqlen, 16) and cos.dtype == torch.float32
    rotary = model.model.rotary_emb
    ref_cos, ref_sin = rotary(torch.zeros(3, seqlen, 16), torch.arange(seqlen).expand(3, seqlen))
    torch.testing.assert_close(cos, ref_cos[1])
    torch.testing.assert_close(sin, ref_sin[1])
    # Independently from the module's frequencies: cos = cos(t * [f, f]) * attention_scaling.
    freqs = torch.arange(seqlen, dtype=torch.float32)[:, None] * rotary.inv_freq[None]
    angles = torch.cat((freqs, freqs), dim=-1)
    torch.testing.assert_close(cos, angles.cos() * rotary.attention_scaling)
    torch.testing.assert_close(sin, angles.sin() * rotary.attention_scaling)
    plain = tiny_model("llama", num_attention_heads=2, num_key_value_heads=1, rope_parameters={
        "rope_type": "default", "rope_theta": 500000.0})
    plain_cos, _ = adapter.rotary_cos_sin(plain, seqlen, "cpu")
    assert not torch.allclose(cos, plain_cos), "llama3 scaling must change the low frequencies"
    half, _ = adapter.rotary_cos_sin(model, seqlen, "cpu", dtype=torch.float16)
    assert half.dtype == torch.float16


def test_rope_matches_hf_apply_rotary() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model("llama")
    cos, sin = get_adapter(model).rotary_cos_sin(model, 5, "cpu")
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rope(q, cos, sin), ref_q)
    torch.testing.assert_close(apply_rope(k, cos, sin), ref_k)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_records_hooks_and_names(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    shape = adapter.attention_shape(model)
    assert shape == AttentionShape(n_heads=4, n_kv_heads=2, head_dim=8, hidden_size=32)
    assert shape.group_size == 2
    assert shape.kv_head_of(torch.arange(4)).tolist() == [0, 0, 1, 1]
    block = adapter.blocks(model)[0]
    for name in adapter.linear_names():
        assert isinstance(block.get_submodule(name), nn.Linear)
    assert adapter.linear_names()[:3] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert len(adapter.LINEAR_GROUPS) == 4

    seen: list[str] = []
    handles = [block.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.append(n))
               for n in adapter.linear_names()]
    rec: dict[str, torch.Tensor] = {}
    batch, seqlen = 2, 6
    cos, sin = adapter.rotary_cos_sin(model, 10, "cpu")  # longer tables are sliced to L
    with torch.no_grad():
        out = adapter.block_forward(block, torch.randn(batch, seqlen, 32), cos, sin, record=rec.__setitem__)
    for handle in handles:
        handle.remove()
    assert sorted(seen) == sorted(adapter.linear_names())
    assert out.shape == (batch, seqlen, 32)
    assert rec["attn_input"].shape == (batch, seqlen, 32)
    assert rec["q_rope"].shape == (batch, 4, seqlen, 8)
    assert rec["k_rope"].shape == (batch, 2, seqlen, 8)
    probs = rec["attn_probs"]
    assert probs.shape == (batch, 4, seqlen, seqlen) and probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(batch, 4, seqlen))
    assert torch.all(probs.triu(diagonal=1) == 0)


def test_bfloat16_block_keeps_dtype() -> None:
    model = tiny_model("llama").to(torch.bfloat16)
    adapter = get_adapter(model)
    cos, sin = adapter.rotary_cos_sin(model, 5, "cpu")
    rec: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = adapter.block_forward(adapter.blocks(model)[0], torch.randn(1, 5, 32, dtype=torch.bfloat16),
                                    cos, sin, record=rec.__setitem__)
    assert out.dtype == torch.bfloat16 and rec["attn_probs"].dtype == torch.float32


def test_short_rope_tables_raise() -> None:
    model = tiny_model("llama")
    adapter = get_adapter(model)
    cos, sin = adapter.rotary_cos_sin(model, 3, "cpu")
    with pytest.raises(UserError, match="rotary_cos_sin"):
        adapter.block_forward(adapter.blocks(model)[0], torch.randn(1, 5, 32), cos, sin)


def test_registry_and_unsupported_model() -> None:
    assert {"llama", "mistral", "qwen2"} <= set(supported_model_types())
    assert isinstance(get_adapter(tiny_model("qwen2")), ArchAdapter)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(UserError) as err:
        get_adapter(gpt2)
    message = str(err.value)
    assert "GPT2LMHeadModel" in message and "llama" in message and "qwen2" in message
    with pytest.raises(UserError, match="Linear"):
        get_adapter(nn.Linear(2, 2))


def test_new_architecture_registers_itself() -> None:
    from turboboa.arch import base

    class ToyAdapter(LlamaAdapter):
        MODEL_TYPES = ("toy-arch-for-test",)

    try:
        assert "toy-arch-for-test" in supported_model_types()
        model = nn.Module()
        model.config = type("Cfg", (), {"model_type": "toy-arch-for-test"})()
        assert isinstance(get_adapter(model), ToyAdapter)
    finally:
        base._REGISTRY.pop("toy-arch-for-test")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_module_has_a_role_and_the_families_agree(family: str) -> None:
    """The adapter's layout names every module of the state dict by role; the lookup across the registered
    families (a QDIR's layer names) finds the same block and role, except for a norm that another family names
    alike with another role (Llama's MLP norm ``post_attention_layernorm`` is Gemma 3's attention post-norm):
    its block alone."""
    from turboboa.arch import LINEAR_ROLES, locate

    model = tiny_model(family)
    adapter = get_adapter(model)
    layout = adapter.LAYOUT
    for name in model.state_dict():
        module = name.rpartition(".")[0]
        assert layout.locate(module)[1] is not None, module
        shared = module.endswith("post_attention_layernorm")
        assert locate(module) == ((layout.locate(module)[0], None) if shared else layout.locate(module))
    assert [adapter.role_of(n) for n in adapter.linear_names()] == list(LINEAR_ROLES)
    assert layout.linear(1, "down") == "model.layers.1.mlp.down_proj"
    assert [(norm, readers) for norm, readers in layout.norm_readers()] == [
        ("attention_norm", ("q", "k", "v")), ("mlp_norm", ("gate", "up"))]
