"""NPU backends in ``turboboa check``: Qualcomm's QNN HTP (emulated on x86_64) and OpenVINO, on a slice of
the windows.

HTP emulation is slow (about a minute per 128-token window of a 135M model on two cores), so the NPU
backends score only the first ``npu_windows`` windows; their PPL gap, KL and top-1 are taken against the
fake-quant model on that same slice (the row ``fake-quant (NPU slice)``). Besides the gap, the checks are:

* ``qnn-htp``: every node on the NPU (``npu_share == 1``; with ``allow_fallback`` the share and the
  fallen-back nodes are reported, not failed), and, when the export's EPContext model is there
  (``<name>_ctx.onnx``), its logits on the first window equal the uncompiled graph's exactly;
* ``openvino`` on an IR: every quantized weight is an integer constant (:mod:`exporters.openvino.check`).

``localize``: :func:`runtime_check.localize.localize` on the first window, per block, on each NPU backend.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exporters.openvino.check import checkpoint_weights, compressed_weight_types
from turboboa.errors import UserError

from .backends import Backend
from .localize import localize
from .openvinort import openvino_logits_fn, read_ov_model
from .qnn import load_context_model, open_qnn_session, qnn_logits_fn

QNN, OPENVINO = "qnn-htp", "openvino"
NPU_BACKENDS = (QNN, OPENVINO)


@dataclass
class NpuResults:
    """The NPU part of a check: its entries of the verdict, and ``--localize``'s rows per backend."""

    checks: list[dict[str, Any]]
    localize: dict[str, list[dict[str, Any]]]


def parse_npu(value: str | None) -> tuple[str, ...]:
    """``"qnn-htp,openvino"`` -> ``("qnn-htp", "openvino")``; an unknown name is a one-line UserError."""
    names = tuple(n.strip() for n in (value or "").split(",") if n.strip())
    for n in names:
        if n not in NPU_BACKENDS:
            raise UserError(f"unknown --npu backend {n!r}; choose qnn-htp and/or openvino (comma-separated)")
    return names


def open_npu(name: str, onnx: Path | None, openvino_ir: Path | None, seqlen: int, windows: int, threads: int,
             allow_fallback: bool, stack: ExitStack) -> Backend:
    """The NPU backend ``name`` on the exported graph (``openvino`` prefers the IR), limited to ``windows``."""
    if name == QNN:
        if onnx is None:
            raise UserError("--npu qnn-htp runs the ONNX file: pass --onnx (exported with --profile qnn-htp)")
        fn = stack.enter_context(qnn_logits_fn(onnx, threads=threads, allow_fallback=allow_fallback))
        path = onnx
    else:
        path = openvino_ir or onnx
        if path is None:
            raise UserError("--npu openvino runs an OpenVINO IR (--openvino FILE.xml) or the --onnx file")
        fn = stack.enter_context(openvino_logits_fn(path, threads=threads))
    fn.check_length(seqlen)
    backend = Backend(name, fn, {"file": str(path), **fn.describe()}, max_windows=windows, keep_first=True)
    backend.runtime = fn
    return backend


def context_check(onnx: Path, context: Path, qnn: Backend, window: torch.Tensor, threads: int) -> dict[str, Any]:
    """Load the EPContext model ``context`` on the HTP, run the first window, and compare its logits with the
    uncompiled graph's (kept by the ``qnn`` backend): the check's entry (max |difference|, must be 0)."""
    session = load_context_model(context, threads=threads)
    (logits,) = session.run(["logits"], {"input_ids": window[None].numpy()})
    diff = float((torch.from_numpy(logits[0]) - qnn.first_logits).abs().max())
    return {"check": f"qnn-htp EPContext model ({context.name}) logits == uncompiled graph's", "value": diff,
            "limit": 0.0, "passed": diff == 0.0, "kind": "exact", "build_seconds": round(session.build_seconds, 3)}


def npu_checks(backends: list[Backend], rows: dict[str, dict[str, Any]], tols: dict[str, float],
               allow_fallback: bool) -> list[dict[str, Any]]:
    """The gap and NPU-share checks of the NPU backends that ran."""
    checks = []
    for b in backends:
        if b.name not in NPU_BACKENDS or b.logits is None:
            continue
        gap = rows[b.name]["gap"]
        checks.append({"check": f"{b.name} |PPL gap| on the NPU slice", "value": gap, "limit": tols[b.name],
                       "passed": gap is not None and abs(gap) <= tols[b.name], "kind": "gap"})
        if b.name == QNN:
            share = float(b.settings.get("npu_share", 0.0))
            checks.append({"check": "qnn-htp nodes on the NPU", "value": share, "limit": 1.0, "kind": "share",
                           "passed": share == 1.0 or allow_fallback,
                           "fallback_nodes": b.settings.get("fallback_nodes", [])})
    return checks


def openvino_weight_check(ir: Path, ckpt: Any) -> dict[str, Any]:
    """Every quantized layer of ``ckpt`` one integer constant in the OpenVINO IR ``ir`` (its check entry)."""
    import openvino as ov

    model, _ = read_ov_model(ov.Core(), ir)
    entry: dict[str, Any] = {"check": "openvino IR weights are integer constants", "limit": 0.0, "kind": "exact"}
    try:
        types = compressed_weight_types(model, checkpoint_weights(ckpt))
    except UserError as e:
        return {**entry, "value": 1.0, "passed": False, "error": str(e)}
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {**entry, "value": 0.0, "passed": True, "types": counts}


def localize_rows(backends: list[Backend], onnx: Path, ckpt: Any, window: torch.Tensor, threads: int,
                  allow_fallback: bool) -> dict[str, list[dict[str, Any]]]:
    """Per NPU backend that ran, the block-by-block comparison with the fake-quant model on ``window``."""
    out = {}
    for b in backends:
        if b.name == QNN and b.logits is not None:
            out[b.name] = localize(onnx, ckpt, window,
                                   lambda p: open_qnn_session(p, allow_fallback=allow_fallback, threads=threads))
    return out
