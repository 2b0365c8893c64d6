"""Gemma 3 through the toolchain: its adapter computes the transformers model ((1 + w) norms, post-norms, per-head
q/k norms, GeGLU, sliding-window layers with their own RoPE base, the scaled embedding), all four methods
quantize and evaluate it, BoA's statistics use each layer's own RoPE tables and q/k gains, the GGUF export runs
in llama.cpp's ``gemma3`` with torch's logits, the ONNX graph computes the fake-quant model, ``turboboa run``
passes its check, and what cannot apply (rotation, padding, the fully quantized NPU graph) is refused in one
line.

Tiny random Gemma 3s (6 layers: 5 sliding, 1 global, as llama.cpp's gemma3 fixes them), seconds each; one slow
case runs the real Gemma-3-270M end to end with GGUF.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from exporters import export
from exporters.gguf import float_tensors, write_gguf
from exporters.gguf.export import check_gguf_weights
from exporters.onnx import check_onnx_weights, export_onnx
from turboboa import quantization
from turboboa.arch import decoder_spec, get_adapter, locate
from turboboa.arch.gemma3 import Gemma3Adapter
from turboboa.blockwise import BlockStatistics, _collect, norm_weighted_layers
from turboboa.checkpoint import load_fakequant_model, load_qdir
from turboboa.config import QuantConfig
from turboboa.data import eval_tokens
from turboboa.distributed import World
from turboboa.errors import UserError
from turboboa.eval.evaluate import evaluate as evaluate_torch
from turboboa.eval.perplexity import make_windows
from turboboa.hessians import AttentionStatistics, rope_average

from .conftest import assert_one_line_error, run_cli, run_main, save_with_random_norms
from .test_gguf_writer import BOUND_F16_KV, logit_gap, randomize
from .test_onnx_export import REL_BOUND, relative_gap

METHODS = ("rtn", "gptq", "boa", "turboboa")
# llama.cpp vs torch with an F32 KV cache, max |logit diff| / std: measured 2.7e-3, above Llama's 1e-4 because
# ggml computes GELU through an F16 lookup table; the norms written as w instead of 1 + w: 6.9
BOUND_GELU = 1e-2


def tiny_gemma3(seed: int = 0, **overrides: object) -> nn.Module:
    """A tiny random eager Gemma 3: D=32, 4 query heads over 2 KV heads of d=16, FFN 64, 6 layers (window 3),
    every norm weight w = 0.3 N(0, 1) (gain 1 + w), matrices 0.2 N(0, 1)."""
    config = Gemma3TextConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        query_pre_attn_scalar=16, sliding_window=3, max_position_embeddings=64),
                                 **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((0.3 if "norm" in name else 0.2) * torch.randn_like(param))
    return model


def make_tiny_gemma3_dir(path: Path, tokenizer, *, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                         head_dim: int = 32, window: int = 16) -> Path:
    """A random Gemma 3 (6 layers) saved as a Hugging Face folder with a real tokenizer; norms random too."""
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=6, num_attention_heads=heads, num_key_value_heads=kv_heads,
                              head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=window,
                              max_position_embeddings=2048)
    return save_with_random_norms(Gemma3ForCausalLM, config, path, tokenizer, norm_offset=0.0)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, default_tokenizer) -> Path:
    return make_tiny_gemma3_dir(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3", default_tokenizer)


# --- the adapter ---------------------------------------------------------------------------------------------


def test_adapter_names_every_module_by_role() -> None:
    model = tiny_gemma3()
    adapter = get_adapter(model)
    assert isinstance(adapter, Gemma3Adapter)
    layout = adapter.LAYOUT
    assert layout.head_norms() == ("q_norm", "k_norm", "attention_post_norm", "mlp_post_norm")
    assert layout.locate("model.layers.2.post_attention_layernorm") == (2, "attention_post_norm")
    assert layout.locate("model.layers.2.pre_feedforward_layernorm") == (2, "mlp_norm")
    assert locate("model.layers.2.post_feedforward_layernorm") == (2, "mlp_post_norm")
    # Llama's MLP norm is Gemma's attention post-norm: no family-independent role
    assert locate("model.layers.2.post_attention_layernorm") == (2, None)
    assert locate("model.layers.2.mlp.down_proj") == (2, "down")
    roles = {layout.locate(name.rpartition(".")[0])[1] for name in model.state_dict()}
    assert None not in roles
    assert adapter.lm_head(model).weight is adapter.embed_tokens(model).weight


@pytest.mark.parametrize("seqlen", [9, 2])
def test_block_forward_and_logits_match_transformers(seqlen) -> None:
    """Every block's output and the logits equal transformers' (sliding layers with window 3, their local RoPE
    base, the global layer 5 with its own); the embedding is E[ids] * sqrt(D) as HF rounds it."""
    model = tiny_gemma3()
    adapter = get_adapter(model)
    ids = torch.randint(0, 64, (2, seqlen))
    with torch.no_grad():
        hidden = adapter.embed(model, ids)
        scale = torch.tensor(32**0.5).to(torch.float32)
        torch.testing.assert_close(hidden, model.model.embed_tokens.weight[ids] * scale, rtol=0, atol=0)
        cos, sin = adapter.rotary_cos_sin(model, seqlen, "cpu")
        assert cos.shape == (2, seqlen, 16) and not torch.equal(cos[0], cos[1]) or seqlen < 2
        outputs = model(ids, output_hidden_states=True)
        for i, block in enumerate(adapter.blocks(model)):
            hidden = adapter.block_forward(block, hidden, cos, sin)
            if i < 5:
                torch.testing.assert_close(hidden, outputs.hidden_states[i + 1], rtol=1e-5, atol=1e-5)
        logits = adapter.lm_head(model)(adapter.final_norm(model)(hidden))
    torch.testing.assert_close(logits, outputs.logits, rtol=1e-5, atol=1e-5)


def test_statistics_use_each_layers_rope_and_gains() -> None:
    """A sliding layer's records carry its local tables and the (1 + w) q/k gains; the row Hessians average
    over those tables whatever tables the caller passes, and take the gains on both sides."""
    model = tiny_gemma3(seed=1)
    adapter = get_adapter(model)
    cos, sin = adapter.rotary_cos_sin(model, 7, "cpu")
    rec: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        adapter.block_forward(adapter.blocks(model)[0], torch.randn(2, 7, 32), cos, sin, record=rec.__setitem__)
    assert torch.equal(rec["rope_cos"], cos[1]) and torch.equal(rec["rope_sin"], sin[1])  # sliding: local
    attn = model.model.layers[0].self_attn
    torch.testing.assert_close(rec["q_gain"], 1 + attn.q_norm.weight)
    stats = AttentionStatistics()
    stats.add(rec)
    k = rec["k_rope"]
    mk = torch.einsum("bgld,bgle->gde", k, k) / 14
    gain = 1 + attn.q_norm.weight.detach()
    want = (rope_average(mk, cos[1], sin[1]) * gain * gain[:, None]).repeat_interleave(2, dim=0)
    torch.testing.assert_close(stats.row_hessian_q(cos[0], sin[0]), want, rtol=1e-5, atol=1e-6)


def test_layers_read_by_a_norm_take_norm_weighted_covariances() -> None:
    """The o and down projections (read by the post-norms) and q, k (per-head norms) get
    ``H = 2 mean_t w_t x_t x_t^T``, ``w_t = mean_heads 1 / (mean(z_t^2) + eps)`` with ``z`` the layer's output
    (the norm's ``1 / rho_t^2``, the frozen-rho Hessian of the normalized output's error); v, gate and up
    keep the plain input covariance."""
    model = tiny_gemma3(seed=2)
    adapter = get_adapter(model)
    block = adapter.blocks(model)[1]
    names = adapter.linear_names()
    weights = norm_weighted_layers(adapter, block, names, 16)
    assert weights == {"self_attn.q_proj": (16, 1e-6), "self_attn.k_proj": (16, 1e-6),
                       "self_attn.o_proj": (0, 1e-6), "mlp.down_proj": (0, 1e-6)}
    stats = BlockStatistics.empty([g[0] for g in adapter.LINEAR_GROUPS], False, weights)
    X = torch.randn(3, 7, 32)
    cos, sin = adapter.rotary_cos_sin(model, 7, "cpu")
    with torch.no_grad():
        _collect(adapter, block, None, X, None, cos, sin, 2, stats, World(), torch.device("cpu"))
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [block.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, (a[0].reshape(-1, a[0].shape[-1]), out.reshape(-1, out.shape[-1]))))
        for n in names]
    with torch.no_grad():
        adapter.block_forward(block, X, cos, sin)
    for h in hooks:
        h.remove()
    for name, (size, eps) in weights.items():
        x, z = seen[name]
        z = z.reshape(z.shape[0], -1, size) if size else z[:, None]
        w = (1 / (z.pow(2).mean(-1) + eps)).mean(-1)
        torch.testing.assert_close(stats.normed[name].H, 2 * (x.T * w) @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    x = seen["mlp.up_proj"][0]
    torch.testing.assert_close(stats.covs["mlp.gate_proj"].H, 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    assert not set(stats.normed) & {"self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}


def test_softcapping_is_refused() -> None:
    with pytest.raises(UserError, match="final_logit_softcapping"):
        get_adapter(tiny_gemma3(final_logit_softcapping=30.0))


# --- quantize, evaluate, export -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_qdirs(tmp_path_factory, gemma_dir) -> dict:
    """A QDIR of the tiny Gemma 3 (hidden 64) for each method: ggml q4_0, 4 x 32 calibration tokens."""
    folder = tmp_path_factory.mktemp("gemma3q")
    out = {}
    for method in METHODS:
        cfg = QuantConfig(method=method, format="q4_0", nsamples=4, seqlen=32)
        quantization.quantize(str(gemma_dir), cfg, folder / method, device="cpu", progress=False)
        out[method] = folder / method
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_method_quantizes_and_evaluates_gemma3(gemma_qdirs, gemma_dir, method) -> None:
    ckpt = load_qdir(gemma_qdirs[method])
    assert ckpt.config.rotate == "none"  # --rotate auto: Gemma cannot be rotated
    assert "model.layers.1.post_feedforward_layernorm.weight" in ckpt.float_tensors
    model = load_fakequant_model(ckpt)
    down = model.get_submodule("model.layers.5.mlp.down_proj")
    torch.testing.assert_close(down.weight, ckpt.layers["model.layers.5.mlp.down_proj"].dequantize())
    quantized = evaluate_torch(str(gemma_qdirs[method]), seqlen=64, max_windows=2, device="cpu", progress=False)
    base = evaluate_torch(str(gemma_dir), seqlen=64, max_windows=2, device="cpu", progress=False)
    assert quantized.tokens == base.tokens and torch.isfinite(torch.tensor(quantized.ppl))
    assert abs(quantized.ppl / base.ppl - 1) < 0.05


def test_gguf_export_holds_the_checkpoint(tmp_path, gemma_qdirs) -> None:
    ckpt = load_qdir(gemma_qdirs["boa"])
    path = export(ckpt, "gguf", tmp_path / "m.gguf")
    assert max(check_gguf_weights(path, ckpt).values()) == 0.0


@pytest.mark.parametrize("seqlen", [None, 64], ids=["dynamic", "static"])
def test_onnx_logits_match_fake_quant(tmp_path, gemma_qdirs, text_windows, seqlen) -> None:
    """The ONNX graph computes Gemma 3's block: (1 + w) norms, per-head q/k norms, post-norms, tanh-GELU,
    sqrt(D)-scaled embedding, and on each layer its own RoPE base and window (16 keys on the sliding layers,
    windows of 64 and 17 tokens): onnxruntime's logits equal the fake-quant model's, weights exact."""
    ckpt = load_qdir(gemma_qdirs["turboboa"])
    spec = decoder_spec(AutoConfig.from_pretrained(ckpt.path))
    assert spec.windows == (16,) * 5 + (None,) and spec.rope_table == (1,) * 5 + (0,)
    path = export_onnx(ckpt, tmp_path / "m.onnx", **({} if seqlen is None else {"seqlen": seqlen}))
    assert max(check_onnx_weights(path, ckpt).values()) == 0.0
    used = [w for w in text_windows if seqlen is None or len(w) == seqlen]
    assert relative_gap(path, ckpt, used) < REL_BOUND


def test_run_with_default_settings_passes_the_check(tmp_path, gemma_dir) -> None:
    """``turboboa run`` with its defaults (TurboBoA onto q4_0, no rotation for Gemma) writes a GGUF and an
    npu-profile ONNX that pass the check: weights exact, llama.cpp and onnxruntime within their bounds."""
    out = tmp_path / "run"
    r = run_cli("run", str(gemma_dir), "--nsamples", "2", "--seqlen", "32", "--export", "gguf,onnx",
                "--onnx-profile", "npu", "--eval-seqlen", "64", "--max-windows", "2", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and report["run"]["config"]["method"] == "turboboa"
    assert {row["backend"] for row in report["backends"]} >= {"llama.cpp", "onnxruntime"}


def test_what_gemma_cannot_take_is_refused_in_one_line(tmp_path, gemma_qdirs, gemma_dir, capsys) -> None:
    qdir = tmp_path / "copy"
    shutil.copytree(gemma_qdirs["rtn"], qdir)
    before = {p.name: p.read_bytes() for p in qdir.iterdir()}
    assert_one_line_error(run_main("calibrate", str(qdir), "--act-bits", "16", "--scope", "graph", "--nsamples",
                                   "2", "--seqlen", "32", "-q", capsys=capsys),
                          "--profile qnn-htp", "post-norms", "sliding-window layers", "--profile generic or npu")
    assert {p.name: p.read_bytes() for p in qdir.iterdir()} == before
    quantize = ("quantize", str(gemma_dir), "--nsamples", "2", "--seqlen", "32", "--format", "q4_0",
                "--device", "cpu", "-q", "-o", str(tmp_path / "q"))
    assert_one_line_error(run_main(*quantize, "--rotate", "hadamard", capsys=capsys), "--rotate hadamard",
                          "post-norms", "--rotate none")
    assert_one_line_error(run_main(*quantize, "--pad-to", "128", capsys=capsys), "--pad-to", "post-norms")
    assert not (tmp_path / "q").exists()


def test_llama_cpp_logits_match_torch(tmp_path, default_tokenizer) -> None:
    """A float tiny Gemma 3 (hidden 256, 4 heads of 64 over 2 KV heads, window 16 on 5 of 6 layers, random
    norms) written as a ``gemma3`` GGUF (norms stored as 1 + w): llama.cpp's logits equal torch's over windows
    of 128 tokens, so the sliding windows, both RoPE bases and the embedding scale are exercised."""
    pytest.importorskip("llama_cpp")
    from runtime_check.llamacpp import gguf_logits_fn

    folder = make_tiny_gemma3_dir(tmp_path / "g3", default_tokenizer, hidden=256, heads=4, kv_heads=2,
                                  head_dim=64, window=16)
    model = randomize(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.sub_(1.0)  # randomize draws gains near 1; Gemma's weight is the gain minus 1
    windows = make_windows(eval_tokens(default_tokenizer, "wikitext2"), 128, 2)
    path = write_gguf(tmp_path / "m.gguf", model.config, AutoTokenizer.from_pretrained(folder),
                      float_tensors(model.state_dict()))
    with gguf_logits_fn(path, n_ctx=128, threads=2, kv_cache_f32=True) as fn:
        exact = logit_gap(fn, model, windows)
    with gguf_logits_fn(path, n_ctx=128, threads=2) as fn:
        default = logit_gap(fn, model, windows)
    print(f"gemma3: max |diff| / std = {exact:.2e} (F32 KV cache), {default:.2e} (F16 KV cache)")
    assert exact < BOUND_GELU
    assert default < BOUND_F16_KV


@pytest.mark.slow
def test_real_gemma_run_passes(tmp_path) -> None:
    """Gemma-3-270M (alias ``gemma-3-270m``, assembled into the cache on first use), RTN onto q4_0, exported to
    GGUF and checked on a window of 256 tokens: weights exact, llama.cpp within 1% of the fake-quant PPL. (The
    ONNX graph of Gemma 3 is checked on tiny models here and on the real one by ``make bench-gemma``: a
    262k-token vocabulary makes each backend of the check cost tens of seconds.)"""
    out = tmp_path / "run"
    r = run_cli("run", "gemma-3-270m", "--method", "rtn", "--nsamples", "2", "--seqlen", "128", "--export",
                "gguf", "--eval-seqlen", "256", "--max-windows", "1", "-q", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {row["backend"]: row for row in report["backends"]}
    print({name: (round(row["ppl"], 4), row["gap"]) for name, row in rows.items()})
    assert report["passed"] is True and report["run"]["config"]["format"] == "q4_0"
    assert "llama.cpp" in rows and rows["float"]["ppl"] < rows["fake-quant"]["ppl"]
