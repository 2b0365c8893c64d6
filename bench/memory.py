"""Benchmark: peak host memory and time of ``turboboa quantize``, the model streamed block by block against
loaded whole (``--no-stream``), and the calibration activations kept in float32 against half precision
(``--calib-dtype``), with the accuracy that costs.

For every model, calibration size, loading and activation precision, one child process runs ``turboboa
quantize MODEL ARGS --nsamples N --seqlen L --stream|--no-stream --calib-dtype D`` into a temporary QDIR; the
row records the child's peak resident set (``wait4``), its wall time, the QDIR's phase times, the model's
float32 size (its parameters times 4 bytes) and the SHA-256 of the QDIR's tensor files, so the table also
shows that both loadings give the same tensors. With ``--eval-windows K`` a second child scores the QDIR
(``turboboa eval``, the first K windows of ``--eval-seqlen`` WikiText-2 test tokens; not part of the peak).
Writes ``<out>/<name>.json`` and ``<name>.md`` after every row; a row is reused when its settings, data sizes,
machine and library versions match (``--fresh``: measure every row again).

A GGUF model's float cache (its conversion to safetensors, done once on first use) is made before the first
row, in this process, so no row measures it.

    .venv/bin/python bench/memory.py --models smollm2-135m,qwen2.5-coder-1.5b --calib 16x512 \\
        --calib-dtypes float32,bfloat16 --eval-windows 16 -- --method gptq --bits 4 --group-size 128
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as pv  # noqa: E402

from turboboa.checksums import sha256_file  # noqa: E402

TENSOR_FILES = ("quantized.safetensors", "float.safetensors")
LOADS = {"whole": "--no-stream", "stream": "--stream"}


def prepare_model(model: str) -> None:
    """Convert (or find) the model's float cache outside the measured rows."""
    from turboboa.arch import get_adapter
    from turboboa.models.loader import load_streamed

    load_streamed(model, get_adapter)


def row_key(model: str, calib: str, load: str, dtype: str) -> str:
    """``model|NxL|load``, with ``|dtype`` when the activations are not kept in float32."""
    return "|".join([model, calib, load] + ([] if dtype == "float32" else [dtype]))


def quantize_options(args: list[str], nsamples: int, seqlen: int, dtype: str) -> list[str]:
    return [*args, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--calib-dtype", dtype]


def measure(model: str, options: list[str], load: str, evaluation: list[str] | None) -> dict:
    meter = pv.RowMeter()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        qdir = Path(tmp) / "qdir"
        summary = pv.cli_json(["quantize", model, *options, LOADS[load], "-q", "--json", "-o", str(qdir)], meter)
        measured = meter.result()  # the quantization's own peak and wall time
        doc = json.loads((qdir / "quant_config.json").read_text())
        digests = {name: sha256_file(qdir / name) for name in TENSOR_FILES}
        scored = None
        if evaluation is not None:
            scored = pv.cli_json(["eval", str(qdir), *evaluation])
    timings = doc["timings"]
    return {"measured": measured, "parameters": doc["parameters"], "streamed": timings.get("streamed"),
            "quantize_seconds": timings["quantize_seconds"], "phase_seconds": timings["phase_seconds"],
            "summary": summary, "tensor_sha256": digests,
            "ppl": None if scored is None else scored["ppl"]}


def table(doc: dict) -> list[str]:
    legend = pv.Legend()
    lines = ["| model | calibration | loading | activations | peak host memory (GiB) | model float32 (GiB) | "
             "peak / float32 | wall (s) | statistics / solve / propagate (s) | tensors as whole | PPL | provenance |",
             "|---|---|---|---|---:|---:|---:|---:|---|---|---:|---|"]
    rows = doc["rows"]
    parts = {key: (key.split("|") + ["float32"])[:4] for key in rows}
    order = list(dict.fromkeys(p[0] for p in parts.values()))  # models in the order first measured
    for key, row in sorted(rows.items(), key=lambda kv: (order.index(parts[kv[0]][0]), parts[kv[0]][1],
                                                          parts[kv[0]][3] != "float32", parts[kv[0]][3],
                                                          parts[kv[0]][2] != "whole")):
        model, calib, load, dtype = parts[key]
        peak = row["measured"]["peak_rss_bytes"]
        size = 4 * row["parameters"]
        phases = row["phase_seconds"]
        whole = rows.get(row_key(model, calib, "whole", dtype))
        same = "-" if load == "whole" or whole is None else (
            "yes" if whole["tensor_sha256"] == row["tensor_sha256"] else "NO")
        ppl = "-" if row.get("ppl") is None else f"{row['ppl']:.3f}"
        lines.append(f"| {model} | {calib} | {load} | {dtype} | {peak / 2**30:.2f} | {size / 2**30:.2f} | "
                     f"{peak / size:.2f} | {row['measured']['wall_seconds']:.0f} | {phases['statistics']:.0f} / "
                     f"{phases['solve']:.0f} / {phases['propagate']:.0f} | {same} | {ppl} | {legend.cell(row)} |")
    return lines + [""] + legend.section({})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated models")
    ap.add_argument("--calib", default="16x512", help="comma-separated NxL calibration sizes")
    ap.add_argument("--loads", default="whole,stream", help="comma-separated: whole, stream")
    ap.add_argument("--calib-dtypes", default="float32", help="comma-separated --calib-dtype values")
    ap.add_argument("--eval-windows", type=int, default=0, help="score each QDIR on this many windows (0: not)")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--name", default="memory")
    ap.add_argument("--out", type=Path, default=pv.RESULTS)
    ap.add_argument("quantize_args", nargs="*", help="after --: options of `turboboa quantize`")
    pv.add_arguments(ap)
    a = ap.parse_args()
    ctx = pv.Context.start(a.device, a.fresh, exclude=[a.out])
    out_json = a.out / f"{a.name}.json"
    doc = json.loads(out_json.read_text()) if out_json.exists() else {"rows": {}}
    args = [*a.quantize_args, "--device", ctx.device]
    evaluation = None
    if a.eval_windows > 0:
        evaluation = ["--seqlen", str(a.eval_seqlen), "--max-windows", str(a.eval_windows), "--device", ctx.device,
                      "-q", "--json"]
    for model in a.models.split(","):
        prepare_model(model)
        for calib in a.calib.split(","):
            nsamples, seqlen = (int(x) for x in calib.split("x"))
            for dtype in a.calib_dtypes.split(","):
                options = quantize_options(args, nsamples, seqlen, dtype)
                for load in a.loads.split(","):
                    if dtype != "float32" and load != "stream":
                        continue  # the half-precision activations' cost is measured on the streamed run alone
                    key = row_key(model, calib, load, dtype)
                    settings = {"quantize": pv.quantize_settings([model, *options]), "load": load,
                                "eval": None if evaluation is None else pv.command_options(["eval", "QDIR", *evaluation])}
                    data = {"calibration": pv.calibration_data(nsamples, seqlen),
                            "evaluation": pv.evaluation_data(a.eval_windows or None, a.eval_seqlen)
                            if evaluation else None}
                    if ctx.reuse(key, doc["rows"].get(key), settings, data):
                        continue
                    row = measure(model, options, load, evaluation)
                    doc["rows"][key] = {**row, "provenance": ctx.record(settings, data, row["measured"])}
                    a.out.mkdir(parents=True, exist_ok=True)
                    pv.write_json_atomic(out_json, doc)
                    print(f"{key}: peak {row['measured']['peak_rss_bytes'] / 2**30:.2f} GiB, "
                          f"{row['measured']['wall_seconds']:.0f} s, PPL {row['ppl']}", flush=True)
                    pv.write_text_atomic(a.out / f"{a.name}.md", "\n".join(header(a) + table(doc)) + "\n")
    pv.write_text_atomic(a.out / f"{a.name}.md", "\n".join(header(a) + table(doc)) + "\n")


def header(a: argparse.Namespace) -> list[str]:
    return ["# Peak host memory of `turboboa quantize`: streamed block by block, or the model loaded whole", "",
            f"`turboboa quantize MODEL {' '.join(a.quantize_args)} --nsamples N --seqlen L --stream|--no-stream "
            "--calib-dtype D`, one process per row; peak host memory is the process's peak resident set. "
            "\"activations\": the precision the calibration activations are kept in between blocks. \"tensors "
            "as whole\": the streamed QDIR's `quantized.safetensors` and `float.safetensors` have the SHA-256 of "
            "the whole-model run's. The model's float cache (a GGUF's conversion, done once) is made before the "
            "rows. Half-precision activations are measured on the streamed run alone.",
            *([f"PPL: `turboboa eval QDIR` on the first {a.eval_windows} windows of {a.eval_seqlen} WikiText-2 "
               "test tokens (\"-\": not scored)."] if a.eval_windows else []),
            ""]


if __name__ == "__main__":
    main()
