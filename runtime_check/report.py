"""The check's report as files: ``report.json`` (the dict :func:`runtime_check.checker.check` returns),
``report.md`` (backend table, weight summary, verdict, settings) and ``report.png`` (PPL per backend).

Every file is written to a temporary name beside its target and renamed into place when complete.
``report.png`` needs matplotlib (installed by ``make venv`` with the dev extras); without it the PNG is left
out and ``report.md`` says so.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from turboboa.formats import get_format

JSON_NAME, MD_NAME, PNG_NAME = "report.json", "report.md", "report.png"
NO_MATPLOTLIB = "report.png not written: matplotlib is not installed (pip install matplotlib)"


def atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk and rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- markdown ---------------------------------------------------------------------------------------------


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def backend_table(report: dict[str, Any]) -> list[str]:
    """``backend | PPL | gap | KL | top-1 | tokens | seconds``, one row per backend (skipped ones say why)."""
    lines = ["| backend | PPL | gap to fake-quant | KL (nats/token) | top-1 | tokens | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["backends"]:
        if r["skipped"]:
            lines.append(f"| {r['backend']} | skipped: {r['skipped']} | | | | | |")
            continue
        if r["ppl"] is None:
            continue
        name = f"{r['backend']} ¹" if r.get("slice") and not r["backend"].startswith("fake-quant") else r["backend"]
        lines.append(f"| {name} | {r['ppl']:.4f} | {r['gap']:+.4%} | {r['kl']:.3g} | {r['top1']:.2%} | "
                     f"{r['tokens']} | {r['seconds']:.1f} |")
    sliced = [r for r in report["backends"] if r.get("slice")]
    if sliced:
        s = report["settings"]
        lines += ["", f"¹ on the NPU slice: the first {s['npu_windows']} windows of {s['seqlen']} tokens, compared "
                      f"with the fake-quant model on the same slice (its own row); a backend running activations "
                      f"in float is compared with the fake-quant model with float activations (weights only)."]
    return lines


def weight_lines(report: dict[str, Any]) -> list[str]:
    """One line per exported file: tensors checked, largest difference, failing tensors named."""
    lines = []
    for kind, size in report.get("sizes", {}).items():
        lines.append(f"* {kind} file: {size['mib']:.1f} MiB, {size['bits_per_weight']:.3f} bits per weight of the "
                     f"source model")
    for kind, w in report["weights"].items():
        if w["passed"]:
            lines.append(f"* {kind} (`{w['file']}`): {w['tensors']} quantized tensors, every |exported - "
                         f"fake-quant| = 0")
        else:
            worst = ", ".join(f"`{name}` ({diff:.3g})" for name, diff in list(w["failing"].items())[:10])
            more = f" and {len(w['failing']) - 10} more" if len(w["failing"]) > 10 else ""
            lines.append(f"* {kind} (`{w['file']}`): **{len(w['failing'])} of {w['tensors']} tensors differ**: "
                         f"{worst}{more}")
    return lines


def check_lines(report: dict[str, Any]) -> list[str]:
    """The verdict's checks, one line each."""
    lines = []
    for c in report["checks"]:
        mark = "pass" if c["passed"] else "FAIL"
        kind = c.get("kind", "exact" if c["limit"] == 0.0 else "gap")
        if kind == "share":
            value = f"{c['value']:.2%} of the nodes (must be 100%)"
            nodes = c.get("fallback_nodes") or []
            if nodes:
                value += f"; on the CPU: {', '.join(nodes[:20])}" + (f" and {len(nodes) - 20} more" if len(nodes) > 20 else "")
        elif c.get("types"):  # the OpenVINO IR's weight constants
            value = "every quantized layer one integer constant (" + ", ".join(
                f"{t} x{n}" for t, n in sorted(c["types"].items())) + ")"
        elif kind == "exact":
            value = c.get("error") or f"max difference {c['value']:.3g} (must be 0)"
        else:
            value = "no value" if c["value"] is None else f"{c['value']:+.4%} (limit ±{c['limit']:.2%})"
        lines.append(f"* {mark}: {c['check']}: {value}")
    return lines


def localize_lines(report: dict[str, Any]) -> list[str]:
    """``--localize``: per NPU backend, the distance from the fake-quant model after each block."""
    lines = []
    for backend, rows in (report.get("localize") or {}).items():
        lines += [f"{backend} vs the fake-quant model on the first window, after each block (relative L2 error; "
                  f"differences in quantization steps of that tensor):", "",
                  "| tensor | rel. error | max steps | mean steps |", "|---|---:|---:|---:|"]
        lines += [f"| {r['point']} | {r['rel_error']:.2e} | {r['max_steps']:.0f} | {r['mean_steps']:.2f} |"
                  for r in rows]
        lines.append("")
    return lines


def quantization_lines(q: dict[str, Any]) -> list[str]:
    """How the QDIR was made: method, grid, layer formats, calibration, source model."""
    calib = q.get("calibration") or {}
    grid = f"preset {q['preset']}" if q["preset"] else f"format {q['format']}"
    if get_format(q["format"]).configurable and not q["preset"]:
        grid += f" w{q['bits']} g{q['group_size']}" + (" sym" if q["sym"] else "")
    return [f"* quantization: {q['method']}, {grid}, layer formats {', '.join(q['layer_formats'])}"
            + (f", padded to {q['pad_to']}" if q["pad_to"] else "")
            + (f", activations {q['activations']}" if q["activations"] else ""),
            f"* calibration: {calib.get('data', '?')}, {calib.get('nsamples', '?')} samples x "
            f"{calib.get('seqlen', '?')} tokens, seed {calib.get('seed', '?')}",
            f"* source model: {q.get('source') or q.get('model')}"]


def settings_lines(report: dict[str, Any]) -> list[str]:
    """Calibration (from the QDIR), evaluation and runtime settings, and a run's steps and timings."""
    lines = quantization_lines(report["quantization"]) if report.get("quantization") else []
    s = report.get("settings")
    if s:
        lines += [f"* evaluation: {s['data']}, {s['windows']} windows of {s['seqlen']} tokens ({s['tokens']} "
                  f"predicted tokens), tokenizer of `{s['tokenizer']}`, torch on {s['device']}, {s['threads']} "
                  f"threads",
                  f"* tolerances: llama.cpp |PPL gap| <= {s['gguf_tol']:.2%}"
                  + (f", llama.cpp (F32 weights) <= {s['graph_tol']:.2%}" if s.get("gguf_graph") else "")
                  + f", onnxruntime <= {s['onnx_tol']:.2%}, weights exact"]
        if s.get("npu"):
            lines.append(f"* NPU backends {', '.join(s['npu'])} on the first {s['npu_windows']} windows; tolerances "
                         f"qnn-htp <= {s['htp_tol']:.2%}, openvino <= {s['openvino_tol']:.2%}; CPU fallback "
                         f"{'allowed' if s['allow_fallback'] else 'disabled'}")
    for name, opts in report.get("runtime", {}).items():
        shown = ", ".join(f"{k}={v}" for k, v in opts.items() if k != "file")
        lines.append(f"* {name}: {shown}")
    run = report.get("run")
    if run:
        steps = ", ".join(f"{step} {sec:.1f} s" for step, sec in run["seconds"].items())
        checked = f"; check {report['seconds']:.1f} s" if "seconds" in report else ""
        lines.append(f"* run: `{run['model']}`, exports {', '.join(run['exports'])}; {steps}{checked}")
    return lines


def render_markdown(report: dict[str, Any], png: bool) -> str:
    """``report.md``: verdict, backend table, weights, checks, settings and notes."""
    verdict = "PASSED" if report["passed"] else ("not checked" if report["passed"] is None else "FAILED")
    files = "".join(f", {kind} `{path}`" for kind, path in report.get("files", {}).items())
    lines = [f"# turboboa check: {verdict}", "", f"QDIR `{report['qdir']}`{files}."]
    if report.get("backends"):
        lines += ["", "## Backends (same token windows)", "", *backend_table(report), "",
                  "gap = PPL / PPL(fake-quant) - 1; KL = mean KL(p_fake-quant || p_backend) over the predicted "
                  "tokens; top-1 = share of positions whose most likely next token is the fake-quant model's; "
                  "seconds = time inside the backend's forward passes."]
    if report.get("weights"):
        lines += ["", "## Weights", "", *weight_lines(report)]
    if report.get("checks"):
        lines += ["", "## Verdict", "", *check_lines(report)]
    if report.get("localize"):
        lines += ["", "## Where the NPU leaves the fake-quant model (--localize)", "", *localize_lines(report)]
    settings = settings_lines(report)
    if settings:
        lines += ["", "## Settings", "", *settings]
    notes = list(report.get("notes", []))
    if not png and report.get("backends"):
        notes.append(NO_MATPLOTLIB)
    if notes:
        lines += ["", "## Notes", "", *[f"* {n}" for n in notes]]
    return "\n".join(lines) + "\n"


# --- chart ------------------------------------------------------------------------------------------------


def render_png(report: dict[str, Any]) -> bytes | None:
    """A bar chart of the PPL of every backend that ran (the float model beside the quantized ones), labelled
    with the PPL and the gap to fake-quant; None without matplotlib or without results."""
    rows = [r for r in report.get("backends", []) if r["ppl"] is not None]
    if not rows:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    colors = {"float": "#888888", "fake-quant": "#1f77b4", "llama.cpp": "#ff7f0e", "onnxruntime": "#2ca02c"}
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    names = [r["backend"] for r in rows]
    ppls = [r["ppl"] for r in rows]
    bars = ax.bar(names, ppls, color=[colors.get(n, "#9467bd") for n in names])
    for bar, r in zip(bars, rows, strict=True):
        label = f"{r['ppl']:.3f}" + ("" if r["backend"] in ("fake-quant",) else f"\n{r['gap']:+.2%}")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    s = report["settings"]
    verdict = "passed" if report["passed"] else "FAILED"
    ax.set_ylabel("perplexity")
    ax.set_ylim(0, max(ppls) * 1.2)
    ax.set_title(f"{s['data']}, {s['windows']} x {s['seqlen']} tokens: check {verdict}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict[str, Any], folder: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (with matplotlib) ``report.png`` into ``folder``; returns the
    paths written, by name."""
    folder = Path(folder)
    written = {}
    png = render_png(report)
    if png is not None:
        written[PNG_NAME] = atomic_write(folder / PNG_NAME, png)
    written[JSON_NAME] = atomic_write(folder / JSON_NAME, (json.dumps(report, indent=2) + "\n").encode())
    written[MD_NAME] = atomic_write(folder / MD_NAME, render_markdown(report, png is not None).encode())
    return written
