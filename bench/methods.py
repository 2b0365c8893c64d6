"""Benchmark: RTN, GPTQ, BoA and TurboBoA on the default model at several bit widths and group sizes.

Each configuration is quantized in its own process (so its peak memory is its own), then evaluated on the same
WikiText-2 raw test windows. Results are written to ``bench/results/methods.json`` (updated after every run, so
an interrupted benchmark resumes), ``methods.md`` (a table) and ``methods.png`` (PPL against bits).

    .venv/bin/python bench/methods.py --bits 2,3,4 --groups -1,128 --nsamples 128 --seqlen 2048
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def run_json(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"turboboa {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_doc(path: Path, settings: dict, note: str | None) -> dict:
    """The results so far in ``path`` when they were measured with ``settings`` (a benchmark resumes),
    else a fresh document; with this machine's description and ``note``."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    if doc.get("settings") != settings:
        doc = {"settings": settings, "runs": {}}
    doc["machine"] = machine()
    if note:
        doc["note"] = note
    return doc


def eval_args(seqlen: int, max_windows: int | None, device: str) -> list[str]:
    """``turboboa eval`` options of a benchmark's evaluation windows."""
    return ["--seqlen", str(seqlen), "--json", "-q", "--device", device] + (
        ["--max-windows", str(max_windows)] if max_windows else [])


def key(method: str, bits: int, group: int) -> str:
    return f"{method}-w{bits}-g{group}"


def write_table(doc: dict, path: Path) -> None:
    s = doc["settings"]
    lines = [
        "# Methods on SmolLM2-135M-Instruct (WikiText-2)",
        "",
        f"Calibration: {s['nsamples']} x {s['seqlen']} tokens of WikiText-2 validation (seed {s['seed']}). "
        f"Evaluation: WikiText-2 raw test, {s['max_windows'] or 'all'} windows of {s['eval_seqlen']} tokens. "
        f"Float PPL: {doc['float']['ppl']:.3f}. Machine: {doc['machine']['platform']}, "
        f"{doc['machine']['cpus']} CPUs, torch {doc['machine']['torch']}, "
        f"device {', '.join(sorted({r['device'] for r in doc['runs'].values() if r.get('device')})) or doc['machine']['cuda'] or 'cpu'}.",
        "",
        *([doc["note"], ""] if doc.get("note") else []),
        "| method | bits | group | PPL | quantize time (s) | statistics / solve / propagate (s) | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(doc["runs"].values(), key=lambda r: (r["group_size"], -r["bits"], r["order"])):
        g = "per-channel" if r["group_size"] < 0 else r["group_size"]
        ph = r.get("phase_seconds")
        phases = " / ".join(f"{ph[k]:.1f}" for k in ("statistics", "solve", "propagate")) if ph else ""
        lines.append(f"| {r['method']} | {r['bits']} | {g} | {r['ppl']:.3f} | {r['seconds']:.1f} | {phases} | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} |")
    path.write_text("\n".join(lines) + "\n")


def write_chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["group_size"] for r in doc["runs"].values()})
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        for m in doc["settings"]["methods"]:
            pts = sorted((r["bits"], r["ppl"]) for r in doc["runs"].values() if r["method"] == m and r["group_size"] == g)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.axhline(doc["float"]["ppl"], color="gray", linestyle="--", label="float")
        ax.set_yscale("log")
        ax.set_xlabel("bits")
        ax.set_ylabel("WikiText-2 PPL")
        ax.set_title("per-channel" if g < 0 else f"group {g}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="rtn,gptq,boa,turboboa")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--groups", default="-1,128")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", default=None, help="a remark on the run (machine load, ...) printed under the table's header")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    settings = {"methods": a.methods.split(","), "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed,
                "eval_seqlen": a.eval_seqlen, "max_windows": a.max_windows, "model": "smollm2-135m"}
    out_json = a.out / "methods.json"
    doc = load_doc(out_json, settings, a.note)
    ev = eval_args(a.eval_seqlen, a.max_windows, a.device)
    if "float" not in doc:
        doc["float"] = run_json(["eval", "smollm2-135m", *ev])
    order = 0
    for group in (int(g) for g in a.groups.split(",")):
        for bits in (int(b) for b in a.bits.split(",")):
            for order, method in enumerate(settings["methods"]):
                k = key(method, bits, group)
                if k in doc["runs"]:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    qdir = str(Path(tmp) / "Q")
                    t0 = time.time()
                    q = run_json(["quantize", "smollm2-135m", "--method", method, "--bits", str(bits),
                                  "--group-size", str(group), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                                  "--seed", str(a.seed), "--device", a.device, "-q", "--json", "-o", qdir])
                    wall = time.time() - t0
                    qcfg = json.loads((Path(qdir) / "quant_config.json").read_text())
                    e = run_json(["eval", qdir, *ev])
                doc["runs"][k] = {"method": method, "bits": bits, "group_size": group, "order": order,
                                  "ppl": e["ppl"], "seconds": q["seconds"], "wall_seconds": round(wall, 2),
                                  "peak_memory_bytes": q["peak_memory_bytes"],
                                  "phase_seconds": qcfg.get("timings", {}).get("phase_seconds"),
                                  "device": qcfg.get("device")}
                print(f"{k}: ppl {e['ppl']:.3f}, {q['seconds']:.1f} s", flush=True)
                out_json.write_text(json.dumps(doc, indent=2) + "\n")
    out_json.write_text(json.dumps(doc, indent=2) + "\n")
    write_table(doc, a.out / "methods.md")
    write_chart(doc, a.out / "methods.png")


if __name__ == "__main__":
    main()
