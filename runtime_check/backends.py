"""The backends ``turboboa check`` compares, each opened as a named ``logits_fn`` with the settings it ran under.

* ``float``: the QDIR's source model in torch (when it can still be loaded, else skipped with the reason);
* ``fake-quant``: the QDIR's fake-quant torch model, the reference every other backend is compared with;
* ``llama.cpp``: a GGUF file through :mod:`runtime_check.llamacpp` (llama.cpp's defaults: F16 KV cache);
* ``onnxruntime``: an ONNX file through :mod:`runtime_check.onnxrt` (its pinned session options).

All of them are fed the same token ids (the QDIR's Hugging Face tokenizer), window by window.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from runtime_check.llamacpp import gguf_logits_fn
from runtime_check.onnxrt import onnx_logits_fn
from turboboa.checkpoint import load_fakequant_model
from turboboa.errors import UserError
from turboboa.eval.perplexity import LogitsFn, torch_logits_fn
from turboboa.models import load_float_model

FLOAT, FAKEQUANT, LLAMACPP, ONNXRT = "float", "fake-quant", "llama.cpp", "onnxruntime"
FAKEQUANT_WEIGHTS = "fake-quant (weights only)"
LLAMACPP_F32 = "llama.cpp (F32 weights)"  # the fake-quant weights as an F32 GGUF: llama.cpp's graph alone


@dataclass
class Backend:
    """One runtime under test: ``logits`` maps ids ``(1, L)`` to logits ``(1, L, V)``; ``settings`` are what
    decide its numbers (for the report); ``skipped`` says why it did not run (``logits`` is then None).
    ``max_windows``: it scores only the first windows (the NPU slice); ``keep_first``: keep the first
    window's logits (``first_logits``); ``runtime``: the object behind ``logits`` (to describe it after the
    run); ``reference``: the row its PPL gap is taken against, when not the fake-quant model's."""

    name: str
    logits: LogitsFn | None
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None
    max_windows: int | None = None
    keep_first: bool = False
    first_logits: torch.Tensor | None = None
    runtime: Any = None
    reference: str | None = None


def default_threads(threads: int | None) -> int:
    """``threads``, or every CPU core."""
    return int(threads or max(1, os.cpu_count() or 1))


def open_float(meta: dict[str, Any], device: torch.device) -> Backend:
    """The QDIR's source model (``meta["model"]``, the spec it was quantized from) in torch, or a skipped
    backend naming why it cannot be loaded (a folder moved away, a hub id offline, ...)."""
    spec = meta.get("model")
    if not spec:
        return Backend(FLOAT, None, skipped="the QDIR records no source model")
    try:
        loaded = load_float_model(str(spec))
    except UserError as e:
        return Backend(FLOAT, None, {"model": spec}, skipped=f"source model unavailable: {e}")
    model = loaded.model.to(device).eval()
    return Backend(FLOAT, torch_logits_fn(model, device), {"model": spec, "source": loaded.source,
                                                          "device": str(device), "dtype": "float32"})


def open_fakequant(ckpt: Any, device: torch.device) -> Backend:
    """The QDIR's fake-quant torch model (activation encodings simulated when the QDIR has them). On the CPU
    its linear layers keep only their codes and dequantize at every window (``lazy``): the same logits, and
    the float model and the runtimes beside it do not need room for a second float copy of the weights."""
    model = load_fakequant_model(ckpt, lazy=device.type == "cpu").to(device)
    settings: dict[str, Any] = {"device": str(device), "dtype": "float32"}
    if ckpt.activations is not None:
        settings["activations"] = ckpt.activations.label()
    return Backend(FAKEQUANT, torch_logits_fn(model, device), settings)


def open_weights_only(ckpt: Any, device: torch.device, windows: int) -> Backend:
    """The QDIR's fake-quant model with float activations (its activation encodings off), on the NPU slice:
    the like-for-like reference of a backend that runs activations in float."""
    model = load_fakequant_model(ckpt, activations=False).to(device)
    return Backend(FAKEQUANT_WEIGHTS, torch_logits_fn(model, device),
                   {"device": str(device), "dtype": "float32", "activations": "float"}, max_windows=windows)


def open_llamacpp(path: Path, seqlen: int, threads: int, stack: ExitStack, name: str = LLAMACPP) -> Backend:
    """The GGUF file ``path`` in llama.cpp with a context of ``seqlen`` tokens (closed with ``stack``), as the
    backend ``name``."""
    from importlib.metadata import PackageNotFoundError, version

    fn = stack.enter_context(gguf_logits_fn(path, n_ctx=seqlen, threads=threads))
    try:
        package = version("llama-cpp-python")
    except PackageNotFoundError:
        package = "unknown"
    settings = {"file": str(path), "n_ctx": seqlen, "n_batch": min(512, seqlen), "n_threads": threads,
                "n_threads_batch": threads, "kv_cache": "f16 (llama.cpp default)", "logits_all": True,
                "llama_cpp_python": package}
    return Backend(name, fn, settings)


def open_onnxrt(path: Path, seqlen: int, threads: int, stack: ExitStack) -> Backend:
    """The ONNX file ``path`` in onnxruntime with the pinned session options (closed with ``stack``); a graph
    that cannot take windows of ``seqlen`` tokens is a :class:`UserError`."""
    import onnxruntime

    fn = stack.enter_context(onnx_logits_fn(path, threads=threads))
    fn.check_length(seqlen)
    return Backend(ONNXRT, fn, {"file": str(path), **fn.describe(), "onnxruntime": onnxruntime.__version__})


def logits_2d(backend: Backend, window: torch.Tensor) -> torch.Tensor:
    """The backend's logits ``(L, V)`` for one window ``(L,)``, on the CPU in float32."""
    assert backend.logits is not None
    logits = torch.as_tensor(backend.logits(window[None]))
    if logits.dim() != 3 or logits.shape[:2] != (1, window.numel()):
        raise ValueError(f"backend {backend.name!r} returned logits of shape {tuple(logits.shape)}, expected "
                         f"(1, {window.numel()}, vocab)")
    return logits[0].detach().to("cpu", torch.float32)

