"""Shared fixtures: tiny random Llama folders (with the default model's tokenizer) for fast end-to-end runs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from turboboa.arch.llama import LlamaAdapter

ROOT = Path(__file__).resolve().parents[1]
EMBEDDING = LlamaAdapter.LAYOUT.embedding  # the tiny Llamas' module names
HEAD = LlamaAdapter.LAYOUT.head


def make_tiny_llama(path: Path, tokenizer, *, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                    layers: int = 2, intermediate: int = 128, seed: int = 0, model_type: str = "llama",
                    **config_options: object) -> Path:
    """A random Llama-family model (``model_type`` llama, mistral or qwen2; ``config_options`` go to its
    config) saved as a Hugging Face folder, with a real tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(seed)
    cls = {"qwen2": Qwen2Config, "mistral": MistralConfig}.get(model_type, LlamaConfig)
    config = cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 max_position_embeddings=2048, **{"tie_word_embeddings": True, **config_options})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_tiny_opt(path: Path, tokenizer, *, hidden: int = 64, heads: int = 4, layers: int = 2, ffn: int = 128,
                  seed: int = 0) -> Path:
    """A random pre-norm OPT (LayerNorm with bias, learned positions, ReLU MLP, tied head) saved as a Hugging
    Face folder, with a real tokenizer; norms and biases random too, so every one of them matters."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_attention_heads=heads,
                       num_hidden_layers=layers, ffn_dim=ffn, word_embed_proj_dim=hidden,
                       max_position_embeddings=2048, tie_word_embeddings=True)
    model = OPTForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.02 * torch.randn_like(param))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_with_random_norms(cls, config, path: Path, tokenizer, norm_offset: float) -> Path:
    """``cls(config)`` built under seed 0, every norm weight set to ``norm_offset + 0.2 N(0, 1)`` (so a norm left
    out or applied twice shows), saved as a Hugging Face folder with ``tokenizer``."""
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(norm_offset + 0.2 * torch.randn_like(param))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_tokenizer():
    from turboboa.models import load_float_model

    return load_float_model().tokenizer


@pytest.fixture(scope="session")
def text_windows(default_tokenizer) -> list[torch.Tensor]:
    """Two WikiText-2 test windows, of 64 and 17 tokens (two lengths through one dynamic graph)."""
    from turboboa.data import eval_tokens

    ids = eval_tokens(default_tokenizer, "wikitext2")
    return [ids[:64], ids[64:81]]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama", default_tokenizer)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, default_tokenizer) -> Path:
    return make_tiny_opt(tmp_path_factory.mktemp("tiny") / "tiny-opt", default_tokenizer)


def run_cli(*args: str, cwd: Path | None = None, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """Run the ``turboboa`` command in a fresh process (as a user would); ``kill_at``: the process SIGKILLs
    itself at that point of its writes (``TURBOBOA_KILL_AT``, :func:`turboboa.output_files.kill_point`)."""
    from turboboa.output_files import KILL_ENV

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop(KILL_ENV, None)
    if kill_at is not None:
        env[KILL_ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=1800)


def run_main(*args: str, capsys) -> subprocess.CompletedProcess:
    """The ``turboboa`` command in this process (``cli.main``, faster than :func:`run_cli`): its exit code and
    captured output as a CompletedProcess, for :func:`assert_one_line_error`."""
    import cli

    capsys.readouterr()
    try:
        cli.main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["turboboa", *args], code, out.out, out.err)


@pytest.fixture
def cli_main(capsys) -> Callable[..., subprocess.CompletedProcess]:
    """:func:`run_main` bound to this test's ``capsys``: ``cli_main("check", qdir)``. For refusals, which need
    no fresh process; the commands that compute run through :func:`run_cli`."""
    return lambda *args: run_main(*args, capsys=capsys)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """The command failed as bad input should: exit code 2, one ``error:`` line on stderr naming ``words``."""
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def onnx_vs_fake_quant(path: Path, qdir: Path, seqlen: int = 256, windows: int = 2):
    """``turboboa eval model.onnx --json`` and the fake-quant model of ``qdir`` on the same windows: the eval's
    JSON, the fake-quant ``PerplexityResult`` and the relative PPL gap (the same tokens asserted)."""
    import json

    from turboboa.eval.evaluate import evaluate as evaluate_torch

    r = run_cli("eval", str(path), "--seqlen", str(seqlen), "--max-windows", str(windows), "--json", "-q")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    ref = evaluate_torch(str(qdir), seqlen=seqlen, max_windows=windows, device="cpu", progress=False)
    assert got["backend"] == "onnxruntime" and got["tokens"] == ref.tokens
    return got, ref, abs(got["ppl"] / ref.ppl - 1)
