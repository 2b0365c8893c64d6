"""Streaming: a model read block by block gives the QDIR tensors of the whole model, byte for byte.

Every case quantizes the same model twice, streamed (the default) and with ``stream=False``, and compares
``quantized.safetensors`` and ``float.safetensors`` and the QDIR's ``layers`` entries. Rotations (untying a
tied head, or rotating an untied one), norm-weighted covariances (Qwen3's q/k norms, Gemma 3's post-norms and
embedding scale), storage formats with quantized tables, and a resume in the middle are covered.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_llama, run_cli, save_with_random_norms
from tests.test_gemma3 import make_tiny_gemma3_dir
from tests.test_qwen3 import make_tiny_qwen3_dir
from turboboa import quantization
from turboboa.arch import get_adapter
from turboboa.checkpoint import CONFIG_FILE, FLOAT_FILE, QUANT_FILE
from turboboa.config import QuantConfig
from turboboa.models.loader import load_streamed
from turboboa.resume import work_dir

BASE = QuantConfig(method="turboboa", bits=3, group_size=32, nsamples=4, seqlen=64)


def run(model: Path, out: Path, cfg: QuantConfig, stream: bool, **kw) -> Path:
    summary = quantization.quantize(str(model), cfg, out, device="cpu", progress=False, stream=stream, **kw)
    assert json.loads((out / CONFIG_FILE).read_text())["timings"]["streamed"] is stream
    assert summary.output == out
    return out


def assert_same_tensors(a: Path, b: Path) -> None:
    for name in (QUANT_FILE, FLOAT_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    layers = [json.loads((q / CONFIG_FILE).read_text())["layers"] for q in (a, b)]
    assert layers[0] == layers[1] and list(layers[0]) == list(layers[1])


@pytest.fixture(scope="module")
def norms_llama(tmp_path_factory, default_tokenizer) -> Path:
    """A tiny Llama with random norms (a rotation then unties its tied head) and attention biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(default_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True, attention_bias=True)
    return save_with_random_norms(LlamaForCausalLM, config, tmp_path_factory.mktemp("s") / "llama",
                                  default_tokenizer, 1.0)


@pytest.mark.parametrize("rotate", ["hadamard", "hadamard+a8"])
def test_streamed_equals_whole_llama(tmp_path, norms_llama, rotate) -> None:
    """Rotated (the head untied); rotated under per-token 8-bit activations (the down projection's input
    rotated online, its weight by H_I). The families' case below is unrotated."""
    extra = {"dyn_act_bits": 8, "online_rotate": "auto"} if rotate.endswith("+a8") else {}
    cfg = dataclasses.replace(BASE, rotate=rotate.removesuffix("+a8"), **extra)
    assert_same_tensors(run(norms_llama, tmp_path / "s", cfg, True), run(norms_llama, tmp_path / "w", cfg, False))
    report = json.loads((tmp_path / "s" / CONFIG_FILE).read_text())["rotation"]
    assert report["untied_head"] and report["online_down"] is bool(extra)  # the head: its own matrix now


def test_streamed_equals_whole_untied_head_storage_format(tmp_path, default_tokenizer) -> None:
    """Qwen2 with an untied head, biases and a sliding window; q4_k with the tables rounded (q4_k / q6_k)."""
    model = make_tiny_llama(tmp_path / "qwen2", default_tokenizer, model_type="qwen2", hidden=256, heads=4,
                            kv_heads=2, intermediate=256, layers=2, tie_word_embeddings=False)
    cfg = dataclasses.replace(BASE, method="gptq", format="q4_k", embed_format="q4_k", rotate="hadamard")
    assert_same_tensors(run(model, tmp_path / "s", cfg, True), run(model, tmp_path / "w", cfg, False))
    layers = json.loads((tmp_path / "s" / CONFIG_FILE).read_text())["layers"]
    assert {"model.embed_tokens", "lm_head"} <= set(layers)


@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_streamed_equals_whole_norm_weighted_families(tmp_path, default_tokenizer, family) -> None:
    """Qwen3 (per-head q/k norms, untied head) and Gemma 3 (post-norms, embedding scale, local and global
    RoPE tables, sliding windows): non-persistent buffers are computed as transformers does."""
    if family == "qwen3":
        model = make_tiny_qwen3_dir(tmp_path / family, default_tokenizer, tied=False)
    else:
        model = make_tiny_gemma3_dir(tmp_path / family, default_tokenizer)
    assert_same_tensors(run(model, tmp_path / "s", BASE, True), run(model, tmp_path / "w", BASE, False))


def test_streamed_resume_equals_uninterrupted(tmp_path, norms_llama) -> None:
    """Killed after block 0's solve, the streamed run resumes (the finished block's norms and biases read
    again) to the tensors of an uninterrupted whole-model run."""
    cfg = dataclasses.replace(BASE, rotate="hadamard")
    whole = run(norms_llama, tmp_path / "w", cfg, False)
    out = tmp_path / "s"
    args = ("quantize", str(norms_llama), "--method", "turboboa", "--bits", "3", "--group-size", "32",
            "--nsamples", "4", "--seqlen", "64", "--rotate", "hadamard", "--device", "cpu", "-q", "-o", str(out))
    killed = run_cli(*args, kill_at="solve:1")
    assert killed.returncode != 0 and work_dir(out).is_dir() and not out.exists()
    done = run_cli(*args, "--resume")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / CONFIG_FILE).read_text())["timings"]["resumed_from_block"] == 1
    assert_same_tensors(out, whole)


def test_streamed_skeleton_reads_only_the_tables(norms_llama) -> None:
    """Opened, a streamed model holds its embedding and final norm; every block weight and the untied head
    stay on the meta device until read, and a read block is the saved one."""
    from transformers import AutoModelForCausalLM

    loaded = load_streamed(str(norms_llama), get_adapter)
    assert loaded is not None and loaded.streamed is not None
    model = loaded.model
    blocks = get_adapter(model).blocks(model)
    assert all(p.is_meta for p in blocks.parameters())
    assert not model.get_input_embeddings().weight.is_meta
    reference = AutoModelForCausalLM.from_pretrained(norms_llama, dtype=torch.float32)
    block = loaded.streamed.load_block(1)
    for name, t in block.state_dict().items():
        assert torch.equal(t, reference.model.layers[1].state_dict()[name]), name
    loaded.streamed.release_block(1)
    assert block.self_attn.q_proj.weight.is_meta and not block.self_attn.q_proj.bias.is_meta
