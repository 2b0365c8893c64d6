"""Attention-aware Hessians: closed forms against their explicit definitions, and GQA consistency."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from turboboa.arch import get_adapter
from turboboa.arch.llama import apply_rope
from turboboa.errors import UserError
from turboboa.hessians import AttentionStatistics, CovarianceAccumulator, rope_average


def tiny_llama(n_kv_heads: int = 2, seed: int = 0, **overrides: object) -> nn.Module:
    """Tiny random eager Llama with q/k/v bias: D=32, H=4, d=8."""
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=128,
        initializer_range=0.3,
        attention_bias=True,
        **overrides,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def rope_matrices(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Explicit R_t = diag(c_t) + diag(s_t) J, (L, d, d), with J = [[0, -I], [I, 0]]."""
    d = cos.shape[-1]
    eye = torch.eye(d // 2)
    zero = torch.zeros(d // 2, d // 2)
    j = torch.cat((torch.cat((zero, -eye), 1), torch.cat((eye, zero), 1)), 0)
    return torch.diag_embed(cos) + torch.diag_embed(sin) @ j


def explicit_rope_average(m: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(1/L) sum_t R_t^T M R_t by an explicit sum over positions."""
    rot = rope_matrices(cos, sin).double()
    m = m.double()
    total = torch.zeros_like(m)
    for t in range(rot.shape[0]):
        total = total + rot[t].T @ m @ rot[t]
    return total / rot.shape[0]


def run_block(model: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    adapter = get_adapter(model)
    cos, sin = adapter.rotary_cos_sin(model, hidden.shape[1], hidden.device)
    rec: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        out = adapter.block_forward(adapter.blocks(model)[0], hidden, cos, sin, record=rec.__setitem__)
    return out, rec


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16}])
def test_rope_average_equals_explicit_sum(rope: dict | None) -> None:
    model = tiny_llama(**({"rope_parameters": rope} if rope else {}))
    cos, sin = get_adapter(model).rotary_cos_sin(model, 37, "cpu")
    # The explicit R_t is the HF rotation: R_t q_t == q_t * c_t + rotate_half(q_t) * s_t.
    q = torch.randn(37, 8)
    torch.testing.assert_close(torch.einsum("tij,tj->ti", rope_matrices(cos, sin), q), apply_rope(q, cos, sin))
    m = torch.randn(3, 8, 8)
    torch.testing.assert_close(rope_average(m, cos, sin).double(), explicit_rope_average(m, cos, sin),
                               rtol=1e-5, atol=1e-5)
    spd = m @ m.transpose(-1, -2)
    avg = rope_average(spd, cos, sin)
    torch.testing.assert_close(avg, avg.transpose(-1, -2))
    assert torch.linalg.eigvalsh(avg.double()).min() > -1e-6


def test_rope_average_bad_shapes() -> None:
    with pytest.raises(UserError, match="rope_average"):
        rope_average(torch.eye(8), torch.ones(5, 6), torch.ones(5, 6))


def stats_for(model: nn.Module, hidden_q: torch.Tensor, hidden_fp: torch.Tensor | None = None,
              chunk_bytes: int = 1 << 28) -> tuple[AttentionStatistics, torch.Tensor, dict, dict | None]:
    stats = AttentionStatistics(max_chunk_bytes=chunk_bytes)
    out, rec = run_block(model, hidden_q)
    rec_fp = run_block(model, hidden_fp)[1] if hidden_fp is not None else None
    stats.add(rec, rec_fp)
    return stats, out, rec, rec_fp


def test_hessians_equal_definitions() -> None:
    model = tiny_llama()
    torch.manual_seed(1)
    hidden_fp = torch.randn(2, 6, 32)
    hidden_q = hidden_fp + 0.1 * torch.randn_like(hidden_fp)
    # chunk budget 1 byte forces one KV group per chunk
    stats, _, rec, rec_fp = stats_for(model, hidden_q, hidden_fp, chunk_bytes=1)
    x, a, q, k = (rec[key].double() for key in ("attn_input", "attn_probs", "q_rope", "k_rope"))
    x_fp, a_fp = rec_fp["attn_input"].double(), rec_fp["attn_probs"].double()
    batch, n_heads, seqlen, _ = a.shape
    n_tok, group = batch * seqlen, 2

    col = torch.zeros(n_heads, 32, 32, dtype=torch.float64)
    cross = torch.zeros_like(col)
    for h in range(n_heads):
        for b in range(batch):
            y = a[b, h] @ x[b]
            y_fp = a_fp[b, h] @ x_fp[b]
            col[h] += 2 * y.T @ y / n_tok
            cross[h] += 2 * (y_fp - y).T @ y / n_tok
    torch.testing.assert_close(stats.col_hessian_v().double(), col.view(2, group, 32, 32).mean(1),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.cross_v().double(), cross.view(2, group, 32, 32).mean(1),
                               rtol=1e-5, atol=1e-6)

    cos, sin = get_adapter(model).rotary_cos_sin(model, seqlen, "cpu")
    mk = torch.einsum("bgti,bgtj->gij", k, k) / n_tok
    mq = torch.einsum("bhti,bhtj->hij", q, q) / n_tok
    ref_q = torch.stack([explicit_rope_average(mk[h // group], cos, sin) for h in range(n_heads)])
    ref_k = torch.stack([explicit_rope_average(mq[g * group:(g + 1) * group].mean(0), cos, sin)
                         for g in range(2)])
    torch.testing.assert_close(stats.row_hessian_q(cos, sin).double(), ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.row_hessian_k(cos, sin).double(), ref_k, rtol=1e-5, atol=1e-5)

    xs, xs_fp = x.reshape(-1, 32), x_fp.reshape(-1, 32)
    torch.testing.assert_close(stats.qkv.H.double(), 2 * xs.T @ xs / n_tok, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.qkv.C.double(), 2 * (xs_fp - xs).T @ xs / n_tok, rtol=1e-5, atol=1e-6)
    assert stats.n == stats.qkv.n == n_tok


def test_running_mean_over_batches() -> None:
    model = tiny_llama()
    torch.manual_seed(2)
    hidden = torch.randn(4, 5, 32)
    whole = stats_for(model, hidden, hidden + 0.05)[0]
    parts = AttentionStatistics()
    for lo, hi in ((0, 1), (1, 4)):
        parts.add(run_block(model, hidden[lo:hi])[1], run_block(model, hidden[lo:hi] + 0.05)[1])
    cos, sin = get_adapter(model).rotary_cos_sin(model, 5, "cpu")
    for name in ("col_hessian_v", "cross_v"):
        torch.testing.assert_close(getattr(parts, name)(), getattr(whole, name)(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.row_hessian_q(cos, sin), whole.row_hessian_q(cos, sin))
    torch.testing.assert_close(parts.row_hessian_k(cos, sin), whole.row_hessian_k(cos, sin))
    assert parts.n == whole.n == 20
    assert AttentionStatistics().cross_v() is None


def test_covariance_accumulator() -> None:
    torch.manual_seed(3)
    x = torch.randn(3, 7, 5, dtype=torch.float64)
    x_fp = x + 0.1 * torch.randn_like(x)
    acc = CovarianceAccumulator()
    assert acc.C is None
    for i in range(3):
        acc.add(x[i])
        acc.add_cross(x_fp[i], x[i])
    flat, flat_fp = x.reshape(-1, 5), x_fp.reshape(-1, 5)
    assert acc.H.dtype == torch.float32 and acc.n == acc.n_cross == 21
    torch.testing.assert_close(acc.H.double(), 2 * flat.T @ flat / 21, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.C.double(), 2 * (flat_fp - flat).T @ flat / 21, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="same calibration tokens"):
        acc.add_cross(x_fp[0, :3], x[0])
    with pytest.raises(UserError, match="shape changed"):
        acc.add(torch.randn(4, 6))


def test_bad_records_raise() -> None:
    stats = AttentionStatistics()
    with pytest.raises(UserError, match="lacks"):
        stats.add({"attn_input": torch.randn(1, 3, 32)})
    _, rec = run_block(tiny_llama(), torch.randn(1, 4, 32))
    with pytest.raises(UserError, match="same calibration tokens"):
        _, rec_fp = run_block(tiny_llama(), torch.randn(2, 4, 32))
        stats.add(rec, rec_fp)
    _, rec_mha = run_block(tiny_llama(n_kv_heads=4), torch.randn(1, 4, 32))
    with pytest.raises(UserError, match="one AttentionStatistics per block"):
        stats.add(rec_mha)


def expand_kv_to_mha(gqa: nn.Module) -> nn.Module:
    """The same model with each KV head's k/v rows duplicated for its r query heads (n_kv = n_heads)."""
    mha = tiny_llama(n_kv_heads=4, seed=123)
    state = {}
    for name, tensor in gqa.state_dict().items():
        if ".k_proj." in name or ".v_proj." in name:
            heads = tensor.view(2, 8, *tensor.shape[1:])
            tensor = heads.repeat_interleave(2, dim=0).reshape(32, *tensor.shape[1:])
        state[name] = tensor
    mha.load_state_dict(state)
    return mha


def test_gqa_equals_duplicated_mha() -> None:
    gqa = tiny_llama(n_kv_heads=2, seed=4)
    mha = expand_kv_to_mha(gqa)
    torch.manual_seed(5)
    hidden_fp = torch.randn(2, 6, 32)
    hidden_q = hidden_fp + 0.1 * torch.randn_like(hidden_fp)
    s_gqa, out_gqa, _, _ = stats_for(gqa, hidden_q, hidden_fp)
    s_mha, out_mha, _, _ = stats_for(mha, hidden_q, hidden_fp)
    torch.testing.assert_close(out_gqa, out_mha, rtol=1e-5, atol=1e-5)

    def group_mean(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 2, *t.shape[1:]).mean(1)

    cos, sin = get_adapter(gqa).rotary_cos_sin(gqa, 6, "cpu")
    torch.testing.assert_close(s_gqa.row_hessian_q(cos, sin), s_mha.row_hessian_q(cos, sin), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_gqa.row_hessian_k(cos, sin), group_mean(s_mha.row_hessian_k(cos, sin)),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_gqa.col_hessian_v(), group_mean(s_mha.col_hessian_v()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_gqa.cross_v(), group_mean(s_mha.cross_v()), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_gqa.qkv.H, s_mha.qkv.H, rtol=1e-5, atol=1e-5)
