"""The Python API behind the CLI: ``quantize`` a model into a QDIR and ``evaluate`` a model or QDIR."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoint import is_qdir, load_fakequant_model, load_qdir, save_qdir
from .config import QuantConfig
from .data import calibration_batch, eval_tokens
from .errors import UserError
from .eval.perplexity import PerplexityResult, make_windows, perplexity, torch_logits_fn
from .models import load_float_model
from .pipeline import check_group_size, quantize_model, select_device


@dataclass
class QuantizeSummary:
    output: Path
    layers: int
    seconds: float
    peak_memory: int
    source: str

    def line(self, cfg: QuantConfig) -> str:
        g = "per-channel" if cfg.group_size <= 0 else f"g{cfg.group_size}"
        grid = f"w{cfg.bits} {g}" if cfg.format == "int" else f"format {cfg.format}"
        if cfg.preset:
            grid = f"preset {cfg.preset}"
        return (f"quantized {self.layers} layers with {cfg.method} {grid} in {self.seconds:.1f} s, "
                f"peak memory {self.peak_memory / 2**30:.2f} GiB -> {self.output}")


def check_output_location(output: Path) -> None:
    """The output must be creatable: its parent writable, and the path not an unrelated existing file/folder."""
    parent = output.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise UserError(f"cannot write to {parent}: permission denied; choose another -o location")
    if output.exists() and (output.is_file() or (any(output.iterdir()) and not is_qdir(output))):
        raise UserError(f"{output} exists and is not a turboboa QDIR; choose another -o location or remove it")


def quantize(model: str, cfg: QuantConfig, output: str | os.PathLike, device: str = "auto",
             progress: bool = True) -> QuantizeSummary:
    """Quantize ``model`` with ``cfg`` and write the QDIR ``output`` (atomically: nothing half-written)."""
    t0 = time.time()
    output = Path(output)
    check_output_location(output)
    dev = select_device(device)
    loaded = load_float_model(model)
    from .arch import get_adapter

    padding = None
    if cfg.pad_to:
        from .models.padding import pad_model

        padding = pad_model(loaded.model, cfg.pad_to)
    check_group_size(loaded.model, get_adapter(loaded.model), cfg)
    calib = calibration_batch(loaded.tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed)
    torch.manual_seed(cfg.seed)
    result = quantize_model(loaded.model, calib, cfg, dev, progress=progress)
    meta: dict[str, Any] = {
        "source": loaded.source,
        "model": model,
        "calibration": {"data": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed,
                        "tokens": int(calib.numel())},
        "device": str(dev),
        "padding": padding,
        "timings": {"quantize_seconds": round(result.seconds, 3),
                    "block_seconds": [round(s, 3) for s in result.block_seconds],
                    "peak_memory_bytes": result.peak_memory},
    }
    save_qdir(output, loaded.model, loaded.tokenizer, result.layers, cfg, meta)
    return QuantizeSummary(output, len(result.layers), time.time() - t0, result.peak_memory, loaded.source)


def load_for_eval(target: str) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, backend name) for a QDIR (fake-quant torch model) or a float model spec."""
    if is_qdir(target):
        from transformers import AutoTokenizer

        ckpt = load_qdir(target)
        return load_fakequant_model(ckpt), AutoTokenizer.from_pretrained(target), "torch-fakequant"
    loaded = load_float_model(target)
    return loaded.model, loaded.tokenizer, "torch-float"


def is_gguf_file(target: str) -> bool:
    return str(target).endswith(".gguf") and Path(target).is_file()


def gguf_tokenizer(path: Path) -> Any:
    """The Hugging Face tokenizer that transformers builds from a GGUF file's tokenizer metadata."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def is_onnx_file(target: str) -> bool:
    return str(target).endswith(".onnx")


BACKENDS = ("auto", "torch", "llama.cpp", "onnxruntime")


def evaluate(target: str, data: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
             device: str = "auto", progress: bool = True, backend: str = "auto",
             tokenizer: str | None = None, threads: int | None = None) -> PerplexityResult:
    """Perplexity of ``target`` on ``data``'s evaluation text, non-overlapping windows of ``seqlen`` tokens.

    ``target``: a model spec (float torch model), a QDIR (fake-quant torch model), a ``.gguf`` file, which
    ``backend`` "auto" runs in llama.cpp ("torch" reads it with transformers instead), or an ``.onnx`` file,
    run in onnxruntime. The tokens always come from a Hugging Face tokenizer: ``tokenizer`` (a folder or
    QDIR), else the model's own (for a GGUF file, the one transformers builds from its metadata; for an ONNX
    file, the one recorded at export), so every backend scores the same windows.
    """
    if seqlen < 2:
        raise UserError("--seqlen must be >= 2")
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; choose {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    if backend == "llama.cpp" and not is_gguf_file(target):
        raise UserError(f"--backend llama.cpp runs a .gguf file; {target} is not one")
    if backend == "onnxruntime" and not is_onnx_file(target):
        raise UserError(f"--backend onnxruntime runs an .onnx file; {target} is not one")
    if is_onnx_file(target) and backend not in ("auto", "onnxruntime"):
        raise UserError(f"{target} is an ONNX file; evaluate it with --backend onnxruntime (or auto)")
    if is_onnx_file(target):
        return evaluate_onnx(Path(target), data, seqlen, max_windows, progress, tokenizer, threads)
    if is_gguf_file(target) and backend != "torch":
        return evaluate_gguf(Path(target), data, seqlen, max_windows, progress, tokenizer, threads)
    dev = select_device(device)
    model, tok, name = load_for_eval(target)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    windows = make_windows(eval_tokens(tok, data), seqlen, max_windows)
    model.to(dev)
    return perplexity(torch_logits_fn(model, dev), windows, name, progress=progress)


def evaluate_onnx(path: Path, data: str, seqlen: int, max_windows: int | None, progress: bool,
                  tokenizer: str | None = None, threads: int | None = None) -> PerplexityResult:
    """Perplexity of an exported ONNX decoder in onnxruntime (CPU, float activations: see
    :mod:`runtime_check.onnxrt`) on the windows of its recorded tokenizer (or ``tokenizer``); the session
    settings used are in ``extra["onnxruntime"]``."""
    from transformers import AutoTokenizer

    from runtime_check.onnxrt import onnx_logits_fn

    with onnx_logits_fn(path, threads=threads) as fn:
        fn.check_length(seqlen)
        folder = fn.tokenizer(tokenizer)
        tok = AutoTokenizer.from_pretrained(folder)
        windows = make_windows(eval_tokens(tok, data), seqlen, max_windows)
        result = perplexity(fn, windows, "onnxruntime", progress=progress)
        result.extra["onnxruntime"] = fn.describe()
        result.extra["tokenizer"] = folder
    return result


def evaluate_gguf(path: Path, data: str, seqlen: int, max_windows: int | None, progress: bool,
                  tokenizer: str | None = None, threads: int | None = None) -> PerplexityResult:
    """Perplexity of a GGUF file in llama.cpp on the HF tokenizer's windows, plus how many of the evaluation
    tokens llama.cpp's own tokenizer would split differently (``extra["tokenizer_mismatch"]``)."""
    from runtime_check.llamacpp import gguf_logits_fn, gguf_tokenizer_mismatch

    from .data import resolve_text

    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    else:
        tok = gguf_tokenizer(path)
    ids = eval_tokens(tok, data)
    windows = make_windows(ids, seqlen, max_windows)
    with gguf_logits_fn(path, n_ctx=seqlen, threads=threads) as fn:
        result = perplexity(fn, windows, "llama.cpp", progress=progress)
    text, _ = resolve_text(data, "eval")
    mismatch = gguf_tokenizer_mismatch(path, text, ids)
    result.extra["tokenizer_mismatch"] = {"hf_tokens": mismatch.hf_tokens, "gguf_tokens": mismatch.gguf_tokens,
                                          "differing": mismatch.differing, "share": round(mismatch.share, 6)}
    return result
