"""Qwen3 through the toolchain: its adapter computes the transformers model (per-head q/k RMSNorms, with and
without sliding windows), all four methods quantize and evaluate it, the Hadamard-rotated model computes the
original function, the GGUF export runs in llama.cpp's ``qwen3`` architecture with torch's logits, and the ONNX
graph computes the fake-quant model (per-head norms, per-layer windows).

Tiny random Qwen3s only (no Qwen3 weights are on this machine): hidden 32 or 256, heads of 16 or 64, 2 layers,
random norms (the q/k norms included, so a norm left out or applied twice shows).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from exporters import export
from exporters.gguf import float_tensors, write_gguf
from exporters.gguf.export import check_gguf_weights
from exporters.onnx import export_onnx
from exporters.onnx.check import check_onnx_weights
from turboboa import quantization
from turboboa.arch import AttentionShape, decoder_spec, get_adapter, locate
from turboboa.arch.qwen3 import Qwen3Adapter
from turboboa.checkpoint import load_fakequant_model, load_qdir
from turboboa.config import QuantConfig
from turboboa.data import eval_tokens
from turboboa.errors import UserError
from turboboa.eval.evaluate import evaluate as evaluate_torch
from turboboa.eval.perplexity import make_windows
from turboboa.hessians import AttentionStatistics
from turboboa.models.padding import pad_model
from turboboa.rotation.fuse import rotate_model

from .conftest import save_with_random_norms
from .test_gguf_writer import BOUND_F16_KV, BOUND_F32_KV, logit_gap, randomize
from .test_onnx_export import REL_BOUND, relative_gap
from .test_onnx_export import quantize as quantize_onnx

METHODS = ("rtn", "gptq", "boa", "turboboa")


def tiny_qwen3(seed: int = 0, **overrides: object) -> nn.Module:
    """A tiny random eager Qwen3: D=32, 4 query heads over 2 KV heads of d=16, FFN 64, 2 layers, untied; every
    norm weight 1 + 0.3 N(0, 1), matrices 0.2 N(0, 1)."""
    config = Qwen3Config(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=64, tie_word_embeddings=False), **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.3 * torch.randn_like(param) if "norm" in name else 0.2 * torch.randn_like(param))
    return model


def make_tiny_qwen3_dir(path: Path, tokenizer, *, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                        head_dim: int = 32, tied: bool = True, **config_options: object) -> Path:
    """A random Qwen3 saved as a Hugging Face folder with a real tokenizer; norms random too."""
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=2048, tie_word_embeddings=tied,
                         **config_options)
    return save_with_random_norms(Qwen3ForCausalLM, config, path, tokenizer, norm_offset=1.0)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory, default_tokenizer) -> Path:
    return make_tiny_qwen3_dir(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3", default_tokenizer)


# --- the adapter ---------------------------------------------------------------------------------------------


def test_adapter_names_roles_and_attention_layout() -> None:
    model = tiny_qwen3()
    adapter = get_adapter(model)
    assert isinstance(adapter, Qwen3Adapter)
    assert adapter.attention_shape(model) == AttentionShape(4, 2, 16, 32)
    assert adapter.LAYOUT.head_norms() == ("q_norm", "k_norm")
    assert locate("model.layers.1.self_attn.q_norm") == (1, "q_norm")
    assert locate("model.layers.0.self_attn.k_norm") == (0, "k_norm")
    assert locate("model.layers.0.self_attn.q_proj") == (0, "q")
    roles = {adapter.LAYOUT.locate(name.rpartition(".")[0])[1] for name in model.state_dict()}
    assert None not in roles
    assert all(adapter.linear(adapter.blocks(model)[0], r).bias is None for r in ("q", "k", "v"))


@pytest.mark.parametrize("overrides", [{}, {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}],
                         ids=["full", "sliding"])
def test_block_forward_and_logits_match_transformers(overrides) -> None:
    model = tiny_qwen3(**overrides)
    adapter = get_adapter(model)
    ids = torch.randint(0, 64, (2, 9))
    rec: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        hidden = adapter.embed(model, ids)
        cos, sin = adapter.rotary_cos_sin(model, 9, "cpu")
        outputs = model(ids, output_hidden_states=True)
        for i, block in enumerate(adapter.blocks(model)):
            hidden = adapter.block_forward(block, hidden, cos, sin, record=rec.__setitem__)
            if i + 1 < len(outputs.hidden_states) - 1:
                torch.testing.assert_close(hidden, outputs.hidden_states[i + 1], rtol=1e-5, atol=1e-5)
        logits = adapter.lm_head(model)(adapter.final_norm(model)(hidden))
    torch.testing.assert_close(logits, outputs.logits, rtol=1e-5, atol=1e-5)
    assert rec["q_rope"].shape == (2, 4, 9, 16) and rec["k_rope"].shape == (2, 2, 9, 16)
    if overrides:  # block 1 is windowed: a query never attends 3 or more tokens back
        assert float(rec["attn_probs"][..., 8, :6].abs().max()) == 0.0


def test_leaving_out_the_head_norms_changes_the_block() -> None:
    """The per-head norms matter in the tiny model: the adapter without them differs from transformers."""
    model = tiny_qwen3()
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    hidden = torch.randn(1, 5, 32)
    cos, sin = adapter.rotary_cos_sin(model, 5, "cpu")
    with torch.no_grad():
        ours = adapter.block_forward(block, hidden, cos, sin)
        plain = super(Qwen3Adapter, adapter).normalize_heads  # Llama's identity
        adapter.normalize_heads = plain  # type: ignore[method-assign]
        without = adapter.block_forward(block, hidden, cos, sin)
    assert float((ours - without).abs().max()) > 1e-2


def test_attention_bias_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="attention_bias"):
        get_adapter(tiny_qwen3(attention_bias=True))


def test_hadamard_rotation_keeps_the_function() -> None:
    """QuaRot on Qwen3: the q/k norms act per head after the projections, so folding the block norms and
    rotating the residual stream (and each head's values) leaves the logits equal up to float rounding."""
    model = tiny_qwen3(seed=2, tie_word_embeddings=True)
    ids = torch.randint(0, 64, (2, 11))
    with torch.no_grad():
        ref = model(ids).logits.double()
    q_norms = [b.self_attn.q_norm.weight.clone() for b in model.model.layers]
    report = rotate_model(model.double(), "hadamard", seed=1)
    with torch.no_grad():
        got = model(ids).logits
    assert report["norms_folded"] and report["untied_head"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(b.self_attn.q_norm.weight.float(), w) for b, w in zip(model.model.layers, q_norms, strict=True))


def test_padding_keeps_the_function(tmp_path, default_tokenizer) -> None:
    """``--pad-to 64`` on a Qwen3 (hidden 96, 6 heads of 16 over 2 KV heads, MLP 192): zero channels and zero
    heads (the MLP's 192 is a multiple already) keep the logits (a padded head's queries are zero, so its per-head norm outputs zero), also after a
    reload; the q/k norms (over the head size) are left alone."""
    folder = make_tiny_qwen3_dir(tmp_path / "m", default_tokenizer, hidden=96, heads=6, kv_heads=2, head_dim=16)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    q_norm = model.model.layers[0].self_attn.q_norm.weight.detach().clone()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        report = pad_model(model, 64)
        got = model(input_ids=ids).logits
    assert report == {"hidden": 96, "hidden_padded": 128, "heads": 6, "heads_padded": 8, "intermediate": 192,
                      "intermediate_padded": 192}
    assert torch.equal(model.model.layers[0].self_attn.q_norm.weight, q_norm)
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    model.save_pretrained(tmp_path / "padded")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "padded").eval()
    with torch.no_grad():
        assert (again(input_ids=ids).logits - ref).abs().max() <= 1e-5 * ref.abs().max()


# --- quantize, evaluate, export -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_qdirs(tmp_path_factory, qwen3_dir) -> dict:
    """A QDIR of the tiny Qwen3 (hidden 64) for each method: ggml q4_0, 4 x 32 calibration tokens."""
    folder = tmp_path_factory.mktemp("qwen3q")
    out = {}
    for method in METHODS:
        cfg = QuantConfig(method=method, format="q4_0", nsamples=4, seqlen=32)
        quantization.quantize(str(qwen3_dir), cfg, folder / method, device="cpu", progress=False)
        out[method] = folder / method
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_method_quantizes_and_evaluates_qwen3(qwen3_qdirs, qwen3_dir, method) -> None:
    ckpt = load_qdir(qwen3_qdirs[method])
    assert "model.layers.1.self_attn.q_norm.weight" in ckpt.float_tensors
    model = load_fakequant_model(ckpt)
    o_proj = model.get_submodule("model.layers.1.self_attn.o_proj")
    torch.testing.assert_close(o_proj.weight, ckpt.layers["model.layers.1.self_attn.o_proj"].dequantize())
    quantized = evaluate_torch(str(qwen3_qdirs[method]), seqlen=64, max_windows=2, device="cpu", progress=False)
    base = evaluate_torch(str(qwen3_dir), seqlen=64, max_windows=2, device="cpu", progress=False)
    assert quantized.tokens == base.tokens and torch.isfinite(torch.tensor(quantized.ppl))
    assert abs(quantized.ppl / base.ppl - 1) < 0.05


def test_gguf_export_holds_the_checkpoint(tmp_path, qwen3_qdirs) -> None:
    ckpt = load_qdir(qwen3_qdirs["turboboa"])
    path = export(ckpt, "gguf", tmp_path / "m.gguf")
    assert max(check_gguf_weights(path, ckpt).values()) == 0.0


@pytest.mark.parametrize("case", ["full-tied-generic", "sliding-untied-generic", "sliding-untied-npu"])
def test_onnx_logits_match_fake_quant(tmp_path, default_tokenizer, text_windows, case) -> None:
    """The ONNX graph computes the per-head q/k norms, and per layer its own window (block 1 of the sliding
    case attends 8 keys back, block 0 all of them, over windows of 64 and 17 tokens; the npu profile's static
    graph on the 64-token one): onnxruntime's logits equal the fake-quant model's within the ONNX tests'
    bound, weights exact."""
    sliding = case.startswith("sliding")
    folder = make_tiny_qwen3_dir(tmp_path / "q3", default_tokenizer, tied=not sliding,
                                 **({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
                                    if sliding else {}))
    static = case.endswith("npu")
    ckpt = quantize_onnx(folder, tmp_path / "q", bits=4, group_size=32, sym=static)
    assert decoder_spec(AutoConfig.from_pretrained(folder)).windows == ((None, 8) if sliding else (None, None))
    path = export_onnx(ckpt, tmp_path / "m.onnx", **({"seqlen": 64, "profile": "npu"} if static else {}))
    assert max(check_onnx_weights(path, ckpt).values()) == 0.0
    used = [w for w in text_windows if not static or len(w) == 64]
    assert relative_gap(path, ckpt, used) < REL_BOUND


def test_llama_cpp_logits_match_torch(tmp_path, default_tokenizer) -> None:
    """A float tiny Qwen3 (hidden 256, 4 heads of 64 over 2 KV heads, random norms, untied head) written as a
    ``qwen3`` GGUF: llama.cpp's logits equal torch's within the bounds measured for Llama/Qwen2."""
    pytest.importorskip("llama_cpp")
    from runtime_check.llamacpp import gguf_logits_fn

    folder = make_tiny_qwen3_dir(tmp_path / "q3", default_tokenizer, hidden=256, heads=4, kv_heads=2,
                                 head_dim=64, tied=False)
    model = randomize(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    windows = make_windows(eval_tokens(default_tokenizer, "wikitext2"), 128, 2)
    path = write_gguf(tmp_path / "m.gguf", model.config, AutoTokenizer.from_pretrained(folder),
                      float_tensors(model.state_dict()))
    with gguf_logits_fn(path, n_ctx=128, threads=2, kv_cache_f32=True) as fn:
        exact = logit_gap(fn, model, windows)
    with gguf_logits_fn(path, n_ctx=128, threads=2) as fn:
        default = logit_gap(fn, model, windows)
    print(f"qwen3: max |diff| / std = {exact:.2e} (F32 KV cache), {default:.2e} (F16 KV cache)")
    assert exact < BOUND_F32_KV
    assert default < BOUND_F16_KV


# --- BoA's row Hessians through the per-head q/k norms, against brute force ------------------------------------


def test_query_and_key_hessians_with_head_norms_equal_brute_force() -> None:
    """With R_t = I (identity RoPE tables) and each token's RMS rho frozen, the autograd Hessian over one
    head's (d, D) projection rows of the all-pairs score error sum_{t,s} (scale (gamma o dW x_t / rho_t) . o_s)^2
    (o the normalized keys for q, the normalized queries of the group for k) equals
    scale^2 n^2 [r] H_row (x) H_col_rho with the closed form H_row = diag(gamma) M diag(gamma) of the statistics
    and H_col_rho = (2/n) sum_t x_t x_t^T / rho_t^2 (the factor the pipeline replaces by the plain H_col, a
    scalar apart on average)."""
    model = tiny_qwen3(seed=3).double()
    adapter = get_adapter(model)
    block = adapter.blocks(model)[0]
    attn = block.self_attn
    torch.manual_seed(4)
    n, d, width, scale, group = 6, 16, 32, 16**-0.5, 2
    hidden = torch.randn(1, n, width, dtype=torch.float64)
    cos, sin = torch.ones(n, d, dtype=torch.float64), torch.zeros(n, d, dtype=torch.float64)
    rec: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        adapter.block_forward(block, hidden, cos, sin, record=rec.__setitem__)
        x = block.input_layernorm(hidden)[0]
        q_raw = attn.q_proj(x).view(n, 4, d).transpose(0, 1)  # (H, n, d) before the norm
        k_raw = attn.k_proj(x).view(n, 2, d).transpose(0, 1)
    stats = AttentionStatistics()
    stats.add(rec)
    row_q, row_k = stats.row_hessian_q(None, None).double(), stats.row_hessian_k(None, None).double()
    eps = model.config.rms_norm_eps
    q_hat, k_hat = rec["q_rope"][0].double(), rec["k_rope"][0].double()  # (H, n, d), (G, n, d): normalized

    def brute(gain: torch.Tensor, rho: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
        def error(dw: torch.Tensor) -> torch.Tensor:
            moved = (x @ dw.T) * gain / rho[:, None]  # (n, d): the normalized projection's change
            return sum(((moved @ o.T) * scale).pow(2).sum() for o in others)

        zero = torch.zeros(d, width, dtype=torch.float64)
        return torch.autograd.functional.hessian(error, zero).reshape(d * width, d * width)

    def col(rho: torch.Tensor) -> torch.Tensor:
        return 2 * (x / rho[:, None]).T @ (x / rho[:, None]) / n

    gq, gk = attn.q_norm.weight.detach(), attn.k_norm.weight.detach()
    for h in range(4):
        rho = (q_raw[h].pow(2).mean(-1) + eps).sqrt()
        torch.testing.assert_close(brute(gq, rho, [k_hat[h // group]]),
                                   scale**2 * n**2 * torch.kron(row_q[h], col(rho)), rtol=1e-5, atol=1e-6)
    for g in range(2):
        rho = (k_raw[g].pow(2).mean(-1) + eps).sqrt()
        heads = [q_hat[h] for h in range(g * group, (g + 1) * group)]
        torch.testing.assert_close(brute(gk, rho, heads),
                                   scale**2 * n**2 * group * torch.kron(row_k[g], col(rho)), rtol=1e-5, atol=1e-6)
    # without the gains the statistics are the plain covariances of the normalized keys / queries
    plain = AttentionStatistics()
    plain.add({key: value for key, value in rec.items() if key not in ("q_gain", "k_gain")})
    torch.testing.assert_close(plain.row_hessian_q(None, None).double() * gq * gq[:, None], row_q)
