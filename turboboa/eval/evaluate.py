"""The perplexity of a torch model: a float model spec or a QDIR's fake-quant model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..activations.dynamic import DynamicSpec, check_dynamic_bits
from ..blockwise import select_device
from ..checkpoint import (
    is_qdir,
    load_fakequant_model,
    load_qdir,
    read_meta,
)
from ..data import eval_tokens
from ..errors import UserError
from ..models import load_float_model
from ..rotation import rotate_model
from .perplexity import PerplexityResult, make_windows, perplexity, torch_logits_fn


def load_for_eval(target: str, rotate: str = "none", rotate_seed: int = 0,
                  dynamic: dict[str, int] | None = None) -> tuple[torch.nn.Module, Any, str]:
    """(model, tokenizer, backend name) for a QDIR (fake-quant torch model) or a float model spec (``rotate``:
    with its norms folded and that rotation fused, :func:`turboboa.rotation.rotate_model`). ``dynamic``
    (``act_bits``/``kv_bits``): simulate a QDIR's weights under these per-token activation widths instead of
    its own."""
    if is_qdir(target):
        from transformers import AutoTokenizer

        if rotate != "none":
            raise UserError(f"--rotate applies to a float model; the QDIR {target} holds its own rotation")
        ckpt = load_qdir(target)
        spec = None
        if dynamic:
            import dataclasses

            spec = DynamicSpec.from_config(ckpt.config)
            spec = dataclasses.replace(spec, act_bits=dynamic.get("act_bits") or spec.act_bits,
                                       kv_bits=dynamic.get("kv_bits") or spec.kv_bits)
            check_dynamic_bits(spec.act_bits, spec.kv_bits)
        return load_fakequant_model(ckpt, dynamic=spec), AutoTokenizer.from_pretrained(target), "torch-fakequant"
    if dynamic:
        raise UserError("--act-bits/--kv-bits on eval simulate a QDIR's activations; quantize the model first")
    loaded = load_float_model(target)
    if rotate != "none":
        rotate_model(loaded.model, rotate, rotate_seed)
        return loaded.model, loaded.tokenizer, f"torch-float-rotated-{rotate}"
    return loaded.model, loaded.tokenizer, "torch-float"


def evaluate(target: str, data: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
             device: str = "auto", progress: bool = True, tokenizer: str | None = None, rotate: str = "none",
             rotate_seed: int = 0, dynamic: dict[str, int] | None = None) -> PerplexityResult:
    """Perplexity of the torch model ``target`` on ``data``'s evaluation text, non-overlapping windows of
    ``seqlen`` tokens: ``exp(-(1/T) sum_t log p(x_t | x_<t))`` over every predicted token of the windows.

    ``target``: a model spec (the float model; a ``.gguf`` file is read by transformers), or a QDIR (its
    fake-quant model). ``rotate``: a float model with that rotation fused (function-preserving: the PPL must
    equal the float PPL up to float rounding). ``dynamic`` (``act_bits``/``kv_bits``): a QDIR's weights under
    these per-token activation widths. The tokens come from ``tokenizer`` (a folder or QDIR), else the
    model's own. Exported files in their runtimes: :func:`workflows.evaluate.evaluate`.
    """
    if seqlen < 2:
        raise UserError("--seqlen must be >= 2")
    dev = select_device(device)
    model, tok, name = load_for_eval(target, rotate, rotate_seed, dynamic)
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
    windows = make_windows(eval_tokens(tok, data), seqlen, max_windows)
    model.to(dev)
    result = perplexity(torch_logits_fn(model, dev), windows, name, progress=progress)
    meta = read_meta(Path(target)) if is_qdir(target) else {}
    if meta.get("activations"):
        summary = dict(meta["activations"])
        summary.pop("file", None)
        result.extra["activations"] = summary  # simulated by the fake-quant model
    if meta.get("dynamic_activations") or (meta and dynamic):
        summary = dict(meta.get("dynamic_activations") or {})
        summary.update({k: v for k, v in (dynamic or {}).items() if v})
        result.extra["dynamic_activations"] = summary
    return result
