"""Benchmark: peak host memory and time of ``turboboa quantize``, the model streamed block by block against
loaded whole (``--no-stream``).

For every model, calibration size and loading, one child process runs ``turboboa quantize MODEL ARGS
--nsamples N --seqlen L --stream|--no-stream`` into a temporary QDIR; the row records the child's peak
resident set (``wait4``), its wall time, the QDIR's phase times, the model's float32 size (its parameters
times 4 bytes) and the SHA-256 of the QDIR's tensor files, so the table also shows that both loadings give
the same tensors. Writes ``<out>/<name>.json`` and ``<name>.md`` after every row; a row is reused when its
settings, data sizes, machine and library versions match (``--fresh``: measure every row again).

A GGUF model's float cache (its conversion to safetensors, done once on first use) is made before the first
row, in this process, so no row measures it.

    .venv/bin/python bench/memory.py --models smollm2-135m,qwen2.5-coder-1.5b --calib 16x512 \\
        -- --method gptq --bits 4 --group-size 128
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as pv  # noqa: E402

TENSOR_FILES = ("quantized.safetensors", "float.safetensors")
LOADS = {"whole": "--no-stream", "stream": "--stream"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_model(model: str) -> None:
    """Convert (or find) the model's float cache outside the measured rows."""
    from turboboa.arch import get_adapter
    from turboboa.models.loader import load_streamed

    load_streamed(model, get_adapter)


def measure(model: str, args: list[str], load: str, nsamples: int, seqlen: int) -> dict:
    meter = pv.RowMeter()
    with tempfile.TemporaryDirectory(dir=Path.home()) as tmp:
        qdir = Path(tmp) / "qdir"
        cmd = [sys.executable, "-m", "cli", "quantize", model, *args, "--nsamples", str(nsamples), "--seqlen",
               str(seqlen), LOADS[load], "-q", "--json", "-o", str(qdir)]
        child = meter.run(cmd)
        doc = json.loads((qdir / "quant_config.json").read_text())
        digests = {name: sha256(qdir / name) for name in TENSOR_FILES}
    timings = doc["timings"]
    return {"measured": meter.result(), "parameters": doc["parameters"], "streamed": timings.get("streamed"),
            "quantize_seconds": timings["quantize_seconds"], "phase_seconds": timings["phase_seconds"],
            "summary": json.loads(child.stdout.strip().splitlines()[-1]), "tensor_sha256": digests}


def table(doc: dict) -> list[str]:
    legend = pv.Legend()
    lines = ["| model | calibration | loading | peak host memory (GiB) | model float32 (GiB) | peak / float32 | "
             "wall (s) | statistics / solve / propagate (s) | tensors as whole | provenance |",
             "|---|---|---|---:|---:|---:|---:|---|---|---|"]
    rows = doc["rows"]
    order = list(dict.fromkeys(k.split("|")[0] for k in rows))  # models in the order first measured
    for key, row in sorted(rows.items(), key=lambda kv: (order.index(kv[0].split("|")[0]), kv[0].split("|")[1],
                                                          kv[0].split("|")[2] != "whole")):
        model, calib, load = key.split("|")
        peak = row["measured"]["peak_rss_bytes"]
        size = 4 * row["parameters"]
        phases = row["phase_seconds"]
        whole = rows.get(f"{model}|{calib}|whole")
        same = "-" if load == "whole" or whole is None else (
            "yes" if whole["tensor_sha256"] == row["tensor_sha256"] else "NO")
        lines.append(f"| {model} | {calib} | {load} | {peak / 2**30:.2f} | {size / 2**30:.2f} | {peak / size:.2f} | "
                     f"{row['measured']['wall_seconds']:.0f} | {phases['statistics']:.0f} / {phases['solve']:.0f} / "
                     f"{phases['propagate']:.0f} | {same} | {legend.cell(row)} |")
    return lines + [""] + legend.section({})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m", help="comma-separated models")
    ap.add_argument("--calib", default="16x512", help="comma-separated NxL calibration sizes")
    ap.add_argument("--loads", default="whole,stream", help="comma-separated: whole, stream")
    ap.add_argument("--name", default="memory")
    ap.add_argument("--out", type=Path, default=pv.RESULTS)
    ap.add_argument("quantize_args", nargs="*", help="after --: options of `turboboa quantize`")
    pv.add_arguments(ap)
    a = ap.parse_args()
    ctx = pv.Context.start(a.device, a.fresh, exclude=[a.out])
    out_json = a.out / f"{a.name}.json"
    doc = json.loads(out_json.read_text()) if out_json.exists() else {"rows": {}}
    args = [*a.quantize_args, "--device", ctx.device]
    for model in a.models.split(","):
        prepare_model(model)
        for calib in a.calib.split(","):
            nsamples, seqlen = (int(x) for x in calib.split("x"))
            for load in a.loads.split(","):
                key = f"{model}|{calib}|{load}"
                settings = {"quantize": pv.quantize_settings([model, *args, "--nsamples", str(nsamples),
                                                              "--seqlen", str(seqlen)]), "load": load}
                data = {"calibration": pv.calibration_data(nsamples, seqlen)}
                if ctx.reuse(key, doc["rows"].get(key), settings, data):
                    continue
                row = measure(model, args, load, nsamples, seqlen)
                doc["rows"][key] = {**row, "provenance": ctx.record(settings, data, row["measured"])}
                a.out.mkdir(parents=True, exist_ok=True)
                pv.write_json_atomic(out_json, doc)
                print(f"{key}: peak {row['measured']['peak_rss_bytes'] / 2**30:.2f} GiB, "
                      f"{row['measured']['wall_seconds']:.0f} s", flush=True)
                pv.write_text_atomic(a.out / f"{a.name}.md", "\n".join(header(a) + table(doc)) + "\n")
    pv.write_text_atomic(a.out / f"{a.name}.md", "\n".join(header(a) + table(doc)) + "\n")


def header(a: argparse.Namespace) -> list[str]:
    return ["# Peak host memory of `turboboa quantize`: streamed block by block, or the model loaded whole", "",
            f"`turboboa quantize MODEL {' '.join(a.quantize_args)} --nsamples N --seqlen L --stream|--no-stream`, "
            "one process per row; peak host memory is the process's peak resident set. \"tensors as whole\": "
            "the streamed QDIR's `quantized.safetensors` and `float.safetensors` have the SHA-256 of the "
            "whole-model run's. The model's float cache (a GGUF's conversion, done once) is made before the rows.",
            ""]


if __name__ == "__main__":
    main()
