"""Benchmark: the papers' tables in small. RTN, GPTQ, BoA and TurboBoA on the default model, each without and
with ``--rotate hadamard``, at W2A16 and W3A16 per channel and at W4A4KV4 and W4A8KV8 (per-token activations,
per-token-per-head keys and values, online Hadamard rotations of the down_proj input and of queries/keys
under rotation), all on the same calibration; PPL on the WikiText-2 raw test windows and wall time.

Weight-activation rows follow QuaRot's protocol: the weights are solved with float activations (the online
rotations applied), so W4A4KV4 and W4A8KV8 share one quantization and differ in the simulated activations
(``turboboa eval QDIR --act-bits A --kv-bits K``). The check of the rotated GGUF: TurboBoA with rotation on
the padded Q2_K preset, exported and run in llama.cpp (``turboboa run --export gguf``), against its fake-quant
PPL. Results: ``bench/results/rotation.{json,md,png}``, updated after every run (an interrupted benchmark
resumes).

    .venv/bin/python bench/rotation.py --nsamples 8 --seqlen 512 --eval-seqlen 512 --max-windows 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from methods import RESULTS, ROOT, eval_args, load_doc, run_json  # noqa: E402

SETTINGS = {  # name: (weight bits, activation bits, kv bits)
    "W2A16": (2, 16, 16),
    "W3A16": (3, 16, 16),
    "W4A4KV4": (4, 4, 4),
    "W4A8KV8": (4, 8, 8),
}
METHODS = ("rtn", "gptq", "boa", "turboboa")
ROTATIONS = ("none", "hadamard")
# the rows the check reads come first, so a short session still answers it
PRIORITY = [("turboboa", "W2A16", "hadamard"), ("turboboa", "W2A16", "none"), ("gptq", "W2A16", "hadamard"),
            ("rtn", "W4A4KV4", "hadamard"), ("turboboa", "W4A4KV4", "hadamard")]


def key(method: str, setting: str, rotate: str) -> str:
    return f"{method}-{setting}-{rotate}"


def weight_key(method: str, setting: str, rotate: str) -> str:
    """Rows with the same weights (W4A4KV4 and W4A8KV8 share their quantization)."""
    w, a, kv = SETTINGS[setting]
    return f"{method}-w{w}-{'wa' if a < 16 or kv < 16 else 'wo'}-{rotate}"


ROWS_OF: dict[str, list[tuple[str, str, str]]] = {}  # weight key -> the rows that read those weights


def order(methods: list[str], settings: list[str]) -> list[tuple[str, str, str]]:
    """Every row, the check's first."""
    rows = [(m, s, r) for s in settings for r in ROTATIONS for m in methods]
    for row in rows:
        ROWS_OF.setdefault(weight_key(*row), []).append(row)
    first = [p for p in PRIORITY if p in rows]
    return first + [r for r in rows if r not in first]


def quantize_args(method: str, setting: str, rotate: str, a: argparse.Namespace) -> list[str]:
    w, act, kv = SETTINGS[setting]
    args = ["quantize", "smollm2-135m", "--method", method, "--bits", str(w), "--group-size", "-1",
            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed), "--device", a.device,
            "--rotate", rotate, "-q", "--json"]
    if act < 16 or kv < 16:
        args += ["--act-bits", str(act), "--kv-bits", str(kv), "--act-scope", "token"]
    return args


def write_table(doc: dict, path: Path) -> None:
    s = doc["settings"]
    lines = [
        "# Rotation (QuaRot) and weight-activation quantization on SmolLM2-135M-Instruct (WikiText-2)",
        "",
        f"Calibration: {s['nsamples']} x {s['seqlen']} tokens of WikiText-2 validation (seed {s['seed']}), the same "
        f"for every row. Evaluation: WikiText-2 raw test, {s['max_windows'] or 'all'} windows of {s['eval_seqlen']} "
        f"tokens. Float PPL {doc['float']['ppl']:.3f}; float with the Hadamard rotation fused "
        f"{doc['float_rotated']['ppl']:.3f} (relative difference {doc['float_rotated']['relative']:.1e}). "
        f"Weights per channel, asymmetric, Hessian-weighted range search except RTN (min-max). Activations: "
        f"per-token symmetric min-max; keys and values per token and head, asymmetric; with rotation the "
        f"down_proj input and queries/keys are rotated online. Machine: {doc['machine']['platform']}, "
        f"{doc['machine']['cpus']} CPUs, torch {doc['machine']['torch']}.",
        "",
        *([doc["note"], ""] if doc.get("note") else []),
        "| setting | method | PPL, no rotation | PPL, Hadamard | quantize time (s), no rotation / Hadamard |",
        "|---|---|---|---|---|",
    ]
    runs = doc["runs"]
    for setting in s["settings"]:
        for m in s["methods"]:
            cells = [runs.get(key(m, setting, r)) for r in ROTATIONS]
            ppl = [f"{c['ppl']:.3f}" if c else "not run" for c in cells]
            secs = " / ".join(f"{c['seconds']:.1f}" if c else "-" for c in cells)
            lines.append(f"| {setting} | {m} | {ppl[0]} | {ppl[1]} | {secs} |")
    g = doc.get("gguf")
    if g:
        lines += ["", "## The rotated model in llama.cpp", "",
                  "| run | fake-quant PPL | llama.cpp PPL | gap |", "|---|---|---|---|"]
        for name, r in g.items():
            lines.append(f"| {name} | {r['fakequant_ppl']:.3f} | {r['llamacpp_ppl']:.3f} | {100 * r['gap']:+.2f}% |")
    path.write_text("\n".join(lines) + "\n")


def write_chart(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = doc["settings"]
    fig, axes = plt.subplots(1, len(s["settings"]), figsize=(4.2 * len(s["settings"]), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], s["settings"], strict=True):
        xs = range(len(s["methods"]))
        for j, (r, color) in enumerate(zip(ROTATIONS, ("tab:gray", "tab:blue"), strict=True)):
            vals = [doc["runs"].get(key(m, setting, r), {}).get("ppl", float("nan")) for m in s["methods"]]
            ax.bar([x + (j - 0.5) * 0.38 for x in xs], vals, width=0.38, color=color,
                   label="no rotation" if r == "none" else "Hadamard")
        ax.axhline(doc["float"]["ppl"], color="black", linestyle="--", linewidth=1, label="float")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), s["methods"])
        ax.set_title(setting)
        ax.set_ylabel("WikiText-2 PPL")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def gguf_check(a: argparse.Namespace, ev: list[str], rotate: str) -> dict:
    """TurboBoA on the padded Q2_K preset, exported to GGUF, its PPL in llama.cpp against its fake-quant PPL."""
    with tempfile.TemporaryDirectory() as tmp:
        qdir, gguf = str(Path(tmp) / "Q"), str(Path(tmp) / "model.gguf")
        t0 = time.time()
        q = run_json(["quantize", "smollm2-135m", "--method", "turboboa", "--preset", "Q2_K", "--pad-to", "256",
                      "--rotate", rotate, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                      "--seed", str(a.seed), "--device", a.device, "-q", "--json", "-o", qdir])
        proc = subprocess.run([sys.executable, "-m", "cli", "export", qdir, "--to", "gguf", "-o", gguf, "-q"],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"export failed: {proc.stderr.strip()[-2000:]}")
        fq = run_json(["eval", qdir, *ev])
        gg = run_json(["eval", gguf, "--tokenizer", qdir, *ev])
    return {"rotate": rotate, "fakequant_ppl": fq["ppl"], "llamacpp_ppl": gg["ppl"],
            "gap": gg["ppl"] / fq["ppl"] - 1, "quantize_seconds": q["seconds"],
            "wall_seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--no-gguf", action="store_true", help="skip the llama.cpp check of the rotated Q2_K GGUF")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TURBOBOA_CACHE", Path.home() / ".cache/turboboa"))
                    / "bench-rotation", help="QDIRs shared by two rows, kept until both are measured")
    ap.add_argument("--note", default=None)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    settings = {"methods": a.methods.split(","), "settings": a.settings.split(","), "nsamples": a.nsamples,
                "seqlen": a.seqlen, "seed": a.seed, "eval_seqlen": a.eval_seqlen, "max_windows": a.max_windows,
                "model": "smollm2-135m"}
    out_json = a.out / "rotation.json"
    doc = load_doc(out_json, settings, a.note)
    ev = eval_args(a.eval_seqlen, a.max_windows, a.device)

    def save() -> None:
        out_json.write_text(json.dumps(doc, indent=2) + "\n")
        write_table(doc, a.out / "rotation.md")
        write_chart(doc, a.out / "rotation.png")

    if "float" not in doc:
        doc["float"] = run_json(["eval", "smollm2-135m", *ev])
        rot = run_json(["eval", "smollm2-135m", "--rotate", "hadamard", *ev])
        rot["relative"] = abs(rot["ppl"] / doc["float"]["ppl"] - 1)
        doc["float_rotated"] = rot
    rows = order(settings["methods"], settings["settings"])
    first = [r for r in rows if r in PRIORITY]
    boa = [r for r in rows if r[0] == "boa" and r not in PRIORITY]
    rest = [r for r in rows if r not in first and r not in boa]
    # the check's rows and the rotated GGUF first, then the other rows, BoA's (the slowest solver) last
    run_rows(first, doc, a, ev, save)
    if not a.no_gguf:
        gguf_rows(doc, a, ev, save, ("hadamard",))
    run_rows(rest, doc, a, ev, save)
    if not a.no_gguf:
        gguf_rows(doc, a, ev, save, ("none",))
    run_rows(boa, doc, a, ev, save)
    save()


def gguf_rows(doc: dict, a: argparse.Namespace, ev: list[str], save, rotations: tuple[str, ...]) -> None:
    doc.setdefault("gguf", {})
    for rotate in rotations:
        name = f"turboboa Q2_K pad 256, rotate {rotate}"
        if name not in doc["gguf"]:
            doc["gguf"][name] = gguf_check(a, ev, rotate)
            print(f"{name}: {doc['gguf'][name]}", flush=True)
            save()


def run_rows(rows: list[tuple[str, str, str]], doc: dict, a: argparse.Namespace, ev: list[str], save) -> None:
    """Quantize and evaluate ``rows`` not yet in ``doc``. W4A4KV4 and W4A8KV8 share one quantization, kept in
    ``a.work`` (with its summary) until both rows are done, so an interrupted benchmark does not solve it
    twice."""
    a.work.mkdir(parents=True, exist_ok=True)
    for method, setting, rotate in rows:
        k = key(method, setting, rotate)
        if k in doc["runs"]:
            continue
        wk = weight_key(method, setting, rotate)
        qdir = a.work / wk
        summary = a.work / f"{wk}.json"
        if not summary.exists():
            shutil.rmtree(qdir, ignore_errors=True)
            t0 = time.time()
            q = run_json([*quantize_args(method, setting, rotate, a), "-o", str(qdir)])
            q["wall_seconds"] = round(time.time() - t0, 2)
            qcfg = json.loads((qdir / "quant_config.json").read_text())
            q["phase_seconds"] = qcfg.get("timings", {}).get("phase_seconds")
            summary.write_text(json.dumps(q))
        q = json.loads(summary.read_text())
        _, act, kv = SETTINGS[setting]
        extra = ["--act-bits", str(act), "--kv-bits", str(kv)] if act < 16 or kv < 16 else []
        e = run_json(["eval", str(qdir), *ev, *extra])
        doc["runs"][k] = {"method": method, "setting": setting, "rotate": rotate, "ppl": e["ppl"],
                          "seconds": q["seconds"], "wall_seconds": q["wall_seconds"],
                          "phase_seconds": q["phase_seconds"], "peak_memory_bytes": q["peak_memory_bytes"],
                          "weights_shared_with": wk}
        print(f"{k}: ppl {e['ppl']:.3f}, quantize {q['seconds']:.1f} s", flush=True)
        save()
        if all(key(m, s_, r) in doc["runs"] for (m, s_, r) in ROWS_OF.get(wk, [])):
            shutil.rmtree(qdir, ignore_errors=True)
            summary.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
