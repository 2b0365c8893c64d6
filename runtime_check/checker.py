"""``turboboa check``: do the exported GGUF / ONNX files compute what the QDIR's fake-quant model computes?

Two levels, both against the fake-quant torch model of the QDIR:

* weights: for every quantized tensor, ``max |exported dequantized weight - fake-quant weight|``
  (:func:`exporters.gguf.export.check_gguf_weights`, :func:`exporters.onnx.check.check_onnx_weights`); every
  one must be exactly 0, and a failing tensor is named;
* outputs: the float model (when its source is still available), the fake-quant model, llama.cpp and
  onnxruntime score the SAME token windows (:func:`~turboboa.eval.perplexity.make_windows` of the QDIR's
  tokenizer's ids; llama.cpp is fed those ids). Streamed window by window: each backend's logits of a window
  update its :class:`~runtime_check.metrics.StreamMetrics` (PPL, KL(p_fakequant || p_backend), top-1
  agreement) and are dropped, so memory holds one window's logits at a time.

Verdict: ``|PPL_llama.cpp / PPL_fakequant - 1| <= gguf_tol`` (llama.cpp rounds activations to 8-bit blocks
inside its quantized kernels, so by default the model family's ``GgufArch.kernel_tol``: :func:`default_gguf_tol`),
``|PPL_onnxruntime / PPL_fakequant - 1| <= onnx_tol`` (0.1%; 2% for a fully quantized ``qnn-htp`` graph,
:func:`default_onnx_tol`), and every weight difference 0. With ``gguf_graph`` the fake-quant weights are also
written as an F32 GGUF (:func:`exporters.gguf.export.export_fakequant_f32`, a temporary file beside the GGUF)
and scored in llama.cpp, whose float products leave its graph alone: ``|gap| <= graph_tol`` (0.1%).
:func:`check` returns the report as a JSON-ready dict whose ``passed`` is that verdict.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from exporters import size_summary
from exporters.gguf.export import check_gguf_weights, export_fakequant_f32
from exporters.onnx.check import check_onnx_weights
from exporters.onnx.export import qnn_context_path
from turboboa.arch import adapter_for_config
from turboboa.arch.base import GgufArch
from turboboa.blockwise import select_device
from turboboa.checkpoint import is_qdir, load_qdir, package_versions, source_parameters
from turboboa.data import eval_tokens
from turboboa.errors import UserError
from turboboa.eval.perplexity import make_windows

from .backends import (
    FAKEQUANT,
    FAKEQUANT_WEIGHTS,
    FLOAT,
    LLAMACPP,
    LLAMACPP_F32,
    ONNXRT,
    Backend,
    default_threads,
    logits_2d,
    open_fakequant,
    open_float,
    open_llamacpp,
    open_onnxrt,
    open_weights_only,
)
from .llamacpp import validate_gguf
from .metrics import Reference, StreamMetrics
from .npu import (
    NPU_BACKENDS,
    OPENVINO,
    QNN,
    NpuResults,
    context_check,
    localize_rows,
    npu_checks,
    open_npu,
    openvino_weight_check,
)
from .onnxrt import validate_onnx

FAKEQUANT_SLICE = "fake-quant (NPU slice)"
ONNX_TOL, QUANTIZED_GRAPH_ONNX_TOL = 0.001, 0.02
# float products on both sides: gemma-3-270m's fake-quant weights as an F32 GGUF score +0.0099% (KL 4.9e-6)
# from torch on 8 windows of 512 (bench/results/gemma-3-270m-run.md)
GRAPH_TOL = 0.001


@dataclass(frozen=True)
class CheckSettings:
    """Evaluation data and window size, tolerances (relative PPL gaps), threads and torch device."""

    data: str = "wikitext2"
    seqlen: int = 512
    max_windows: int | None = None
    gguf_tol: float | None = None
    onnx_tol: float | None = None
    gguf_graph: bool = False
    graph_tol: float = GRAPH_TOL
    threads: int | None = None
    device: str = "auto"
    npu: tuple[str, ...] = ()
    npu_windows: int = 4
    htp_tol: float = 0.02
    openvino_tol: float = 0.005
    allow_fallback: bool = False
    localize: bool = False

    def validate(self) -> None:
        """A :class:`UserError` for values no check can use."""
        if self.seqlen < 2:
            raise UserError(f"--seqlen must be at least 2 to predict a token, not {self.seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            raise UserError(f"--max-windows must be at least 1, not {self.max_windows}")
        if self.npu_windows < 1:
            raise UserError(f"--npu-windows must be at least 1, not {self.npu_windows}")
        for name, tol in (("--gguf-tol", self.gguf_tol), ("--onnx-tol", self.onnx_tol), ("--htp-tol", self.htp_tol),
                          ("--openvino-tol", self.openvino_tol), ("graph_tol", self.graph_tol)):
            if tol is not None and not tol >= 0:
                raise UserError(f"{name} must be a relative PPL gap >= 0 (0.01 = 1%), not {tol}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, not {self.threads}")


# --- weights ----------------------------------------------------------------------------------------------


def weight_diffs(kind: str, path: Path, ckpt: Any) -> dict[str, float]:
    """Per quantized tensor, max |exported dequantized - fake-quant| of the ``kind`` ("gguf" or "onnx") file
    ``path``; a file that does not hold this QDIR's tensors is a :class:`UserError`."""
    check_weights = check_gguf_weights if kind == "gguf" else check_onnx_weights
    try:
        return check_weights(path, ckpt)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a reader's own error types: the file is not this QDIR's export
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"cannot read the weights of {path} against {ckpt.path} ({detail}); it is not a {kind} "
                        f"file exported from this QDIR: export it again with turboboa export --to {kind}") from None


def weight_summary(path: Path, diffs: dict[str, float]) -> dict[str, Any]:
    """The weight-level result of one file: tensor count, largest difference, the failing tensors (any
    difference other than 0, NaN included) and every tensor's difference."""
    failing = {name: d for name, d in diffs.items() if not d == 0.0}
    finite = [d for d in diffs.values() if not math.isnan(d)]
    return {"file": str(path), "tensors": len(diffs), "max_abs_diff": max(finite, default=0.0),
            "failing": failing, "passed": not failing, "per_tensor": diffs}


# --- outputs ----------------------------------------------------------------------------------------------


def stream(backends: list[Backend], windows: torch.Tensor, progress: bool) -> dict[str, StreamMetrics]:
    """Score every window with every backend that runs (the fake-quant model first: it is the reference);
    return each backend's metrics. One window's logits are held at a time. Backends limited to the first
    ``max_windows`` windows (the NPU slice) skip the others, and the fake-quant model's metrics on that slice
    are kept as :data:`FAKEQUANT_SLICE`."""
    running = [b for b in backends if b.logits is not None]
    running.sort(key=lambda b: b.name != FAKEQUANT)
    metrics = {b.name: StreamMetrics() for b in running}
    limits = [b.max_windows for b in running if b.max_windows is not None]
    npu_slice = min(limits) if limits else 0
    if npu_slice:
        metrics[FAKEQUANT_SLICE] = StreamMetrics()
    bar = tqdm(total=windows.shape[0], desc=f"check [{', '.join(b.name for b in running)}]", unit="win",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for i, window in enumerate(windows):
            ref = None
            for b in running:
                if b.max_windows is not None and i >= b.max_windows:
                    continue
                start = time.perf_counter()
                logits = logits_2d(b, window)
                seconds = time.perf_counter() - start
                metrics[b.name].seconds += seconds
                if ref is None:  # the fake-quant model's window, first
                    ref = Reference.from_logits(logits)
                try:
                    metrics[b.name].update(logits, window, ref)
                except ValueError as e:
                    raise UserError(f"{b.name} does not compute this QDIR's model ({e})") from None
                if b.name == FAKEQUANT and i < npu_slice:
                    metrics[FAKEQUANT_SLICE].update(logits, window, ref)
                    metrics[FAKEQUANT_SLICE].seconds += seconds
                if b.keep_first and i == 0:
                    b.first_logits = logits
                del logits
            bar.update(1)
            bar.set_postfix_str(postfix(metrics))
    finally:
        bar.close()
    return metrics


def postfix(metrics: dict[str, StreamMetrics]) -> str:
    """The progress bar's running numbers: the fake-quant PPL and every other backend's gap to it."""
    ref = metrics[FAKEQUANT].ppl
    parts = [f"{FAKEQUANT} {ref:.3f}"]
    parts += [f"{name} {m.ppl / ref - 1:+.3%}" for name, m in metrics.items()
              if name not in (FAKEQUANT, FAKEQUANT_SLICE) and m.tokens]
    return ", ".join(parts)


def backend_row(b: Backend, metrics: dict[str, StreamMetrics]) -> dict[str, Any]:
    """One backend's line of the report: PPL, relative gap to the fake-quant PPL, mean KL (nats/token), top-1
    agreement, predicted tokens, seconds inside its logits calls, and its settings (or why it was skipped)."""
    row: dict[str, Any] = {"backend": b.name, "ppl": None, "gap": None, "kl": None, "top1": None, "tokens": 0,
                           "seconds": 0.0, "settings": b.settings, "skipped": b.skipped, "windows": None}
    m = metrics.get(b.name)
    if m is not None and m.tokens:
        sliced = b.max_windows is not None or b.name == FAKEQUANT_SLICE
        ref = metrics[b.reference or (FAKEQUANT_SLICE if sliced else FAKEQUANT)].ppl
        row.update(ppl=m.ppl, gap=m.ppl / ref - 1, kl=m.kl, top1=m.top1, tokens=m.tokens,
                   seconds=round(m.seconds, 3), slice=sliced)
    return row


# --- verdict ----------------------------------------------------------------------------------------------


FILE_BACKEND = {"gguf": LLAMACPP, "onnx": ONNXRT}


def verdict(rows: list[dict[str, Any]], weights: dict[str, dict[str, Any]], settings: CheckSettings
            ) -> list[dict[str, Any]]:
    """Every check with its value, limit and outcome: per exported file, its weights (all differences 0) and
    its backend's PPL gap (``|gap| <= tol``; a NaN gap fails)."""
    by_name = {r["backend"]: r for r in rows}
    tols = {"gguf": settings.gguf_tol, "onnx": settings.onnx_tol}
    checks = []
    for kind, w in weights.items():
        checks.append({"check": f"{kind} weights == fake-quant weights", "value": w["max_abs_diff"], "limit": 0.0,
                       "passed": w["passed"], "failing": list(w["failing"]), "kind": "exact"})
        checks.append(gap_check(by_name[FILE_BACKEND[kind]], tols[kind]))
    if LLAMACPP_F32 in by_name:
        checks.append(gap_check(by_name[LLAMACPP_F32], settings.graph_tol))
    return checks


def gap_check(row: dict[str, Any], tol: float | None) -> dict[str, Any]:
    """``|gap| <= tol`` for one backend's row (a NaN or missing gap fails)."""
    gap = row["gap"]
    return {"check": f"{row['backend']} |PPL gap|", "value": gap, "limit": tol,
            "passed": gap is not None and tol is not None and abs(gap) <= tol, "kind": "gap"}


# --- the check --------------------------------------------------------------------------------------------


def default_gguf_tol(hf_config: Any) -> float:
    """The llama.cpp tolerance of the model family of ``hf_config``: its ``GgufArch.kernel_tol`` (a family
    without a llama.cpp architecture has no GGUF file to check; it gets the class default)."""
    arch = adapter_for_config(hf_config).GGUF
    return arch.kernel_tol if isinstance(arch, GgufArch) else GgufArch.kernel_tol


def default_onnx_tol(onnx: Path | None) -> float:
    """:data:`ONNX_TOL` for a graph with float activations; :data:`QUANTIZED_GRAPH_ONNX_TOL` for a graph whose
    every tensor is quantized (``--profile qnn-htp``), where onnxruntime and the torch simulation compute
    the same function but their float rounding sends a few values across a rounding boundary of some point,
    and those flips compound over the blocks (1.1% of PPL measured on the default model, 4 x 128 tokens: the
    residual stream's 16-bit step reaches 0.4 where its massive activations set the range)."""
    if onnx is None:
        return ONNX_TOL
    return QUANTIZED_GRAPH_ONNX_TOL if validate_onnx(onnx).get("turboboa.profile") == "qnn-htp" else ONNX_TOL


def npu_results(backends: list[Backend], rows: list[dict[str, Any]], settings: CheckSettings, onnx: Path | None,
                ir: Path | None, context: Path | None, ckpt: Any, window: torch.Tensor, threads: int) -> NpuResults:
    """The NPU backends' checks (gap, share of nodes on the NPU, EPContext model, OpenVINO integer weights)
    and, with ``settings.localize``, the block-by-block comparison on ``window``."""
    by_name = {r["backend"]: r for r in rows}
    tols = {QNN: settings.htp_tol, OPENVINO: settings.openvino_tol}
    checks = npu_checks(backends, by_name, tols, settings.allow_fallback)
    qnn = next((b for b in backends if b.name == QNN and b.first_logits is not None), None)
    if qnn is not None and context is not None and onnx is not None:
        checks.append(context_check(onnx, context, qnn, window, threads))
    if ir is not None and OPENVINO in settings.npu:
        checks.append(openvino_weight_check(ir, ckpt))
    located = localize_rows(backends, onnx, ckpt, window, threads, settings.allow_fallback) \
        if settings.localize and onnx is not None else {}
    return NpuResults(checks, located)


def like_for_like(backends: list[Backend], ckpt: Any, device: Any, windows: int) -> None:
    """An OpenVINO backend that runs activations in float (a graph without them, or 16-bit quantizers its CPU
    plugin drops) is compared with the fake-quant model with float activations, added on the slice."""
    ov = next((b for b in backends if b.name == OPENVINO and b.runtime is not None), None)
    if ov is not None and ckpt.activations is not None and getattr(ov.runtime, "float_activations", False):
        backends.append(open_weights_only(ckpt, device, windows))
        ov.reference = FAKEQUANT_WEIGHTS


def npu_context(onnx: Path | None, given: str | Path | None, settings: CheckSettings) -> Path | None:
    """The EPContext model to load back: ``given``, else ``<onnx stem>_ctx.onnx`` when it exists (and
    qnn-htp runs); a given file that is missing is a UserError."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise UserError(f"--qnn-context file not found: {path}")
        if QNN not in settings.npu:
            raise UserError("--qnn-context is checked on the HTP: add --npu qnn-htp")
        return path
    if onnx is None or QNN not in settings.npu:
        return None
    path = qnn_context_path(onnx)
    return path if path.is_file() else None


def quantization_summary(ckpt: Any) -> dict[str, Any]:
    """How the QDIR was made: method, grid, formats per layer, calibration and source model."""
    cfg, meta = ckpt.config, ckpt.meta
    return {"method": cfg.method, "format": cfg.format, "bits": cfg.bits, "group_size": cfg.group_size,
            "sym": cfg.sym, "preset": cfg.preset, "embed_format": cfg.embed_format, "pad_to": cfg.pad_to,
            "layer_formats": sorted({q.fmt for q in ckpt.layers.values()}), "layers": len(ckpt.layers),
            "calibration": meta.get("calibration", {}), "model": meta.get("model"), "source": meta.get("source"),
            "activations": ckpt.activations.label() if ckpt.activations is not None else None,
            "versions": meta.get("versions", {})}


def check_inputs(qdir: Path, files: dict[str, Path]) -> None:
    """A :class:`UserError` for a missing QDIR, missing files or nothing to check."""
    if not is_qdir(qdir):
        raise UserError(f"{qdir} is not a turboboa QDIR (no quant_config.json); pass the folder the files were "
                        f"exported from")
    if not files:
        raise UserError("nothing to check: pass --gguf FILE and/or --onnx FILE (exported from the QDIR)")
    for kind, path in files.items():
        if not path.is_file():
            raise UserError(f"--{kind} file not found: {path}")
    if "gguf" in files:
        validate_gguf(files["gguf"], require_ours=True)
    if "onnx" in files:
        validate_onnx(files["onnx"], require_ours=True)


def check(qdir: str | Path, gguf: str | Path | None = None, onnx: str | Path | None = None,
          settings: CheckSettings | None = None, progress: bool = True, openvino: str | Path | None = None,
          qnn_context: str | Path | None = None) -> dict[str, Any]:
    """Compare the exported ``gguf`` and/or ``onnx`` files with the QDIR ``qdir`` (see the module docstring)
    and return the report: ``passed``, settings, per-backend metrics, weight results, runtime settings.

    ``settings.npu`` adds NPU backends on the first ``settings.npu_windows`` windows (:mod:`.npu`):
    ``qnn-htp`` runs the ``onnx`` file on the emulated HTP (and its EPContext model ``qnn_context``, by
    default ``<name>_ctx.onnx`` when it exists), ``openvino`` the IR ``openvino`` (else the ``onnx`` file)."""
    from transformers import AutoConfig, AutoTokenizer

    t0 = time.perf_counter()
    settings = settings or CheckSettings()
    settings.validate()
    qdir = Path(qdir)
    files = {kind: Path(p) for kind, p in (("gguf", gguf), ("onnx", onnx)) if p is not None}
    check_inputs(qdir, files)
    ir = Path(openvino) if openvino is not None else None
    if ir is not None and not ir.is_file():
        raise UserError(f"--openvino file not found: {ir}")
    context = npu_context(files.get("onnx"), qnn_context, settings)
    if settings.gguf_graph and "gguf" not in files:
        raise UserError("--gguf-graph scores the QDIR's weights in llama.cpp beside a GGUF file; give --gguf FILE")
    if settings.onnx_tol is None:
        settings = replace(settings, onnx_tol=default_onnx_tol(files.get("onnx")))
    if settings.gguf_tol is None:
        settings = replace(settings, gguf_tol=default_gguf_tol(AutoConfig.from_pretrained(qdir)))
    ckpt = load_qdir(qdir)
    weights = {kind: weight_summary(path, weight_diffs(kind, path, ckpt)) for kind, path in files.items()}
    windows = make_windows(eval_tokens(AutoTokenizer.from_pretrained(qdir), settings.data), settings.seqlen,
                           settings.max_windows)
    device = select_device(settings.device)
    threads = default_threads(settings.threads)
    with ExitStack() as stack:
        backends = [open_float(ckpt.meta, device), open_fakequant(ckpt, device)]
        if "gguf" in files:
            backends.append(open_llamacpp(files["gguf"], settings.seqlen, threads, stack))
        if settings.gguf_graph:
            folder = stack.enter_context(tempfile.TemporaryDirectory(dir=files["gguf"].parent, prefix=".f32-"))
            f32 = export_fakequant_f32(ckpt, Path(folder) / "fake-quant-f32.gguf", progress)
            backends.append(open_llamacpp(f32, settings.seqlen, threads, stack, name=LLAMACPP_F32))
        if "onnx" in files:
            backends.append(open_onnxrt(files["onnx"], settings.seqlen, threads, stack))
        for name in settings.npu:
            backends.append(open_npu(name, files.get("onnx"), ir, settings.seqlen, settings.npu_windows, threads,
                                     settings.allow_fallback, stack))
        like_for_like(backends, ckpt, device, settings.npu_windows)
        metrics = stream(backends, windows, progress)
        for b in backends:
            if b.runtime is not None:
                b.settings.update(b.runtime.describe())
        rows = [backend_row(b, metrics) for b in backends]
        if FAKEQUANT_SLICE in metrics:
            rows.insert(2, backend_row(Backend(FAKEQUANT_SLICE, None, max_windows=settings.npu_windows), metrics))
        checks = verdict(rows, weights, settings)
        npu = npu_results(backends, rows, settings, files.get("onnx"), ir, context, ckpt, windows[0], threads)
        checks += npu.checks
    return {
        "passed": all(c["passed"] for c in checks),
        "qdir": str(qdir),
        "files": {kind: str(p) for kind, p in files.items()},
        "sizes": {kind: size_summary(p, source_parameters(ckpt)) for kind, p in files.items()},
        "settings": {**asdict(settings), "threads": threads, "device": str(device), "windows": int(windows.shape[0]),
                     "tokens": int(windows.shape[0] * (windows.shape[1] - 1)), "tokenizer": str(qdir)},
        "quantization": quantization_summary(ckpt),
        "backends": rows,
        "weights": weights,
        "checks": checks,
        "runtime": {b.name: b.settings for b in backends
                    if b.name in (LLAMACPP, LLAMACPP_F32, ONNXRT, *NPU_BACKENDS)},
        "localize": npu.localize,
        "versions": package_versions(),
        "seconds": round(time.perf_counter() - t0, 3),
        "notes": [f"{b.name} skipped: {b.skipped}" for b in backends if b.skipped],
    }


__all__ = ["FAKEQUANT", "FLOAT", "CheckSettings", "check"]
