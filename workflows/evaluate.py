"""``turboboa eval``: the perplexity of any target, in the runtime that runs it.

A model spec or a QDIR runs in torch (:func:`turboboa.eval.evaluate.evaluate`); a ``.gguf`` file in llama.cpp; an
exported graph (``.onnx``, or an OpenVINO ``.xml`` IR) in onnxruntime, the emulated QNN HTP or OpenVINO. The
tokens always come from a Hugging Face tokenizer, so every runtime scores the same windows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime_check.llamacpp import gguf_logits_fn, gguf_tokenizer_mismatch, validate_gguf
from runtime_check.onnxrt import onnx_logits_fn, validate_onnx
from runtime_check.openvinort import openvino_logits_fn
from runtime_check.qnn import qnn_logits_fn
from turboboa.data import eval_tokens, resolve_text
from turboboa.errors import UserError
from turboboa.eval.evaluate import evaluate as evaluate_torch
from turboboa.eval.perplexity import PerplexityResult, make_windows, perplexity

BACKENDS = ("auto", "torch", "llama.cpp", "onnxruntime", "ort", "qnn-htp", "openvino")
GRAPH_RUNTIMES = ("onnxruntime", "qnn-htp", "openvino")


def is_gguf_file(target: str) -> bool:
    return str(target).endswith(".gguf") and Path(target).is_file()


def is_openvino_ir(target: str) -> bool:
    return str(target).endswith(".xml") and Path(target).is_file()


def is_onnx_file(target: str) -> bool:
    return str(target).endswith(".onnx")


def gguf_tokenizer(path: Path) -> Any:
    """The Hugging Face tokenizer that transformers builds from a GGUF file's tokenizer metadata."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many types on foreign tokenizer metadata
        raise UserError(f"cannot build a tokenizer from the metadata of {path} "
                        f"({' '.join(str(e).split())[:200]}); pass --tokenizer with a tokenizer folder or QDIR") from None


def evaluate(target: str, data: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
             device: str = "auto", progress: bool = True, backend: str = "auto",
             tokenizer: str | None = None, threads: int | None = None, rotate: str = "none",
             rotate_seed: int = 0, dynamic: dict[str, int] | None = None) -> PerplexityResult:
    """Perplexity of ``target`` on ``data``'s evaluation text, non-overlapping windows of ``seqlen`` tokens.

    ``target``: a model spec or QDIR (torch, :func:`turboboa.eval.evaluate.evaluate`), a ``.gguf`` file, which
    ``backend`` "auto" runs in llama.cpp ("torch" reads it with transformers instead), an ``.onnx`` file,
    run in onnxruntime (``ort``), the emulated QNN HTP (``qnn-htp``) or OpenVINO (``openvino``), or an
    OpenVINO ``.xml`` IR. The tokens come from ``tokenizer`` (a folder or QDIR), else the model's own (for a
    GGUF file, the one transformers builds from its metadata; for an ONNX file, the one recorded at export).
    """
    if seqlen < 2:
        raise UserError("--seqlen must be >= 2")
    if backend not in BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; choose {', '.join(BACKENDS[:-1])} or {BACKENDS[-1]}")
    if backend == "llama.cpp" and not is_gguf_file(target):
        raise UserError(f"--backend llama.cpp runs a .gguf file; {target} is not one")
    backend = "onnxruntime" if backend == "ort" else backend
    graph = is_onnx_file(target) or is_openvino_ir(target)
    if backend in GRAPH_RUNTIMES and not graph:
        raise UserError(f"--backend {backend} runs an exported graph (.onnx, or .xml for openvino); {target} is "
                        f"not one")
    if graph and backend not in ("auto", *GRAPH_RUNTIMES):
        raise UserError(f"{target} is an exported graph; evaluate it with --backend onnxruntime (ort), qnn-htp or openvino")
    if is_openvino_ir(target) and backend not in ("auto", "openvino"):
        raise UserError(f"{target} is an OpenVINO IR; evaluate it with --backend openvino (or auto)")
    if (rotate != "none" or dynamic) and (graph or is_gguf_file(target)):
        raise UserError(f"--rotate, --act-bits and --kv-bits apply to torch models; {target} is an exported file")
    if graph:
        runtime = backend if backend != "auto" else ("openvino" if is_openvino_ir(target) else "onnxruntime")
        return evaluate_graph(Path(target), data, seqlen, max_windows, progress, tokenizer, threads, runtime)
    if is_gguf_file(target) and backend != "torch":
        return evaluate_gguf(Path(target), data, seqlen, max_windows, progress, tokenizer, threads)
    return evaluate_torch(target, data, seqlen, max_windows, device, progress, tokenizer, rotate, rotate_seed,
                        dynamic)


def graph_logits_fn(path: Path, runtime: str, threads: int | None = None, allow_fallback: bool = False) -> Any:
    """The logits function of an exported graph (``.onnx``, or an OpenVINO ``.xml`` IR) in ``runtime``:
    onnxruntime CPU, the QNN HTP backend (emulated on x86_64; ``allow_fallback`` lets nodes HTP rejects run
    on the CPU) or OpenVINO's CPU plugin."""
    if runtime == "qnn-htp":
        return qnn_logits_fn(path, threads=threads, allow_fallback=allow_fallback)
    if runtime == "openvino":
        return openvino_logits_fn(path, threads=threads)
    return onnx_logits_fn(path, threads=threads)


def evaluate_graph(path: Path, data: str, seqlen: int, max_windows: int | None, progress: bool,
                   tokenizer: str | None = None, threads: int | None = None,
                   runtime: str = "onnxruntime") -> PerplexityResult:
    """Perplexity of an exported decoder graph in ``runtime`` (:func:`graph_logits_fn`; onnxruntime keeps
    float activations: see :mod:`runtime_check.onnxrt`) on the windows of its recorded tokenizer (or
    ``tokenizer``); the runtime's settings are in ``extra[runtime]``."""
    from transformers import AutoTokenizer

    if path.suffix == ".onnx":
        validate_onnx(path)
    with graph_logits_fn(path, runtime, threads) as fn:
        fn.check_length(seqlen)
        folder = fn.tokenizer(tokenizer)
        tok = AutoTokenizer.from_pretrained(folder)
        windows = make_windows(eval_tokens(tok, data), seqlen, max_windows)
        result = perplexity(fn, windows, runtime, progress=progress)
        result.extra[runtime] = fn.describe()
        activations = fn.metadata.get("turboboa.activations", "none")
        if activations != "none":  # static activation quantization in the graph
            result.extra["activations"] = json.loads(activations)
        result.extra["tokenizer"] = folder
    return result


def evaluate_gguf(path: Path, data: str, seqlen: int, max_windows: int | None, progress: bool,
                  tokenizer: str | None = None, threads: int | None = None) -> PerplexityResult:
    """Perplexity of a GGUF file in llama.cpp on the HF tokenizer's windows, plus how many of the evaluation
    tokens llama.cpp's own tokenizer would split differently (``extra["tokenizer_mismatch"]``)."""
    validate_gguf(path)
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
