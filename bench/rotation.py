"""Benchmark: the papers' tables in small. RTN, GPTQ, BoA and TurboBoA on the default model, each without and
with ``--rotate hadamard``, at W2A16 and W3A16 per channel and at W4A4KV4 and W4A8KV8 (per-token activations,
per-token-per-head keys and values, online Hadamard rotations of the MLP down projection's input and of queries/keys
under rotation), all on the same calibration; PPL on the WikiText-2 raw test windows and wall time.

Weight-activation rows follow QuaRot's protocol: the weights are solved with float activations (the online
rotations applied), so W4A4KV4 and W4A8KV8 share one quantization and differ in the simulated activations
(``turboboa eval QDIR --act-bits A --kv-bits K``). The check of the rotated GGUF: TurboBoA with rotation on
the padded Q2_K preset, exported and run in llama.cpp (``turboboa run --export gguf``), against its fake-quant
PPL. Results: ``bench/results/rotation.{json,md,png}``, written atomically after every row (an interrupted
benchmark resumes); rows carry their provenance and are reused only when it matches the current run
(``bench/provenance.py``; ``--fresh`` measures every row again).

    .venv/bin/python bench/rotation.py --nsamples 8 --seqlen 512 --eval-seqlen 512 --max-windows 8
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as pv  # noqa: E402
from methods import RESULTS, eval_args, float_row, load_doc  # noqa: E402

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
LLAMA = ("llama_cpp_python",)  # the GGUF rows run in llama.cpp


def key(method: str, setting: str, rotate: str) -> str:
    return f"{method}-{setting}-{rotate}"


def weight_key(method: str, setting: str, rotate: str) -> str:
    """Rows with the same weights (W4A4KV4 and W4A8KV8 share their quantization)."""
    w, a, kv = SETTINGS[setting]
    return f"{method}-w{w}-{'wa' if a < 16 or kv < 16 else 'wo'}-{rotate}"


def weight_setting(setting: str) -> str:
    """The setting whose command line quantizes the weights ``setting`` shares (the first in :data:`SETTINGS`
    with the same weight key): W4A8KV8's weights are W4A4KV4's quantization, evaluated with 8-bit activations."""
    return next(s for s in SETTINGS if weight_key("rtn", s, "none") == weight_key("rtn", setting, "none"))


ROWS_OF: dict[str, list[tuple[str, str, str]]] = {}  # weight key -> the rows that read those weights
SETTLED: set[str] = set()  # rows measured or reused by this invocation


def order(methods: list[str], settings: list[str]) -> list[tuple[str, str, str]]:
    """Every row, the check's first."""
    rows = [(m, s, r) for s in settings for r in ROTATIONS for m in methods]
    for row in rows:
        ROWS_OF.setdefault(weight_key(*row), []).append(row)
    first = [p for p in PRIORITY if p in rows]
    return first + [r for r in rows if r not in first]


def quantize_args(method: str, setting: str, rotate: str, a: argparse.Namespace) -> list[str]:
    """``turboboa quantize`` command line (without -o) of a row's weights."""
    w, act, kv = SETTINGS[setting]
    args = ["quantize", "smollm2-135m", "--method", method, "--bits", str(w), "--group-size", "-1",
            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed), "--device", a.device,
            "--rotate", rotate, "-q", "--json"]
    if act < 16 or kv < 16:
        args += ["--act-bits", str(act), "--kv-bits", str(kv), "--act-scope", "token"]
    return args


def dynamic_args(setting: str) -> list[str]:
    """``turboboa eval`` options that simulate a row's per-token activations and KV cache."""
    _, act, kv = SETTINGS[setting]
    return ["--act-bits", str(act), "--kv-bits", str(kv)] if act < 16 or kv < 16 else []


def calib_data(a: argparse.Namespace) -> dict[str, Any]:
    """Calibration and evaluation sizes of every row."""
    return {"calibration": pv.calibration_data(a.nsamples, a.seqlen),
            "evaluation": pv.evaluation_data(a.max_windows, a.eval_seqlen)}


def row_settings(method: str, setting: str, rotate: str, a: argparse.Namespace, ev: list[str]) -> dict[str, Any]:
    """A row's resolved settings: its weights' quantization and its evaluation."""
    return {"quantize": pv.quantize_settings(quantize_args(method, weight_setting(setting), rotate, a)[1:]),
            "eval": pv.command_options(["eval", "QDIR", *ev, *dynamic_args(setting)])}


def write_table(doc: dict, path: Path) -> None:
    """``rotation.md``: PPL and quantization time per setting, method and rotation, with each cell's
    provenance; the llama.cpp check; the provenance section."""
    s = doc["settings"]
    legend = pv.Legend()
    fl, fr = doc.get("float"), doc.get("float_rotated")
    floats = (f"Float PPL {fl['ppl']:.3f}; float with the Hadamard rotation fused {fr['ppl']:.3f} (relative "
              f"difference {fr['relative']:.1e}). ") if fl and fr else ""
    lines = [
        "# Rotation (QuaRot) and weight-activation quantization on SmolLM2-135M-Instruct (WikiText-2)",
        "",
        f"Calibration: {s['nsamples']} x {s['seqlen']} tokens of WikiText-2 validation (seed {s['seed']}), the same "
        f"for every row. Evaluation: WikiText-2 raw test, {s['max_windows'] or 'all'} windows of {s['eval_seqlen']} "
        f"tokens. {floats}"
        f"Weights per channel, asymmetric, Hessian-weighted range search except RTN (min-max). Activations: "
        f"per-token symmetric min-max; keys and values per token and head, asymmetric; with rotation the "
        f"down projection's input and queries/keys are rotated online. Each cell's machine and commit under Provenance.",
        "",
        *([doc["note"], ""] if doc.get("note") else []),
        "| setting | method | PPL, no rotation | PPL, Hadamard | quantize time (s), no rotation / Hadamard "
        "| provenance, no rotation / Hadamard |",
        "|---|---|---|---|---|---|",
    ]
    runs = doc["runs"]
    for setting in s["settings"]:
        for m in s["methods"]:
            cells = [runs.get(key(m, setting, r)) for r in ROTATIONS]
            ppl = [f"{c['ppl']:.3f}" if c else "not run" for c in cells]
            secs = " / ".join(f"{c['seconds']:.1f}" if c else "-" for c in cells)
            prov = " / ".join(legend.cell(c) for c in cells)
            lines.append(f"| {setting} | {m} | {ppl[0]} | {ppl[1]} | {secs} | {prov} |")
    g = doc.get("gguf")
    if g:
        lines += ["", "## The rotated model in llama.cpp", "",
                  "| run | fake-quant PPL | llama.cpp PPL | gap | provenance |", "|---|---|---|---|---|"]
        for name, r in g.items():
            lines.append(f"| {name} | {r['fakequant_ppl']:.3f} | {r['llamacpp_ppl']:.3f} | {100 * r['gap']:+.2f}% "
                         f"| {legend.cell(r)} |")
    lines += ["", *legend.section({"float model": fl, "float model, rotation fused": fr}, doc.get("machine"))]
    pv.write_text_atomic(path, "\n".join(lines) + "\n")


def write_chart(doc: dict, path: Path) -> None:
    """``rotation.png``: PPL per method without and with rotation, one panel per setting."""
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
        if doc.get("float"):
            ax.axhline(doc["float"]["ppl"], color="black", linestyle="--", linewidth=1, label="float")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), s["methods"])
        ax.set_title(setting)
        ax.set_ylabel("WikiText-2 PPL")
        ax.legend(fontsize=8)
    fig.tight_layout()
    pv.save_figure(fig, path, dpi=110)
    plt.close(fig)


def gguf_args(a: argparse.Namespace, rotate: str) -> list[str]:
    """``turboboa quantize`` arguments (after the subcommand, without -o) of the llama.cpp check's model."""
    return ["smollm2-135m", "--method", "turboboa", "--preset", "Q2_K", "--pad-to", "256", "--rotate", rotate,
            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--seed", str(a.seed), "--device", a.device,
            "-q", "--json"]


def gguf_settings(a: argparse.Namespace, ev: list[str], rotate: str) -> dict[str, Any]:
    """Resolved settings of the llama.cpp check with ``rotate``."""
    return {"quantize": pv.quantize_settings(gguf_args(a, rotate)),
            "export": pv.command_options(["export", "QDIR", "--to", "gguf", "-o", "model.gguf", "-q"]),
            "eval_fakequant": pv.command_options(["eval", "QDIR", *ev]),
            "eval_gguf": pv.command_options(["eval", "model.gguf", "--tokenizer", "QDIR", *ev])}


def gguf_check(ctx: pv.Context, a: argparse.Namespace, ev: list[str], rotate: str, settings: dict[str, Any]) -> dict:
    """TurboBoA on the padded Q2_K preset, exported to GGUF, its PPL in llama.cpp against its fake-quant PPL."""
    meter = pv.RowMeter()
    with tempfile.TemporaryDirectory() as tmp:
        qdir, gguf = Path(tmp) / "Q", Path(tmp) / "model.gguf"
        q = pv.cli_json(["quantize", *gguf_args(a, rotate), "-o", str(qdir)], meter)
        settings = {**settings, "quantize": pv.confirm_quantize(settings["quantize"], qdir)}
        if ctx.device.startswith("cuda"):
            meter.add(gpu=q["peak_memory_bytes"])
        meter.run([sys.executable, "-m", "cli", "export", str(qdir), "--to", "gguf", "-o", str(gguf), "-q"])
        fq = pv.cli_json(["eval", str(qdir), *ev], meter)
        gg = pv.cli_json(["eval", str(gguf), "--tokenizer", str(qdir), *ev], meter)
    measured = meter.result(quantize_seconds=q["seconds"], eval_tokens=gg["tokens"], eval_windows=gg["windows"])
    return {"rotate": rotate, "fakequant_ppl": fq["ppl"], "llamacpp_ppl": gg["ppl"],
            "gap": gg["ppl"] / fq["ppl"] - 1, "quantize_seconds": q["seconds"],
            "wall_seconds": measured["wall_seconds"],
            "provenance": ctx.record(settings, calib_data(a), measured, LLAMA)}


def float_rotated_row(ctx: pv.Context, doc: dict, ev: list[str], a: argparse.Namespace) -> bool:
    """Measure ``doc["float_rotated"]`` (the float model with the Hadamard rotation fused, and its relative
    difference to the float model) unless the stored one may be reused; True when measured now."""
    args = ["eval", "smollm2-135m", "--rotate", "hadamard", *ev]
    settings = {"eval": pv.command_options(args)}
    data = {"evaluation": pv.evaluation_data(a.max_windows, a.eval_seqlen)}
    row = doc.get("float_rotated")
    # the relative difference is to the float row: a float row measured after it makes it stale
    if row and pv.has_provenance(doc.get("float")) and (
            row.get("float_measured_at") != doc["float"]["provenance"]["measured_at"]):
        row = None
    if ctx.reuse("float, rotation fused", row, settings, data):
        return False
    meter = pv.RowMeter()
    rot = pv.cli_json(args, meter)
    rot["relative"] = abs(rot["ppl"] / doc["float"]["ppl"] - 1)
    rot["float_measured_at"] = doc["float"]["provenance"]["measured_at"]
    rot["provenance"] = ctx.record(settings, data, meter.result(eval_tokens=rot["tokens"],
                                                                eval_windows=rot["windows"]))
    doc["float_rotated"] = rot
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--no-gguf", action="store_true", help="skip the llama.cpp check of the rotated Q2_K GGUF")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TURBOBOA_CACHE", Path.home() / ".cache/turboboa"))
                    / "bench-rotation", help="QDIRs shared by two rows, kept until both are measured")
    ap.add_argument("--note", default=None)
    pv.add_arguments(ap)
    a = ap.parse_args()
    ctx = pv.Context.start(a.device, a.fresh, exclude=[a.out, a.work])
    a.device = ctx.device
    a.work = a.work.resolve()  # the steps run in the repository
    a.out.mkdir(parents=True, exist_ok=True)
    settings = {"methods": a.methods.split(","), "settings": a.settings.split(","), "nsamples": a.nsamples,
                "seqlen": a.seqlen, "seed": a.seed, "eval_seqlen": a.eval_seqlen, "max_windows": a.max_windows,
                "model": "smollm2-135m"}
    out_json = a.out / "rotation.json"
    doc = load_doc(out_json, settings, a.note)
    ev = eval_args(a.eval_seqlen, a.max_windows, ctx.device)

    def save() -> None:
        rows = [doc.get("float"), doc.get("float_rotated"), *doc["runs"].values(), *doc.get("gguf", {}).values()]
        pv.drop_legacy_fields(doc, rows)
        pv.write_json_atomic(out_json, doc)
        write_table(doc, a.out / "rotation.md")
        write_chart(doc, a.out / "rotation.png")

    measured = float_row(ctx, doc, ev, a.eval_seqlen, a.max_windows)
    if float_rotated_row(ctx, doc, ev, a) or measured:
        save()
    rows = order(settings["methods"], settings["settings"])
    first = [r for r in rows if r in PRIORITY]
    boa = [r for r in rows if r[0] == "boa" and r not in PRIORITY]
    rest = [r for r in rows if r not in first and r not in boa]
    # the check's rows and the rotated GGUF first, then the other rows, BoA's (the slowest solver) last
    run_rows(ctx, first, doc, a, ev, save)
    if not a.no_gguf:
        gguf_rows(ctx, doc, a, ev, save, ("hadamard",))
    run_rows(ctx, rest, doc, a, ev, save)
    if not a.no_gguf:
        gguf_rows(ctx, doc, a, ev, save, ("none",))
    run_rows(ctx, boa, doc, a, ev, save)
    save()


def gguf_rows(ctx: pv.Context, doc: dict, a: argparse.Namespace, ev: list[str], save: Callable[[], None],
              rotations: tuple[str, ...]) -> None:
    """The llama.cpp checks with ``rotations`` not reusable from ``doc``."""
    doc.setdefault("gguf", {})
    for rotate in rotations:
        name = f"turboboa Q2_K pad 256, rotate {rotate}"
        settings = gguf_settings(a, ev, rotate)
        if ctx.reuse(name, doc["gguf"].get(name), settings, calib_data(a), LLAMA):
            continue
        doc["gguf"][name] = gguf_check(ctx, a, ev, rotate, settings)
        r = doc["gguf"][name]
        print(f"{name}: fake-quant {r['fakequant_ppl']:.3f}, llama.cpp {r['llamacpp_ppl']:.3f}", flush=True)
        save()


def shared_weights(ctx: pv.Context, method: str, setting: str, rotate: str, a: argparse.Namespace,
                   settings: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The QDIR of a row's weights in ``a.work`` and its summary (quantize output, QDIR record, measurement):
    the one kept there when it was made for the same settings, commit, machine and versions (and, from a dirty
    tree or under --fresh, by this invocation), else made now."""
    wk = weight_key(method, setting, rotate)
    qdir, summary = a.work / wk, a.work / f"{wk}.json"
    if ctx.cache_valid(summary, settings, calib_data(a)) and qdir.is_dir():
        return qdir, json.loads(summary.read_text())
    shutil.rmtree(qdir, ignore_errors=True)
    meter = pv.RowMeter()
    q = pv.cli_json([*quantize_args(method, weight_setting(setting), rotate, a), "-o", str(qdir)], meter)
    if ctx.device.startswith("cuda"):
        meter.add(gpu=q["peak_memory_bytes"])
    rec = pv.qdir_record(qdir)
    result = {"q": q, "qdir": rec, "settings": pv.confirm_quantize(settings, qdir),
              "measured": meter.result(quantize_seconds=q["seconds"])}
    pv.write_json_atomic(summary, result)
    ctx.mark_cache(summary, settings, calib_data(a))
    return qdir, result


def run_rows(ctx: pv.Context, rows: list[tuple[str, str, str]], doc: dict, a: argparse.Namespace, ev: list[str],
             save: Callable[[], None]) -> None:
    """Quantize and evaluate the ``rows`` not reusable from ``doc``. W4A4KV4 and W4A8KV8 share one
    quantization, kept in ``a.work`` (with its summary) until both rows are settled, so an interrupted
    benchmark does not solve it twice."""
    a.work.mkdir(parents=True, exist_ok=True)
    data = calib_data(a)
    for method, setting, rotate in rows:
        k = key(method, setting, rotate)
        wk = weight_key(method, setting, rotate)
        settings = row_settings(method, setting, rotate, a, ev)
        if not ctx.reuse(k, doc["runs"].get(k), settings, data):
            qdir, shared = shared_weights(ctx, method, setting, rotate, a, settings["quantize"])
            settings = {**settings, "quantize": shared["settings"]}
            meter = pv.RowMeter()
            meter.absorb(shared["measured"])
            e = pv.cli_json(["eval", str(qdir), *ev, *dynamic_args(setting)], meter)
            q, rec = shared["q"], shared["qdir"]
            measured = meter.result(quantize_seconds=q["seconds"], eval_tokens=e["tokens"],
                                    eval_windows=e["windows"], weights_shared_with=wk)
            doc["runs"][k] = {"method": method, "setting": setting, "rotate": rotate, "ppl": e["ppl"],
                              "seconds": q["seconds"], "wall_seconds": shared["measured"]["wall_seconds"],
                              "phase_seconds": rec["phase_seconds"], "peak_memory_bytes": q["peak_memory_bytes"],
                              "weights_shared_with": wk, "provenance": ctx.record(settings, data, measured)}
            print(f"{k}: ppl {e['ppl']:.3f}, quantize {q['seconds']:.1f} s", flush=True)
            save()
        SETTLED.add(k)
        if all(key(*r) in SETTLED for r in ROWS_OF.get(wk, [])):
            shutil.rmtree(a.work / wk, ignore_errors=True)
            (a.work / f"{wk}.json").unlink(missing_ok=True)
            (a.work / f"{wk}.json.provenance.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
