"""Our GGUF files against llama.cpp's own quantizer on the default model, measured by one evaluator.

For each file type (Q2_K, Q3_K_S, Q3_K_M, Q4_K_M):

* llama.cpp: an F32 GGUF of the same float model quantized by ``llama-quantize``, without and with an
  importance matrix from ``llama-imatrix`` on the calibration text we use (WikiText-2 validation rows,
  ``nsamples`` chunks of ``seqlen`` tokens);
* ours: ``turboboa quantize --preset P`` (TurboBoA, ``nsamples x seqlen`` calibration tokens), without and with
  ``--pad-to 256`` (unrotated, and with the Hadamard rotation ``--rotate auto`` now gives every TurboBoA model;
  the committed unpadded rows predate that default and are unrotated), exported
  with ``turboboa export --to gguf``.

Every file is run in llama.cpp (llama-cpp-python) on the same WikiText-2 test windows, tokens from the same
Hugging Face tokenizer. Writes ``bench/results/gguf-vs-llamacpp.{json,md,png}``; reruns resume from the JSON
when the settings match. The tools are built by ``bench/llamacpp_tools.py`` into a cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")


def run(cmd: list[str], log: Path) -> None:
    """Run ``cmd``, its output appended to ``log``; raise with the log's tail on failure."""
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log}")


def float_gguf(work: Path) -> tuple[Path, Path, int]:
    """The F32 GGUF of the default model (tokenizer metadata copied from the source GGUF), the HF tokenizer
    folder of the float model, and its parameter count."""
    from exporters.gguf import float_tensors, write_gguf
    from turboboa.models import load_float_model
    from turboboa.models.loader import alias_gguf_path

    loaded = load_float_model("smollm2-135m")
    n_params = sum(p.numel() for p in loaded.model.parameters())
    path = work / "smollm2-135m-f32.gguf"
    if not path.exists():
        write_gguf(path, loaded.model.config, None, float_tensors(loaded.model.state_dict()),
                   source_gguf=alias_gguf_path("smollm2-135m"))
    return path, loaded.cache_dir, n_params


def calibration_text(work: Path) -> Path:
    from turboboa.data import resolve_text

    path = work / "calib.txt"
    if not path.exists():
        text, _ = resolve_text("wikitext2", "calib")
        path.write_text(text)
    return path


def evaluate(path: Path, tokenizer: Path, seqlen: int, windows: int) -> dict:
    from turboboa.api import evaluate_gguf

    res = evaluate_gguf(path, "wikitext2", seqlen, windows, progress=False, tokenizer=str(tokenizer), threads=2)
    return res.to_dict()


def plot(rows: list[dict], float_ppl: float | None, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"llama.cpp": ("o", "tab:gray"), "llama.cpp+imatrix": ("s", "tab:blue"),
              "turboboa": ("^", "tab:red"), "turboboa+pad256": ("D", "tab:green"),
              "turboboa+pad256+hadamard": ("v", "tab:purple")}
    for label, (marker, color) in styles.items():
        pts = sorted((r["file_mib"], r["ppl"], r["preset"]) for r in rows if r["maker"] == label)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, label=label)
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if float_ppl:
        ax.axhline(float_ppl, color="black", ls="--", lw=0.8, label="float (F32)")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("WikiText-2 PPL in llama.cpp")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: turboboa GGUF vs llama-quantize")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def write_table(doc: dict, out: Path) -> None:
    s = doc["settings"]
    lines = [
        "# GGUF files: turboboa vs llama.cpp's quantizer (SmolLM2-135M-Instruct)",
        "",
        f"Calibration: {s['nsamples']} x {s['seqlen']} tokens of WikiText-2 validation (turboboa: TurboBoA; "
        f"llama-imatrix: {s['nsamples']} chunks of {s['seqlen']} tokens of the same text). Evaluation: "
        f"llama.cpp (llama-cpp-python {s['llama_cpp_python']}, CPU) on the first {s['windows']} windows of "
        f"{s['eval_seqlen']} WikiText-2 test tokens, same HF tokens for every file. Machine: {s['machine']}.",
        "Bits per weight: 8 x file size / parameters of the original model "
        f"({s['n_params']:,}), so padded files pay for their padding.",
        "",
        "| preset | maker | PPL | file MiB | bits/weight | quantize s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    if doc.get("float"):
        f = doc["float"]
        lines.append(f"| F32 | float | {f['ppl']:.3f} | {f['file_mib']:.1f} | {f['bpw']:.2f} | |")
    for r in sorted(doc["rows"], key=lambda r: (PRESETS.index(r["preset"]), r["maker"])):
        lines.append(f"| {r['preset']} | {r['maker']} | {r['ppl']:.3f} | {r['file_mib']:.1f} | {r['bpw']:.3f} | "
                     f"{r.get('quantize_seconds', 0):.0f} |")
    lines += ["", "## Dominance check", "",
              "For each llama.cpp file made with an importance matrix: the best of our files no more than 2% "
              "larger.", "", "| preset | llama.cpp+imatrix PPL / MiB | ours PPL / MiB | ours | lower PPL |",
              "|---|---|---|---|---|"]
    for preset in PRESETS:
        theirs = [r for r in doc["rows"] if r["preset"] == preset and r["maker"] == "llama.cpp+imatrix"]
        if not theirs:
            continue
        t = theirs[0]
        ours = [r for r in doc["rows"] if r["maker"].startswith("turboboa") and r["file_mib"] <= 1.02 * t["file_mib"]]
        if ours:
            best = min(ours, key=lambda r: r["ppl"])
            lines.append(f"| {preset} | {t['ppl']:.3f} / {t['file_mib']:.1f} | {best['ppl']:.3f} / "
                         f"{best['file_mib']:.1f} | {best['preset']} {best['maker']} | "
                         f"{'yes' if best['ppl'] < t['ppl'] else 'no'} |")
        else:
            lines.append(f"| {preset} | {t['ppl']:.3f} / {t['file_mib']:.1f} | none within 2% | | no |")
    out.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--method", default="turboboa")
    ap.add_argument("--makers", default="llama.cpp,llama.cpp+imatrix,turboboa,turboboa+pad256,turboboa+pad256+hadamard",
                    help="which files to make (comma-separated)")
    ap.add_argument("--work", default=None, help="work folder (default: $TURBOBOA_CACHE/bench-gguf)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()

    import importlib.metadata as md

    from llamacpp_tools import build

    cache = Path(os.environ.get("TURBOBOA_CACHE", Path.home() / ".cache" / "turboboa"))
    work = Path(args.work) if args.work else cache / "bench-gguf"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_seqlen": args.eval_seqlen,
                "windows": args.max_windows, "method": args.method,
                "llama_cpp_python": md.version("llama_cpp_python"),
                "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only"}
    json_path = out / "gguf-vs-llamacpp.json"
    doc = json.loads(json_path.read_text()) if json_path.exists() else {}
    if {k: v for k, v in doc.get("settings", {}).items() if k != "n_params"} != settings:
        doc = {"settings": settings, "rows": []}

    def save() -> None:
        json_path.write_text(json.dumps(doc, indent=2) + "\n")
        write_table(doc, out / "gguf-vs-llamacpp.md")
        plot(doc["rows"], doc.get("float", {}).get("ppl"), out / "gguf-vs-llamacpp.png")

    tools = build()
    f32, tokenizer, n_params = float_gguf(work)
    settings["n_params"] = doc["settings"]["n_params"] = n_params
    if "float" not in doc:
        r = evaluate(f32, tokenizer, args.eval_seqlen, args.max_windows)
        doc["float"] = {"ppl": r["ppl"], "file_mib": f32.stat().st_size / 2**20,
                        "bpw": 8 * f32.stat().st_size / n_params}
        save()
    imatrix = work / f"imatrix-{args.nsamples}x{args.seqlen}.gguf"
    if not imatrix.exists():
        run([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(calibration_text(work)), "-o", str(imatrix),
             "-c", str(args.seqlen), "--chunks", str(args.nsamples), "-t", "2"], log)
    done = {(r["preset"], r["maker"]) for r in doc["rows"]}
    for preset in args.presets.split(","):
        jobs = []
        for maker in args.makers.split(","):
            if (preset, maker) not in done:
                jobs.append(maker)
        for maker in jobs:
            t0 = time.time()
            target = work / f"{preset}-{maker.replace('+', '-').replace('.', '')}.gguf"
            if maker.startswith("llama.cpp"):
                cmd = [str(tools / "llama-quantize")]
                if maker.endswith("imatrix"):
                    cmd += ["--imatrix", str(imatrix)]
                run(cmd + [str(f32), str(target), preset, "2"], log)
            else:
                qdir = work / f"{preset}-{maker.replace('+', '-')}.qdir"
                cmd = [sys.executable, "-m", "cli", "quantize", "smollm2-135m", "--method", args.method,
                       "--preset", preset, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                       "-q", "-o", str(qdir)]
                if "pad256" in maker:  # turboboa+pad256: padded, unrotated; +hadamard: what --rotate auto does
                    cmd += ["--pad-to", "256", "--rotate", "hadamard" if maker.endswith("hadamard") else "none"]
                run(cmd, log)
                run([sys.executable, "-m", "cli", "export", str(qdir), "--to", "gguf", "-o", str(target)], log)
            seconds = time.time() - t0
            r = evaluate(target, tokenizer, args.eval_seqlen, args.max_windows)
            size = target.stat().st_size
            row = {"preset": preset, "maker": maker, "ppl": r["ppl"], "file_mib": size / 2**20,
                   "bpw": 8 * size / n_params, "quantize_seconds": round(seconds, 1), "file": target.name}
            doc["rows"].append(row)
            print(json.dumps(row), flush=True)
            save()
    save()
    print((out / "gguf-vs-llamacpp.md").read_text())


if __name__ == "__main__":
    main()
