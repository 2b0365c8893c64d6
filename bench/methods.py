"""Benchmark: RTN, GPTQ, BoA and TurboBoA on a model (``--model``, the default one unless given) at bit widths
and group sizes.

Each configuration is quantized in its own process (so its peak memory is its own), then evaluated on the same
WikiText-2 raw test windows. Results are written to ``bench/results/methods.json`` (atomically, after every row,
so an interrupted benchmark resumes), ``methods.md`` (a table) and ``methods.png`` (PPL against bits). Every row
records its provenance (``bench/provenance.py``) and is reused only when its resolved settings, data sizes,
machine and library versions match the current run's; ``--fresh`` measures every row again.

    .venv/bin/python bench/methods.py --bits 2,3,4 --groups -1,128 --nsamples 128 --seqlen 2048
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as pv  # noqa: E402

ROOT = pv.ROOT
RESULTS = pv.RESULTS


def load_doc(path: Path, settings: dict, note: str | None) -> dict:
    """The results so far in ``path`` when they were made for the same document ``settings`` (sizes, methods),
    else a new document; with ``note`` when given. Rows keep their own provenance: the document records no
    machine (an earlier run's machine line stays, unchanged, while its rows do)."""
    doc = json.loads(path.read_text()) if path.exists() else {}
    if doc.get("settings") != settings:
        doc = {"settings": settings, "runs": {}}
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
    """``methods.md``: one row per configuration with its provenance, then the provenance section."""
    s = doc["settings"]
    legend = pv.Legend()
    devices = sorted({r.get("device") or r.get("provenance", {}).get("settings", {}).get("quantize", {}).get("device")
                      for r in doc["runs"].values()} - {None})
    lines = [
        f"# Methods on {s['model']} (WikiText-2)",
        "",
        f"Calibration: {s['nsamples']} x {s['seqlen']} tokens of WikiText-2 validation (seed {s['seed']}). "
        f"Evaluation: WikiText-2 raw test, {s['max_windows'] or 'all'} windows of {s['eval_seqlen']} tokens. "
        + (f"Float PPL: {doc['float']['ppl']:.3f}. " if doc.get("float") else "")
        + f"Device {', '.join(devices) or 'cpu'}; each row's machine and commit under Provenance.",
        "",
        *([doc["note"], ""] if doc.get("note") else []),
        "| method | bits | group | PPL | quantize time (s) | statistics / solve / propagate (s) | peak memory (GiB) "
        "| provenance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(doc["runs"].values(), key=lambda r: (r["group_size"], -r["bits"], r["order"])):
        g = "per-channel" if r["group_size"] < 0 else r["group_size"]
        ph = r.get("phase_seconds")
        phases = " / ".join(f"{ph[k]:.1f}" for k in ("statistics", "solve", "propagate")) if ph else ""
        lines.append(f"| {r['method']} | {r['bits']} | {g} | {r['ppl']:.3f} | {r['seconds']:.1f} | {phases} | "
                     f"{r['peak_memory_bytes'] / 2**30:.2f} | {legend.cell(r)} |")
    lines += ["", *legend.section({"float model": doc.get("float")}, doc.get("machine"))]
    pv.write_text_atomic(path, "\n".join(lines) + "\n")


def write_chart(doc: dict, path: Path) -> None:
    """``methods.png``: PPL against bits, one panel per group size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({r["group_size"] for r in doc["runs"].values()})
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.5), squeeze=False)
    for ax, g in zip(axes[0], groups, strict=True):
        for m in doc["settings"]["methods"]:
            pts = sorted((r["bits"], r["ppl"]) for r in doc["runs"].values() if r["method"] == m and r["group_size"] == g)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        if doc.get("float"):
            ax.axhline(doc["float"]["ppl"], color="gray", linestyle="--", label="float")
        ax.set_yscale("log")
        ax.set_xlabel("bits")
        ax.set_ylabel("WikiText-2 PPL")
        ax.set_title("per-channel" if g < 0 else f"group {g}")
        ax.legend()
    fig.tight_layout()
    pv.save_figure(fig, path, dpi=110)
    plt.close(fig)


def float_row(ctx: pv.Context, doc: dict, ev: list[str], eval_seqlen: int, max_windows: int | None,
              model: str = "smollm2-135m") -> bool:
    """Measure ``doc["float"]`` (the float model's PPL on the evaluation windows) unless the stored one may be
    reused; True when it was measured now."""
    settings = {"eval": pv.command_options(["eval", model, *ev])}
    data = {"evaluation": pv.evaluation_data(max_windows, eval_seqlen)}
    if ctx.reuse("float", doc.get("float"), settings, data):
        return False
    meter = pv.RowMeter()
    f = pv.cli_json(["eval", model, *ev], meter)
    doc["float"] = {**f, "provenance": ctx.record(settings, data, meter.result(eval_tokens=f["tokens"],
                                                                              eval_windows=f["windows"]))}
    return True


def quantize_args(method: str, bits: int, group: int, a: argparse.Namespace, device: str) -> list[str]:
    """``turboboa quantize`` arguments (after the subcommand, without -o) of one configuration."""
    return [a.model, "--method", method, "--bits", str(bits), "--group-size", str(group),
            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed), "--device", device,
            "-q", "--json"]


def measure_row(ctx: pv.Context, method: str, bits: int, group: int, order: int, a: argparse.Namespace,
                ev: list[str], settings: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Quantize one configuration into a temporary QDIR and evaluate it; the row with its provenance."""
    meter = pv.RowMeter()
    with tempfile.TemporaryDirectory() as tmp:
        qdir = Path(tmp) / "Q"
        q = pv.cli_json(["quantize", *quantize_args(method, bits, group, a, ctx.device), "-o", str(qdir)], meter)
        rec = pv.qdir_record(qdir)
        settings = {**settings, "quantize": pv.confirm_quantize(settings["quantize"], qdir)}
        if str(rec["device"]).startswith("cuda"):
            meter.add(gpu=q["peak_memory_bytes"])
        wall = meter.result()["wall_seconds"]
        e = pv.cli_json(["eval", str(qdir), *ev], meter)
    measured = meter.result(quantize_seconds=q["seconds"], eval_tokens=e["tokens"], eval_windows=e["windows"],
                            calibration_tokens=(rec["calibration"] or {}).get("tokens"))
    return {"method": method, "bits": bits, "group_size": group, "order": order, "ppl": e["ppl"],
            "seconds": q["seconds"], "wall_seconds": wall, "peak_memory_bytes": q["peak_memory_bytes"],
            "phase_seconds": rec["phase_seconds"], "device": rec["device"],
            "provenance": ctx.record(settings, data, measured)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="a model alias or folder (default: the default model)")
    ap.add_argument("--methods", default="rtn,gptq,boa,turboboa")
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--groups", default="-1,128")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--note", default=None, help="a remark on the run (machine load, ...) printed under the table's header")
    pv.add_arguments(ap)
    a = ap.parse_args()
    ctx = pv.Context.start(a.device, a.fresh, exclude=[a.out])
    a.out.mkdir(parents=True, exist_ok=True)
    settings = {"methods": a.methods.split(","), "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed,
                "eval_seqlen": a.eval_seqlen, "max_windows": a.max_windows, "model": a.model}
    out_json = a.out / "methods.json"
    doc = load_doc(out_json, settings, a.note)
    ev = eval_args(a.eval_seqlen, a.max_windows, ctx.device)

    def save() -> None:
        pv.drop_legacy_fields(doc, [doc.get("float"), *doc["runs"].values()])
        pv.write_json_atomic(out_json, doc)
        write_table(doc, a.out / "methods.md")
        write_chart(doc, a.out / "methods.png")

    if float_row(ctx, doc, ev, a.eval_seqlen, a.max_windows, a.model):
        save()
    data = {"calibration": pv.calibration_data(a.nsamples, a.seqlen),
            "evaluation": pv.evaluation_data(a.max_windows, a.eval_seqlen)}
    eval_settings = pv.command_options(["eval", "QDIR", *ev])
    for group in (int(g) for g in a.groups.split(",")):
        for bits in (int(b) for b in a.bits.split(",")):
            for order, method in enumerate(settings["methods"]):
                k = key(method, bits, group)
                row_settings = {"quantize": pv.quantize_settings(quantize_args(method, bits, group, a, ctx.device)),
                                "eval": eval_settings}
                if ctx.reuse(k, doc["runs"].get(k), row_settings, data):
                    continue
                doc["runs"][k] = measure_row(ctx, method, bits, group, order, a, ev, row_settings, data)
                r = doc["runs"][k]
                print(f"{k}: ppl {r['ppl']:.3f}, {r['seconds']:.1f} s", flush=True)
                save()
    save()


if __name__ == "__main__":
    main()
