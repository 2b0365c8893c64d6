"""OPT through the whole toolchain: its adapter computes the transformers model, BoA's attention Hessians
without RoPE equal their brute-force definitions, all four methods quantize and evaluate it, the ONNX export
runs in onnxruntime and passes ``turboboa check``, and what cannot apply to OPT (GGUF, rotation, padding, the
opt-350m layout) is refused in one line.

Tiny random OPTs (hidden 64 or 16, 4 or 2 heads, 2 layers) with random LayerNorms and biases, seconds each.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from exporters import export
from exporters.onnx import check_onnx_weights
from runtime_check.onnxrt import onnx_logits_fn
from turboboa import quantization
from turboboa.arch import AttentionShape, get_adapter, locate, role_of, supported_model_types
from turboboa.arch.opt import OPTAdapter
from turboboa.checkpoint import load_fakequant_model, load_qdir
from turboboa.config import QuantConfig
from turboboa.errors import UserError
from turboboa.eval.evaluate import evaluate as evaluate_torch
from turboboa.formats.presets import ModelShape, preset_format
from turboboa.hessians import AttentionStatistics, rope_average

from .conftest import assert_one_line_error, run_cli, run_main

METHODS = ("rtn", "gptq", "boa", "turboboa")


def tiny_opt(seed: int = 0, **overrides: object) -> nn.Module:
    """A tiny random eager OPT: D=16, H=2 heads of d=8, FFN 32, 2 layers; LayerNorms and biases random."""
    config = OPTConfig(**{**dict(vocab_size=64, hidden_size=16, num_attention_heads=2, num_hidden_layers=2,
                                 ffn_dim=32, word_embed_proj_dim=16, max_position_embeddings=64), **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
            else:
                param.copy_(0.3 * torch.randn_like(param))
    return model


def hf_causal_mask(batch: int, seqlen: int) -> torch.Tensor:
    """Additive (B, 1, L, L) mask for the HF eager attention: 0 where allowed, finfo.min above the diagonal."""
    future = torch.triu(torch.ones(seqlen, seqlen, dtype=torch.bool), diagonal=1)
    return torch.zeros(seqlen, seqlen).masked_fill(future, torch.finfo(torch.float32).min).expand(batch, 1, seqlen,
                                                                                                  seqlen)


# --- the adapter ---------------------------------------------------------------------------------------------


def test_adapter_names_roles_and_attention_layout() -> None:
    model = tiny_opt()
    adapter = get_adapter(model)
    assert isinstance(adapter, OPTAdapter) and "opt" in supported_model_types()
    assert adapter.attention_shape(model) == AttentionShape(2, 2, 8, 16, rope=False)
    assert adapter.rotary_cos_sin(model, 5, "cpu") == (None, None)
    assert adapter.LINEAR_GROUPS == [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
                                     ["self_attn.out_proj"], ["fc1"], ["fc2"]]
    block = adapter.blocks(model)[0]
    assert {adapter.role_of(n) for n in adapter.linear_names()} == {"q", "k", "v", "o", "up", "down"}
    assert all(isinstance(block.get_submodule(n), nn.Linear) and block.get_submodule(n).bias is not None
               for n in adapter.linear_names())
    assert adapter.final_norm(model) is model.model.decoder.final_layer_norm
    assert adapter.lm_head(model).weight is adapter.embed_tokens(model).weight  # tied
    # every module name of the state dict has its role; the block's two LayerNorms and the final one differ
    assert locate("model.decoder.layers.1.fc2") == (1, "down")
    assert locate("model.decoder.layers.0.self_attn.out_proj") == (0, "o")
    assert locate("model.decoder.layers.0.final_layer_norm") == (0, "mlp_norm")
    assert locate("model.decoder.final_layer_norm") == (None, "final_norm")
    assert role_of("model.decoder.embed_positions") == "positions"
    assert role_of("model.decoder.embed_tokens") == "embedding" and role_of("lm_head") == "head"
    roles = {role_of(name.rpartition(".")[0]) for name in model.state_dict()}
    assert None not in roles


def test_block_forward_and_logits_match_transformers() -> None:
    model = tiny_opt()
    adapter = get_adapter(model)
    batch, seqlen = 2, 7
    hidden = torch.randn(batch, seqlen, 16)
    with torch.no_grad():
        for block in adapter.blocks(model):
            rec: dict[str, torch.Tensor] = {}
            ours = adapter.block_forward(block, hidden, None, None, record=rec.__setitem__)
            ref = block(hidden, attention_mask=hf_causal_mask(batch, seqlen))
            torch.testing.assert_close(ours, ref[0] if isinstance(ref, tuple) else ref, rtol=1e-5, atol=1e-5)
        ids = torch.randint(0, 64, (2, 9))
        h = adapter.embed(model, ids)
        for block in adapter.blocks(model):
            h = adapter.block_forward(block, h, None, None)
        torch.testing.assert_close(adapter.lm_head(model)(adapter.final_norm(model)(h)), model(ids).logits,
                                   rtol=1e-5, atol=1e-5)
    assert rec["q_rope"].shape == rec["k_rope"].shape == (batch, 2, seqlen, 8)
    assert rec["attn_probs"].shape == (batch, 2, seqlen, seqlen) and rec["attn_input"].shape == hidden.shape


def test_positions_are_the_learned_table_at_t_plus_2() -> None:
    """h_0[t] = E[id_t] + P[t + 2]: the embedding the adapter computes, from its definition."""
    model = tiny_opt()
    ids = torch.randint(0, 64, (1, 5))
    table = model.model.decoder.embed_positions.weight
    want = model.model.decoder.embed_tokens.weight[ids[0]] + table[torch.arange(5) + 2]
    torch.testing.assert_close(get_adapter(model).embed(model, ids)[0], want)


@pytest.mark.parametrize("overrides,words", [
    ({"do_layer_norm_before": False}, "post-norm"),
    ({"word_embed_proj_dim": 8}, "project_in/project_out"),
])
def test_opt_350m_layouts_are_refused_in_one_line(tmp_path, default_tokenizer, overrides, words) -> None:
    with pytest.raises(UserError, match=words):
        get_adapter(tiny_opt(**overrides))
    folder = tmp_path / "opt"
    config = OPTConfig(vocab_size=len(default_tokenizer), hidden_size=16, num_attention_heads=2,
                       num_hidden_layers=1, ffn_dim=32, **{"word_embed_proj_dim": 16, **overrides})
    OPTForCausalLM(config).save_pretrained(folder)
    default_tokenizer.save_pretrained(folder)
    proc = run_cli("quantize", str(folder), "--nsamples", "2", "--seqlen", "32", "-o", str(tmp_path / "q"))
    assert_one_line_error(proc, words, "opt-350m")
    assert not (tmp_path / "q").exists()


def test_presets_take_opt_layers_by_role() -> None:
    shape = ModelShape(n_layers=30, n_gqa=1, tied=True)
    layer = "model.decoder.layers.{}.{}"
    assert preset_format("Q2_K", layer.format(5, "fc2"), shape) == "q3_k"  # ffn_down
    assert preset_format("Q2_K", layer.format(5, "self_attn.out_proj"), shape) == "q3_k"  # attn_out
    assert preset_format("Q2_K", layer.format(5, "self_attn.v_proj"), shape) == "q3_k"  # attn_v, n_gqa 1
    assert preset_format("Q2_K", layer.format(5, "fc1"), shape) == "q2_k"
    assert preset_format("Q4_K_M", "model.decoder.embed_tokens", shape) == "q6_k"  # tied: the output's type


# --- BoA's attention Hessians without RoPE, against brute force ------------------------------------------------


def block_inputs(model: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """From the transformers modules themselves (not the adapter): the attention input X = LN_a(h), the
    queries and keys ``x W^T + b`` per head (B, H, L, d, before the softmax scale) and the attention
    probabilities (B, H, L, L) of the first block, in float64."""
    block = model.model.decoder.layers[0]
    attn = block.self_attn
    batch, seqlen, _ = hidden.shape
    with torch.no_grad():
        x = block.self_attn_layer_norm(hidden)
        _, probs = attn(hidden_states=x, attention_mask=hf_causal_mask(batch, seqlen))
        heads = lambda t: t.view(batch, seqlen, 2, 8).transpose(1, 2).double()  # noqa: E731
        q, k = heads(attn.q_proj(x)), heads(attn.k_proj(x))
    return x.double(), q, k, probs.double()


def adapter_statistics(model: nn.Module, hidden: torch.Tensor) -> AttentionStatistics:
    """The statistics the pipeline accumulates: the adapter's records of the first block."""
    adapter = get_adapter(model)
    stats = AttentionStatistics()
    rec: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        adapter.block_forward(adapter.blocks(model)[0], hidden, *adapter.rotary_cos_sin(model, hidden.shape[1], "cpu"),
                              record=rec.__setitem__)
    stats.add(rec)
    return stats


def logit_error_hessian(x: torch.Tensor, other: torch.Tensor, scale: float) -> torch.Tensor:
    """Brute force, by autograd: the Hessian over the (d, D) rows of one head's projection of the relaxed
    attention-logit error sum_{i,j} (scale * (dW x_i) . o_j)^2 (every pair of tokens, the causal mask
    ignored, as the note's surrogate does), flattened to (d D, d D). With ``other`` the keys this is the query
    projection's objective, with the queries the key projection's."""
    d, width = other.shape[1], x.shape[1]

    def error(dw: torch.Tensor) -> torch.Tensor:
        return ((x @ dw.T @ other.T) * scale).pow(2).sum()

    hessian = torch.autograd.functional.hessian(error, torch.zeros(d, width, dtype=torch.float64))
    return hessian.reshape(d * width, d * width)


def test_query_and_key_hessians_without_rope_equal_brute_force() -> None:
    """BoA's Kronecker factors H_row (x) H_col of the q and k projections, for OPT (R_t = I): with n tokens of
    one sequence, the brute-force Hessian of the logit error equals scale^2 n^2 H_row(h) (x) H_col exactly,
    H_row(q, h) = mean_t k_t k_t^T and H_row(k, h) = mean_t q_t q_t^T of the head, H_col = 2 mean_t x_t x_t^T."""
    model = tiny_opt(seed=3)
    torch.manual_seed(4)
    hidden = torch.randn(1, 6, 16)
    x, q, k, _ = block_inputs(model, hidden)
    stats = adapter_statistics(model, hidden)
    row_q, row_k = stats.row_hessian_q(None, None).double(), stats.row_hessian_k(None, None).double()
    h_col = stats.qkv.H.double()
    n, scale = 6, 8**-0.5
    for h in range(2):
        torch.testing.assert_close(logit_error_hessian(x[0], k[0, h], scale),
                                   scale**2 * n**2 * torch.kron(row_q[h], h_col), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logit_error_hessian(x[0], q[0, h], scale),
                                   scale**2 * n**2 * torch.kron(row_k[h], h_col), rtol=1e-5, atol=1e-6)
    # the identity rotation: RoPE's average over positions with c_t = 1, s_t = 0 leaves the covariance as is
    ones, zeros = torch.ones(6, 8), torch.zeros(6, 8)
    torch.testing.assert_close(rope_average(row_q, ones, zeros), row_q.float())


def test_hessians_over_a_batch_equal_their_definitions_by_loops() -> None:
    """Over several sequences: H_row(q, h) = (1/n) sum_t k_{h,t} k_{h,t}^T, H_row(k, h) the same with the
    queries, H_col(v, h) = (2/n) sum_t y_{h,t} y_{h,t}^T with y_{h,t} = sum_s A_h[t, s] x_s (transformers'
    own attention probabilities), each summed token by token."""
    model = tiny_opt(seed=5)
    torch.manual_seed(6)
    hidden = torch.randn(3, 5, 16)
    x, q, k, probs = block_inputs(model, hidden)
    stats = adapter_statistics(model, hidden)
    n = 3 * 5
    mk, mq, col = torch.zeros(2, 8, 8, dtype=torch.float64), torch.zeros(2, 8, 8, dtype=torch.float64), \
        torch.zeros(2, 16, 16, dtype=torch.float64)
    for b in range(3):
        for h in range(2):
            for t in range(5):
                mk[h] += torch.outer(k[b, h, t], k[b, h, t]) / n
                mq[h] += torch.outer(q[b, h, t], q[b, h, t]) / n
                y = sum(probs[b, h, t, s] * x[b, s] for s in range(5))
                col[h] += 2 * torch.outer(y, y) / n
    torch.testing.assert_close(stats.row_hessian_q(None, None).double(), mk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.row_hessian_k(None, None).double(), mq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.col_hessian_v().double(), col, rtol=1e-5, atol=1e-6)


# --- quantize, evaluate, export -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def opt_qdirs(tmp_path_factory, tiny_opt_dir) -> dict:
    """A QDIR of the tiny OPT (hidden 64) for each method: w4 g32, 4 x 32 calibration tokens."""
    folder = tmp_path_factory.mktemp("opt")
    out = {}
    for method in METHODS:
        cfg = QuantConfig(method=method, bits=4, group_size=32, nsamples=4, seqlen=32)
        quantization.quantize(str(tiny_opt_dir), cfg, folder / method, device="cpu", progress=False)
        out[method] = folder / method
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_method_quantizes_and_evaluates_opt(opt_qdirs, tiny_opt_dir, method) -> None:
    ckpt = load_qdir(opt_qdirs[method])
    blocks = [f"model.decoder.layers.{i}.{n}" for i in range(2)
              for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")]
    assert set(ckpt.layers) == {*blocks, "model.decoder.embed_tokens"}
    assert ckpt.config.rotate == "none"  # --rotate auto: OPT cannot be rotated
    assert "model.decoder.embed_positions.weight" in ckpt.float_tensors
    assert "model.decoder.layers.0.fc1.bias" in ckpt.float_tensors
    model = load_fakequant_model(ckpt)
    fc2 = model.get_submodule("model.decoder.layers.1.fc2")
    torch.testing.assert_close(fc2.weight, ckpt.layers["model.decoder.layers.1.fc2"].dequantize())
    quantized = evaluate_torch(str(opt_qdirs[method]), seqlen=64, max_windows=2, device="cpu", progress=False)
    base = evaluate_torch(str(tiny_opt_dir), seqlen=64, max_windows=2, device="cpu", progress=False)
    assert quantized.tokens == base.tokens and torch.isfinite(torch.tensor(quantized.ppl))
    assert abs(quantized.ppl / base.ppl - 1) < 0.05  # a random model: 4 bits barely move its uniform output


@pytest.mark.parametrize("seqlen", [None, 48], ids=["dynamic", "static"])
def test_onnx_export_matches_the_fake_quant_model(tmp_path, opt_qdirs, default_tokenizer, seqlen) -> None:
    from turboboa.data import eval_tokens

    ckpt = load_qdir(opt_qdirs["turboboa"])
    path = export(ckpt, "onnx", tmp_path / "m.onnx", **({} if seqlen is None else {"seqlen": seqlen}))
    assert max(check_onnx_weights(path, ckpt).values()) == 0.0
    model = load_fakequant_model(ckpt)
    ids = eval_tokens(default_tokenizer, "wikitext2")
    windows = [ids[:48]] if seqlen else [ids[:48], ids[48:61]]
    with onnx_logits_fn(path, threads=1) as fn:
        for window in windows:
            with torch.no_grad():
                ref = model(input_ids=window[None]).logits
            got = fn(window[None])
            assert float((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_turboboa_check_passes_on_the_onnx_export(tmp_path, opt_qdirs) -> None:
    qdir = opt_qdirs["boa"]
    path = export(load_qdir(qdir), "onnx", tmp_path / "m.onnx")
    proc = run_cli("check", str(qdir), "--onnx", str(path), "--seqlen", "64", "--max-windows", "2",
                   "--threads", "1", "-q")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("check passed")


def test_what_opt_cannot_take_is_refused_in_one_line(tmp_path, opt_qdirs, tiny_opt_dir, capsys) -> None:
    out = tmp_path / "m.gguf"
    assert_one_line_error(run_main("export", str(opt_qdirs["rtn"]), "--to", "gguf", "-o", str(out),
                                   capsys=capsys), "GGUF", "llama.cpp has no OPT architecture", "--to onnx")
    assert not out.exists()
    quantize = ("quantize", str(tiny_opt_dir), "--nsamples", "2", "--seqlen", "32", "--group-size", "32",
                "--device", "cpu", "-q", "-o", str(tmp_path / "q"))
    assert_one_line_error(run_main(*quantize, "--rotate", "hadamard", capsys=capsys), "--rotate hadamard",
                          "LayerNorm", "--rotate none")
    assert_one_line_error(run_main(*quantize, "--pad-to", "128", capsys=capsys), "--pad-to", "LayerNorm")
    assert not (tmp_path / "q").exists()
    run = ("run", str(tiny_opt_dir), "--export", "gguf,onnx", "--nsamples", "2", "--seqlen", "32",
           "--device", "cpu", "-q", "-o", str(tmp_path / "run"))
    assert_one_line_error(run_main(*run, capsys=capsys), "--export gguf", "llama.cpp has no OPT", "--export onnx")
    assert not (tmp_path / "run" / "qdir").exists()  # refused before quantizing
