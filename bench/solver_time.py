"""Benchmark: BoA (N = 1) against TurboBoA wall time, on the first K blocks of the default model, in one process.

Issue 3's time check ("TurboBoA's wall time at most half of BoA's on the same machine in one run") without
the hours a full BoA run at the papers' calibration takes on a small machine: both methods quantize the same
first ``--blocks`` decoder blocks (every block of SmolLM2-135M has the same shapes, so the time per block is
what a full run repeats 30 times) on the same calibration, one after the other in one process, and the
pipeline's phase split (statistics / solve / propagate) is recorded. TurboBoA runs first, so it also pays for
the device's warm-up. Peak memory is the process's (CPU: the largest resident size so far, so the second
method reports at least the first one's). Results are appended to ``bench/results/solver-time.json`` (one entry
per machine and setting) and tabulated in ``solver-time.md``.

    .venv/bin/python bench/solver_time.py --blocks 5 --nsamples 128 --seqlen 2048 --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import RESULTS, ROOT, machine  # noqa: E402

sys.path.insert(0, str(ROOT))
from turboboa.config import QuantConfig  # noqa: E402
from turboboa.data import calibration_batch  # noqa: E402
from turboboa.models import load_float_model  # noqa: E402
from turboboa.pipeline import quantize_model, select_device  # noqa: E402


def time_methods(methods: list[str], blocks: int, bits: int, group: int, nsamples: int, seqlen: int, seed: int,
                 dev: torch.device) -> dict:
    """Quantize the first ``blocks`` blocks with each method in turn, each on a freshly loaded float model."""
    runs = {}
    for method in methods:
        loaded = load_float_model("smollm2-135m")
        model = loaded.model
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
        calib = calibration_batch(loaded.tokenizer, "wikitext2", nsamples, seqlen, seed)
        cfg = QuantConfig(method=method, bits=bits, group_size=group, nsamples=nsamples, seqlen=seqlen, seed=seed)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        result = quantize_model(model, calib, cfg, dev, progress=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        runs[method] = {"seconds": round(seconds, 2),
                        "phase_seconds": {k: round(v, 2) for k, v in result.phase_seconds.items()},
                        "peak_memory_bytes": result.peak_memory}
        print(f"{method}: {seconds:.1f} s {runs[method]['phase_seconds']}", flush=True)
    return runs


def write_table(entries: list[dict], path: Path) -> None:
    lines = [
        "# BoA (N = 1) and TurboBoA wall time, one process, same calibration",
        "",
        "SmolLM2-135M-Instruct, 3-bit per-channel, the first K decoder blocks (all 30 blocks have the same "
        "shapes). TurboBoA runs first in each process (it pays the device warm-up). Produced by "
        "`bench/solver_time.py`.",
        "",
        "| machine | device | calibration | blocks | BoA s (stats / solve / propagate) "
        "| TurboBoA s (stats / solve / propagate) | TurboBoA / BoA |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        b, t = e["runs"]["boa"], e["runs"]["turboboa"]

        def cell(r: dict) -> str:
            p = r["phase_seconds"]
            return f"{r['seconds']:.1f} ({p['statistics']:.1f} / {p['solve']:.1f} / {p['propagate']:.1f})"

        s = e["settings"]
        lines.append(f"| {e['machine'].get('cuda') or e['machine']['processor']}, {e['machine']['cpus']} CPUs "
                     f"| {e['device']} | {s['nsamples']} x {s['seqlen']} | {s['blocks']} | {cell(b)} | {cell(t)} "
                     f"| {t['seconds'] / b['seconds']:.2f} |")
    for e in entries:
        if e.get("note"):
            lines += ["", f"- {e['device']}, {e['settings']['nsamples']} x {e['settings']['seqlen']}: {e['note']}"]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    settings = {"blocks": a.blocks, "bits": a.bits, "group_size": a.group_size, "nsamples": a.nsamples,
                "seqlen": a.seqlen, "seed": a.seed, "model": "smollm2-135m"}
    dev = select_device(a.device)
    runs = time_methods(["turboboa", "boa"], a.blocks, a.bits, a.group_size, a.nsamples, a.seqlen, a.seed, dev)
    entry = {"settings": settings, "device": str(dev), "machine": machine(), "runs": runs,
             "ratio": round(runs["turboboa"]["seconds"] / runs["boa"]["seconds"], 3)}
    if a.note:
        entry["note"] = a.note
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "solver-time.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    same = (settings, entry["device"], entry["machine"].get("cuda"), entry["machine"]["cpus"])
    entries = [e for e in entries
               if (e["settings"], e["device"], e["machine"].get("cuda"), e["machine"]["cpus"]) != same] + [entry]
    path.write_text(json.dumps(entries, indent=2) + "\n")
    write_table(entries, a.out / "solver-time.md")
    print(f"TurboBoA / BoA = {entry['ratio']:.2f} -> {path}")


if __name__ == "__main__":
    main()
