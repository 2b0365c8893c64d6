"""Benchmark: BoA (N = 1) against TurboBoA wall time, on the first K blocks of the default model, in one process.

Issue 3's time check ("TurboBoA's wall time at most half of BoA's on the same machine in one run") without
the hours a full BoA run at the papers' calibration takes on a small machine: both methods quantize the same
first ``--blocks`` decoder blocks (every block of SmolLM2-135M has the same shapes, so the time per block is
what a full run repeats 30 times) on the same calibration, one after the other in one process, and the
pipeline's phase split (statistics / solve / propagate) is recorded. TurboBoA runs first, so it also pays for
the device's warm-up. Peak memory is the process's on a CPU (the largest resident size so far, so the second
method reports at least the first one's) and each method's own on a GPU. Results are appended to
``bench/results/solver-time.json`` (one entry per machine and setting, with its provenance: see
``bench/provenance.py``) and tabulated in ``solver-time.md``. When an entry's provenance matches the current run
(settings, calibration, machine, library versions) nothing is measured; ``--fresh`` measures again, and the new
entry replaces the one of the same settings and machine.

    .venv/bin/python bench/solver_time.py --blocks 5 --nsamples 128 --seqlen 2048 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as pv  # noqa: E402

from turboboa.arch import get_adapter  # noqa: E402
from turboboa.blockwise import quantize_model  # noqa: E402
from turboboa.config import QuantConfig  # noqa: E402
from turboboa.data import calibration_batch  # noqa: E402
from turboboa.models import load_float_model  # noqa: E402

RESULTS = pv.RESULTS

METHODS = ["turboboa", "boa"]  # TurboBoA first: it pays the device's warm-up


def configs(methods: list[str], bits: int, group: int, nsamples: int, seqlen: int, seed: int) -> dict[str, QuantConfig]:
    """The QuantConfig each method runs with (the library's defaults otherwise)."""
    return {m: QuantConfig(method=m, bits=bits, group_size=group, nsamples=nsamples, seqlen=seqlen, seed=seed)
            for m in methods}


def time_methods(methods: list[str], blocks: int, bits: int, group: int, nsamples: int, seqlen: int, seed: int,
                 dev: torch.device) -> dict:
    """Quantize the first ``blocks`` blocks with each method in turn, each on a freshly loaded float model."""
    runs = {}
    for method, cfg in configs(methods, bits, group, nsamples, seqlen, seed).items():
        loaded = load_float_model("smollm2-135m")
        model = loaded.model
        del get_adapter(model).blocks(model)[blocks:]
        model.config.num_hidden_layers = blocks
        calib = calibration_batch(loaded.tokenizer, "wikitext2", nsamples, seqlen, seed)
        torch.manual_seed(seed)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)  # each method's peak GPU memory its own
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


def machine_label(e: dict) -> str:
    """The machine of an entry: its GPU, else its CPU, and the CPU count (an earlier run's record or a
    provenance record)."""
    m = e["provenance"]["machine"] if pv.has_provenance(e) else e["machine"]
    name = m.get("gpu") or m.get("cuda") or m.get("cpu") or m.get("processor")
    return f"{name}, {m['cpus']} CPUs"


def write_table(entries: list[dict], path: Path) -> None:
    """``solver-time.md``: one row per machine and setting, with its provenance."""
    legend = pv.Legend()
    lines = [
        "# BoA (N = 1) and TurboBoA wall time, one process, same calibration",
        "",
        "SmolLM2-135M-Instruct, 3-bit per-channel, the first K decoder blocks (all 30 blocks have the same "
        "shapes). TurboBoA runs first in each process (it pays the device warm-up). Produced by "
        "`bench/solver_time.py`.",
        "",
        "| machine | device | calibration | blocks | BoA s (stats / solve / propagate) "
        "| TurboBoA s (stats / solve / propagate) | TurboBoA / BoA | provenance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        b, t = e["runs"]["boa"], e["runs"]["turboboa"]

        def cell(r: dict) -> str:
            p = r["phase_seconds"]
            return f"{r['seconds']:.1f} ({p['statistics']:.1f} / {p['solve']:.1f} / {p['propagate']:.1f})"

        s = e["settings"]
        lines.append(f"| {machine_label(e)} | {e['device']} | {s['nsamples']} x {s['seqlen']} | {s['blocks']} "
                     f"| {cell(b)} | {cell(t)} | {t['seconds'] / b['seconds']:.2f} | {legend.cell(e)} |")
    for e in entries:
        if e.get("note"):
            lines += ["", f"- {e['device']}, {e['settings']['nsamples']} x {e['settings']['seqlen']}: {e['note']}"]
    lines += ["", *legend.section()]
    pv.write_text_atomic(path, "\n".join(lines) + "\n")


def supersedes(entry: dict, old: dict, ctx: pv.Context) -> bool:
    """``entry`` (measured now) replaces ``old``: same settings and device on the same machine (for an entry of
    an earlier run, without provenance: the same GPU and CPU count, what it recorded)."""
    if old["settings"] != entry["settings"] or old["device"] != entry["device"]:
        return False
    if pv.has_provenance(old):
        return pv.normalized(old["provenance"]["machine"]) == pv.normalized(ctx.machine)
    return (old["machine"].get("cuda"), old["machine"].get("cpus")) == (ctx.machine["gpu"], ctx.machine["cpus"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", default=None)
    pv.add_arguments(ap)
    a = ap.parse_args()
    ctx = pv.Context.start(a.device, a.fresh, exclude=[a.out])
    settings = {"blocks": a.blocks, "bits": a.bits, "group_size": a.group_size, "nsamples": a.nsamples,
                "seqlen": a.seqlen, "seed": a.seed, "model": "smollm2-135m"}
    cfgs = configs(METHODS, a.bits, a.group_size, a.nsamples, a.seqlen, a.seed)
    full: dict[str, Any] = {**settings, "methods": METHODS, "device": ctx.device,
                            "quant_config": {m: c.to_dict() for m, c in cfgs.items()}}
    data = {"calibration": pv.calibration_data(a.nsamples, a.seqlen)}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "solver-time.json"
    entries = json.loads(path.read_text()) if path.exists() else []
    name = f"{ctx.device}, {a.nsamples} x {a.seqlen}, {a.blocks} blocks"
    if any(ctx.reuse(name, e, full, data) for e in entries if e["settings"] == settings):
        write_table(entries, a.out / "solver-time.md")
        return
    dev = torch.device(ctx.device)
    meter = pv.RowMeter()
    runs = time_methods(METHODS, a.blocks, a.bits, a.group_size, a.nsamples, a.seqlen, a.seed, dev)
    # in one process: its peak resident set so far, and (on a GPU) the larger of the methods' peaks
    meter.add(rss=pv.rss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
              gpu=max(r["peak_memory_bytes"] for r in runs.values()) if dev.type == "cuda" else None)
    entry = {"settings": settings, "device": ctx.device, "runs": runs,
             "ratio": round(runs["turboboa"]["seconds"] / runs["boa"]["seconds"], 3),
             "provenance": ctx.record(full, data, meter.result())}
    if a.note:
        entry["note"] = a.note
    entries = [e for e in entries if not supersedes(entry, e, ctx)] + [entry]
    pv.write_json_atomic(path, entries)
    write_table(entries, a.out / "solver-time.md")
    print(f"TurboBoA / BoA = {entry['ratio']:.2f} -> {path}")


if __name__ == "__main__":
    main()
