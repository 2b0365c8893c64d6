"""Our GGUF files against llama.cpp's own quantizer, measured by one evaluator.

``--model``: ``smollm2-135m`` (default; its 576-wide layers take no 256-column type, so our padded files
``--pad-to 256`` are the comparison that holds k-quants and i-quants) or ``qwen2.5-coder-1.5b`` (every width
takes every type). ``--presets``: the k-quant file types (Q4_0, Q2_K, Q3_K_S, Q3_K_M, Q4_K_M) and the i-quant
ones (IQ1_S ... IQ4_XS, ``--presets iq`` for all of them). For each file type:

* llama.cpp: an F32 GGUF of the same float model quantized by ``llama-quantize``, without and with an
  importance matrix from ``llama-imatrix`` on the calibration text we use (WikiText-2 validation rows,
  ``nsamples`` chunks of ``seqlen`` tokens);
* ours: ``turboboa quantize --preset P`` (TurboBoA, ``nsamples x seqlen`` calibration tokens), without
  ``--pad-to`` (with ``--rotate auto``: the Hadamard rotation unless it would untie a tied head, so none for
  SmolLM2) and with ``--pad-to 256`` (unrotated, with the Hadamard rotation, or with ``--pad-order
  activation``), exported
  with ``turboboa export --to gguf``. ``--makers`` picks among these; a ``+damp<x>`` part on one of ours
  (``turboboa+damp0.2``) quantizes with ``--damp x``, a row of its own.

Every file is run in llama.cpp (llama-cpp-python) on the same WikiText-2 test windows, tokens from the same
Hugging Face tokenizer: its PPL and its mean KL divergence ``KL(p_float || p_file)`` per predicted token to the
F32 file of the float model (whose log-probabilities are kept on disk as fp16, one file per window). Each of
our files is also checked against the QDIR it was exported from: every quantized tensor decoded by
``gguf.quants.dequantize`` equal to the fake-quant weight, and llama.cpp's PPL within ``turboboa check``'s 1% of
the fake-quant model's (``turboboa eval QDIR``) on the same windows; a reused row of ours without that check
gets it when its files are still in the work folder. A llama.cpp+imatrix file's time is llama-quantize's: the
importance matrix they all share is timed once (``imatrix`` in the JSON file). Writes
``bench/results/<name>.{json,md,png}`` after every file (``<name>``: ``gguf-vs-llamacpp`` for the k-quant file
types of the default model, else ``--name``, by default ``gguf-vs-llamacpp-<model>-<k|iq>``); a rerun
reuses a row only when its provenance (settings, data sizes, machine, library versions; ``bench/provenance.py``)
matches the current run, ``--fresh`` measures every row again. Our quantizations run with ``--resume``: one
interrupted with the script continues from its last finished block when the script runs again (its quantize
time is then that run's wall time plus the compute of the blocks finished before it; the row records
``resumed_from_block``). ``--device`` is our quantization's; llama.cpp
runs on the CPU. The tools are built by ``bench/llamacpp_tools.py`` into a cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import provenance as pv  # noqa: E402

from turboboa.checksums import sha256_file  # noqa: E402
from turboboa.formats.presets import I_PRESETS, K_PRESETS, PRESETS  # noqa: E402

LLAMA = ("llama_cpp_python",)  # every row runs in llama.cpp (its tools are built from that package's source)
THREADS = 2  # llama.cpp threads of llama-quantize, llama-imatrix and the evaluation
LEGACY_SETTINGS = ("n_params", "machine", "llama_cpp_python")  # document-level fields of earlier runs


def run(cmd: list[str], log: Path, meter: pv.RowMeter | None = None) -> None:
    """Run ``cmd`` (counted in ``meter`` when given), its output appended to ``log``; raise with the log's path on
    failure."""
    (meter or pv.RowMeter()).run(cmd, cwd=pv.ROOT, log=log)


def float_gguf(ctx: pv.Context, work: Path, model: str) -> tuple[Path, Path, int]:
    """The F32 GGUF of the model alias ``model`` (tokenizer metadata copied from the source GGUF), the HF
    tokenizer folder of the float model, and its parameter count. The GGUF is kept in ``work`` for the commit,
    machine and versions that made it (:meth:`provenance.Context.cache_valid`)."""
    from exporters.gguf import float_tensors, write_gguf
    from turboboa.models import load_float_model
    from turboboa.models.loader import alias_gguf_path

    loaded = load_float_model(model)
    n_params = sum(p.numel() for p in loaded.model.parameters())
    path = work / f"{model}-f32.gguf"
    made_for: dict[str, Any] = {"model": model, "type": "F32"}
    if not ctx.cache_valid(path, made_for, {}):
        write_gguf(path, loaded.model.config, None, float_tensors(loaded.model.state_dict()),
                   source_gguf=alias_gguf_path(model))  # (written atomically)
        ctx.mark_cache(path, made_for, {})
    cache_dir = loaded.cache_dir
    del loaded
    return path, cache_dir, n_params


def calibration_text(work: Path) -> Path:
    """The calibration text (WikiText-2 validation) as a file for llama-imatrix."""
    from turboboa.data import resolve_text

    path = work / "calib.txt"
    if not path.exists():
        text, _ = resolve_text("wikitext2", "calib")
        pv.write_text_atomic(path, text)
    return path


class KLTap:
    """A llama.cpp logits function that also accumulates ``KL(p_float || p_file)`` over the predicted tokens of
    each window it runs, against the float model's log-probabilities in ``reference`` (``window-<i>.npy``,
    fp16); with ``record`` it writes them instead (the float file's own run)."""

    def __init__(self, fn: Any, reference: Path, record: bool) -> None:
        self.fn, self.reference, self.record = fn, reference, record
        self.window, self.kl, self.tokens = 0, 0.0, 0

    def __call__(self, ids: Any) -> Any:
        import numpy as np
        import torch

        logits = self.fn(ids)
        logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        path = self.reference / f"window-{self.window}.npy"
        if self.record:
            np.save(path, logp.to(torch.float16).numpy())
        else:
            ref = torch.from_numpy(np.load(path)).double()
            self.kl += float((ref.exp() * (ref - logp)).sum())
            self.tokens += logp.shape[0]
        self.window += 1
        return logits


def evaluate(path: Path, tokenizer: Path, seqlen: int, windows: int, reference: Path,
             record: bool = False) -> dict:
    """PPL and mean KL divergence to the float model (:class:`KLTap`) of a GGUF file in llama.cpp on the first
    ``windows`` test windows, tokens from ``tokenizer``."""
    from transformers import AutoTokenizer

    from runtime_check.llamacpp import gguf_logits_fn, validate_gguf
    from turboboa.data import eval_tokens
    from turboboa.eval.perplexity import make_windows, perplexity

    validate_gguf(path)
    reference.mkdir(parents=True, exist_ok=True)
    ids = eval_tokens(AutoTokenizer.from_pretrained(str(tokenizer)), "wikitext2")
    with gguf_logits_fn(path, n_ctx=seqlen, threads=THREADS) as fn:
        tap = KLTap(fn, reference, record)
        res = perplexity(tap, make_windows(ids, seqlen, windows), "llama.cpp", progress=False).to_dict()
    res["kld"] = 0.0 if record else tap.kl / max(1, tap.tokens)
    return res


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    """How every file is scored."""
    return {"backend": "llama.cpp (llama-cpp-python, CPU)", "data": "wikitext2", "seqlen": args.eval_seqlen,
            "max_windows": args.max_windows, "threads": THREADS, "tokenizer": "the float model's (Hugging Face)",
            "kld": "mean KL(p_float || p_file) per token, float: the F32 file in llama.cpp (fp16 log-probs)"}


def quantize_args(args: argparse.Namespace, preset: str, maker: str) -> list[str]:
    """``turboboa quantize`` arguments (after the subcommand, without -o) of one of our files."""
    cmd = [args.model, "--method", args.method, "--preset", preset, "--nsamples", str(args.nsamples),
           "--seqlen", str(args.seqlen), "--device", args.device, "-q"]
    parts = maker.split("+")[1:]
    if "pad256" in parts:  # turboboa+pad256: padded, unrotated; +hadamard: what --rotate auto does
        cmd += ["--pad-to", "256", "--rotate", "hadamard" if "hadamard" in parts else "none"]
    if "act" in parts:  # +act: the zero channels beside the largest activations (--pad-order activation)
        cmd += ["--pad-order", "activation"]
    cmd += [a for part in parts if part.startswith("damp") for a in ("--damp", part.removeprefix("damp"))]
    return cmd


def check_maker(maker: str) -> str | None:
    """Why ``maker`` names no file this script can make (None when it does): ``llama.cpp``,
    ``llama.cpp+imatrix``, or ``turboboa`` followed by any of ``+pad256``, ``+hadamard`` and ``+act`` (each with
    ``+pad256``; ``+act`` is ``--pad-order activation``) and ``+damp<x>`` (our quantize's ``--damp x``)."""
    if maker in ("llama.cpp", "llama.cpp+imatrix"):
        return None
    base, *parts = maker.split("+")
    if base != "turboboa":
        return (f"unknown maker {maker!r}: use llama.cpp, llama.cpp+imatrix or "
                "turboboa[+pad256[+hadamard][+act]][+damp<x>]")
    for part in parts:
        if part.startswith("damp"):
            try:
                float(part.removeprefix("damp"))
            except ValueError:
                return f"maker {maker!r}: {part!r} is not +damp<number>, e.g. +damp0.2"
        elif part not in ("pad256", "hadamard", "act") or (part != "pad256" and "pad256" not in parts):
            return f"maker {maker!r}: unknown part {part!r}; use +pad256, +pad256+hadamard, +pad256+act or +damp<x>"
    return None


def row_settings(args: argparse.Namespace, preset: str, maker: str) -> dict[str, Any]:
    """Resolved settings of one file: llama-quantize's (with or without the importance matrix) or every
    option of our quantize and export, and the evaluation."""
    if maker.startswith("llama.cpp"):
        imatrix = ({"tool": "llama-imatrix", "calibration": "wikitext2", "chunks": args.nsamples,
                    "ctx": args.seqlen, "threads": THREADS} if maker.endswith("imatrix") else None)
        made = {"llama_quantize": {"source": f"F32 GGUF of {args.model}", "type": preset, "threads": THREADS,
                                   "imatrix": imatrix}}
    else:
        made = {"quantize": pv.quantize_settings(quantize_args(args, preset, maker)),
                "export": pv.command_options(["export", "QDIR", "--to", "gguf", "-o", "model.gguf"])}
    return {"preset": preset, "maker": maker, **made, "eval": eval_settings(args)}


def row_data(args: argparse.Namespace) -> dict[str, Any]:
    """Calibration and evaluation sizes of every file."""
    return {"calibration": pv.calibration_data(args.nsamples, args.seqlen),
            "evaluation": pv.evaluation_data(args.max_windows, args.eval_seqlen)}


def plot(rows: list[dict], float_ppl: float | None, out: Path, title: str) -> None:
    """``gguf-vs-llamacpp.png``: PPL in llama.cpp against file size, one line per maker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"llama.cpp": ("o", "tab:gray"), "llama.cpp+imatrix": ("s", "tab:blue"),
              "turboboa": ("^", "tab:red"), "turboboa+pad256": ("D", "tab:green"),
              "turboboa+pad256+hadamard": ("v", "tab:purple"), "turboboa+pad256+act": ("D", "tab:olive")}
    others = iter([("P", "tab:orange"), ("X", "tab:brown"), ("*", "tab:pink"), ("h", "tab:cyan")])
    styles |= {m: next(others, ("x", "black")) for m in dict.fromkeys(r["maker"] for r in rows) if m not in styles}
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
    ax.set_title(f"{title}: turboboa GGUF vs llama-quantize")
    ax.legend(fontsize=8)
    fig.tight_layout()
    pv.save_figure(fig, out, dpi=120)
    plt.close(fig)


def write_table(doc: dict, out: Path) -> None:
    """``gguf-vs-llamacpp.md``: every file's PPL, size and provenance, the dominance check, the provenance
    section."""
    s = doc["settings"]
    legend = pv.Legend()
    lines = [
        f"# GGUF files: turboboa vs llama.cpp's quantizer ({s.get('model', 'smollm2-135m')})",
        "",
        f"Calibration: {s['nsamples']} x {s['seqlen']} tokens of WikiText-2 validation (turboboa: TurboBoA; "
        f"llama-imatrix: {s['nsamples']} chunks of {s['seqlen']} tokens of the same text). Evaluation: "
        f"llama.cpp (llama-cpp-python, CPU) on the first {s['windows']} windows of "
        f"{s['eval_seqlen']} WikiText-2 test tokens, same HF tokens for every file. Each row's machine, commit "
        "and llama-cpp-python version under Provenance.",
        "Bits per weight: 8 x file size / parameters of the original model "
        f"({s['n_params']:,}), so padded files pay for their padding.",
        "",
        "KL: mean KL divergence per token from the float model (F32 file in llama.cpp) to the file.",
        "",
        *([f"Quantize s: making the file from the float model (ours: calibration included). llama-imatrix's "
           f"importance matrix, shared by every llama.cpp+imatrix file and not in their time, took "
           f"{doc['imatrix']['seconds']:.0f} s ({legend.cell(doc['imatrix'])}).", ""] if doc.get("imatrix") else []),
        "| preset | maker | PPL | KL | file MiB | bits/weight | quantize s | provenance |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    if doc.get("float"):
        f = doc["float"]
        lines.append(f"| F32 | float | {f['ppl']:.3f} | 0 | {f['file_mib']:.1f} | {f['bpw']:.2f} | | "
                     f"{legend.cell(f)} |")
    for r in sorted(doc["rows"], key=lambda r: (r["file_mib"], r["maker"])):
        kld = f"{r['kld']:.4f}" if "kld" in r else ""
        lines.append(f"| {r['preset']} | {r['maker']} | {r['ppl']:.3f} | {kld} | {r['file_mib']:.1f} | "
                     f"{r['bpw']:.3f} | {r.get('quantize_seconds', 0):.0f} | {legend.cell(r)} |")
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
    ours = sorted((r for r in doc["rows"] if r["maker"].startswith("turboboa")), key=lambda r: r["file_mib"])
    if ours:
        lines += ["", "## Our files against their QDIR", "",
                  "Weights: quantized tensors of the file whose `gguf.quants.dequantize` equals the QDIR's fake-quant "
                  "weight exactly. Gap: llama.cpp's PPL above over the fake-quant model's (`turboboa eval QDIR`, "
                  f"torch) on the same windows, minus 1; passes within {tolerances(ours)} (`turboboa check`'s "
                  "tolerance for the model family) with every tensor exact.", "",
                  "| preset | maker | weights exact | llama.cpp PPL | fake-quant PPL | gap | passed | provenance |",
                  "|---|---|---:|---:|---:|---:|---|---|"]
        for r in ours:
            c = r.get("file_check")
            if c is None:
                lines.append(f"| {r['preset']} | {r['maker']} | not checked | {r['ppl']:.3f} | | | | |")
                continue
            lines.append(f"| {r['preset']} | {r['maker']} | {c['bit_exact_tensors']}/{c['tensors']} | "
                         f"{c['llama_cpp_ppl']:.3f} | {c['fake_quant_ppl']:.3f} | {c['gap']:+.2%} | "
                         f"{'yes' if c['passed'] else 'NO'} | {legend.cell(c)} |")
    legacy = s.get("machine")
    if legacy and s.get("llama_cpp_python"):
        legacy = f"{legacy}, llama-cpp-python {s['llama_cpp_python']}"
    lines += ["", *legend.section(legacy_machine=legacy)]
    pv.write_text_atomic(out, "\n".join(lines) + "\n")


def file_paths(work: Path, model: str, preset: str, maker: str) -> tuple[Path, Path]:
    """The GGUF file of one row and, for our rows, the QDIR it is exported from."""
    return (work / f"{model}-{preset}-{maker.replace('+', '-').replace('.', '')}.gguf",
            work / f"{model}-{preset}-{maker.replace('+', '-')}.qdir")


def tolerances(rows: list[dict[str, Any]]) -> str:
    """The gap tolerances our checked rows were judged by, as text ("1%")."""
    tols = sorted({r["file_check"]["provenance"]["settings"]["gap_tol"] for r in rows if "file_check" in r})
    return " / ".join(f"{t:.0%}" for t in tols) or "the tolerance"


def check_settings(args: argparse.Namespace, gap_tol: float) -> dict[str, Any]:
    """How one of our files is checked against its QDIR (:func:`file_check`): ``gap_tol`` is ``turboboa
    check``'s default for the model family."""
    return {"weights": "max |gguf.quants.dequantize(file tensor) - fake-quant weight| per quantized tensor",
            "fake_quant": pv.command_options(["eval", "QDIR", *fake_quant_eval_args(args)]),
            "gap_tol": gap_tol}


def fake_quant_eval_args(args: argparse.Namespace) -> list[str]:
    """``turboboa eval QDIR`` options that score the fake-quant model on the windows llama.cpp scores."""
    return ["--seqlen", str(args.eval_seqlen), "--max-windows", str(args.max_windows), "--device", args.device,
            "-q", "--json"]


def file_check(ctx: pv.Context, args: argparse.Namespace, qdir: Path, target: Path,
               llama_ppl: float) -> dict[str, Any]:
    """One of our files against the QDIR it was exported from: every quantized tensor of the file decodes to the
    fake-quant weight exactly (:func:`runtime_check.checker.weight_diffs`), and llama.cpp's PPL of the file on the
    evaluation windows against the fake-quant model's (``turboboa eval QDIR``, torch) on the same windows:
    ``gap = PPL_llama.cpp / PPL_fake-quant - 1``, within ``turboboa check``'s tolerance."""
    from transformers import AutoConfig

    from runtime_check.checker import default_gguf_tol, weight_diffs, weight_summary
    from turboboa.checkpoint import load_qdir

    tol = default_gguf_tol(AutoConfig.from_pretrained(qdir))
    meter = pv.RowMeter()
    weights = weight_summary(target, weight_diffs("gguf", target, load_qdir(qdir)))
    fake = pv.cli_json(["eval", str(qdir), *fake_quant_eval_args(args)], meter)
    gap = llama_ppl / fake["ppl"] - 1
    measured = meter.result(eval_tokens=fake["tokens"], eval_windows=fake["windows"])
    return {"tensors": weights["tensors"], "bit_exact_tensors": weights["tensors"] - len(weights["failing"]),
            "max_abs_diff": weights["max_abs_diff"], "failing": sorted(weights["failing"]),
            "fake_quant_ppl": fake["ppl"], "llama_cpp_ppl": llama_ppl, "gap": gap,
            "passed": weights["passed"] and abs(gap) <= tol,
            "provenance": ctx.record(check_settings(args, tol), row_data(args), measured, LLAMA)}


def backfill_check(ctx: pv.Context, args: argparse.Namespace, row: dict[str, Any], work: Path) -> bool:
    """Check a reused row of ours that has no :func:`file_check` yet, when its QDIR and file are still in ``work``
    and the file is the one the row measured (its SHA-256 where the row recorded it, else its size); whether it
    was checked."""
    target, qdir = file_paths(work, args.model, row["preset"], row["maker"])
    if "file_check" in row or not row["maker"].startswith("turboboa") or not (target.exists() and qdir.exists()):
        return False
    if target.stat().st_size != row["file_mib"] * 2**20:
        return False
    digest = sha256_file(target)
    if row.setdefault("file_sha256", digest) != digest:
        return False
    row["file_check"] = file_check(ctx, args, qdir, target, row["ppl"])
    return True


def measure(ctx: pv.Context, args: argparse.Namespace, preset: str, maker: str, settings: dict[str, Any],
            paths: dict[str, Any], n_params: int) -> dict[str, Any]:
    """Make one file (llama-quantize, or our quantize and export) and score it in llama.cpp; the row. A
    llama.cpp+imatrix row's time is llama-quantize's: the importance matrix all of them share is timed apart."""
    work, log = paths["work"], paths["log"]
    imatrix = paths["imatrix"]() if maker == "llama.cpp+imatrix" else None  # before this row's clock starts
    meter = pv.RowMeter()
    target, qdir = file_paths(work, args.model, preset, maker)
    resumed, earlier = None, 0.0
    if maker.startswith("llama.cpp"):
        cmd = [str(paths["tools"] / "llama-quantize")]
        if imatrix is not None:
            cmd += ["--imatrix", str(imatrix)]
        run(cmd + [str(paths["f32"]), str(target), preset, str(THREADS)], log, meter)
    else:
        # --resume: a quantization interrupted with this script continues from its last finished block; one
        # whose resume is refused (left by another configuration or version: exit code 2) starts over
        quantize = [sys.executable, "-m", "cli", "quantize", *quantize_args(args, preset, maker), "-o", str(qdir)]
        if meter.run([*quantize, "--resume"], cwd=pv.ROOT, log=log, ok=(0, 2)).returncode == 2:
            run(quantize, log, meter)
        settings = {**settings, "quantize": pv.confirm_quantize(settings["quantize"], qdir)}
        rec = pv.qdir_record(qdir)
        if str(rec["device"]).startswith("cuda"):
            meter.add(gpu=rec["peak_memory_bytes"])
        run([sys.executable, "-m", "cli", "export", str(qdir), "--to", "gguf", "-o", str(target)], log, meter)
        resumed = rec["resumed_from_block"]
        # a resumed quantization: this invocation's wall time plus the compute of the blocks finished before it
        earlier = sum(rec["block_seconds"][:resumed]) if resumed else 0.0
    seconds = meter.result()["wall_seconds"] + earlier
    r = evaluate(target, paths["tokenizer"], args.eval_seqlen, args.max_windows, paths["reference"])
    size = target.stat().st_size
    measured = meter.result(quantize_seconds=seconds, eval_tokens=r["tokens"], eval_windows=r["windows"],
                            evaluated_in_process=True, resumed_from_block=resumed)
    row = {"preset": preset, "maker": maker, "ppl": r["ppl"], "kld": r["kld"], "file_mib": size / 2**20,
           "bpw": 8 * size / n_params, "quantize_seconds": round(seconds, 1), "file": target.name,
           "file_sha256": sha256_file(target), "provenance": ctx.record(settings, row_data(args), measured, LLAMA)}
    if not maker.startswith("llama.cpp"):
        row["file_check"] = file_check(ctx, args, qdir, target, r["ppl"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model alias: smollm2-135m or qwen2.5-coder-1.5b")
    ap.add_argument("--presets", default=",".join(K_PRESETS),
                    help="comma-separated file types; 'k' for every k-quant one, 'iq' for every i-quant one")
    ap.add_argument("--name", default=None, help="results file name (default: from the model and the presets)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=16)
    ap.add_argument("--method", default="turboboa")
    ap.add_argument("--makers", default="llama.cpp,llama.cpp+imatrix,turboboa,turboboa+pad256,turboboa+pad256+hadamard",
                    help="which files to make (comma-separated); +damp<x> on a turboboa maker passes --damp x")
    ap.add_argument("--work", default=None, help="work folder (default: $TURBOBOA_CACHE/bench-gguf)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    pv.add_arguments(ap)
    args = ap.parse_args()

    from llamacpp_tools import build

    cache = Path(os.environ.get("TURBOBOA_CACHE", Path.home() / ".cache" / "turboboa"))
    work = (Path(args.work) if args.work else cache / "bench-gguf").resolve()  # the steps run in the repository
    out = Path(args.out)
    ctx = pv.Context.start(args.device, args.fresh, exclude=[out, work])
    args.device = ctx.device  # our quantization's; llama.cpp runs on the CPU
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    out.mkdir(parents=True, exist_ok=True)
    presets = {"k": ",".join(K_PRESETS), "iq": ",".join(I_PRESETS)}.get(args.presets, args.presets).split(",")
    for preset in presets:
        if preset not in PRESETS:
            ap.error(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    for maker in args.makers.split(","):
        if (why := check_maker(maker)) is not None:
            ap.error(why)
    family = "iq" if presets[0] in I_PRESETS else "k"
    name = args.name or ("gguf-vs-llamacpp" if (args.model, family) == ("smollm2-135m", "k")
                         else f"gguf-vs-llamacpp-{args.model}-{family}")
    settings = {"nsamples": args.nsamples, "seqlen": args.seqlen, "eval_seqlen": args.eval_seqlen,
                "windows": args.max_windows, "method": args.method, "model": args.model}
    json_path = out / f"{name}.json"
    doc = json.loads(json_path.read_text()) if json_path.exists() else {}
    if {k: v for k, v in doc.get("settings", {}).items() if k not in LEGACY_SETTINGS} != settings:
        doc = {"settings": dict(settings), "rows": []}

    def save() -> None:
        pv.drop_legacy_fields(doc, [doc.get("float"), *doc["rows"]], ("machine", "llama_cpp_python"),
                              holder=doc["settings"])
        pv.write_json_atomic(json_path, doc)
        write_table(doc, out / f"{name}.md")
        plot(doc["rows"], doc.get("float", {}).get("ppl"), out / f"{name}.png", args.model)

    tools = build()
    f32, tokenizer, n_params = float_gguf(ctx, work, args.model)
    doc["settings"]["n_params"] = n_params
    float_settings = {"file": f"F32 GGUF of {args.model}", "eval": eval_settings(args)}
    float_data = {"evaluation": pv.evaluation_data(args.max_windows, args.eval_seqlen)}
    reference = work / f"{args.model}-logp-{args.max_windows}x{args.eval_seqlen}"
    recorded = all((reference / f"window-{i}.npy").exists() for i in range(args.max_windows))
    if not recorded or not ctx.reuse("F32", doc.get("float"), float_settings, float_data, LLAMA):
        meter = pv.RowMeter()
        r = evaluate(f32, tokenizer, args.eval_seqlen, args.max_windows, reference, record=True)
        measured = meter.result(eval_tokens=r["tokens"], eval_windows=r["windows"], evaluated_in_process=True)
        doc["float"] = {"ppl": r["ppl"], "file_mib": f32.stat().st_size / 2**20,
                        "bpw": 8 * f32.stat().st_size / n_params,
                        "provenance": ctx.record(float_settings, float_data, measured, LLAMA)}
        save()
    imatrix = work / f"imatrix-{args.model}-{args.nsamples}x{args.seqlen}.gguf"

    def importance_matrix() -> Path:
        """llama-imatrix's file for our calibration text, made when a row first needs it."""
        imatrix_for = row_settings(args, PRESETS[0], "llama.cpp+imatrix")["llama_quantize"]["imatrix"]
        if not ctx.cache_valid(imatrix, imatrix_for, row_data(args), LLAMA):
            imatrix.unlink(missing_ok=True)
            meter = pv.RowMeter()
            run([str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(calibration_text(work)), "-o",
                 str(imatrix), "-c", str(args.seqlen), "--chunks", str(args.nsamples), "-t", str(THREADS)], log,
                meter)
            ctx.mark_cache(imatrix, imatrix_for, row_data(args), LLAMA)
            doc["imatrix"] = {"seconds": meter.result()["wall_seconds"],
                              "provenance": ctx.record(imatrix_for, row_data(args), meter.result(), LLAMA)}
            save()
        return imatrix

    paths = {"work": work, "log": log, "tools": tools, "f32": f32, "imatrix": importance_matrix,
             "tokenizer": tokenizer, "reference": reference}
    for preset in presets:
        for maker in args.makers.split(","):
            settings_row = row_settings(args, preset, maker)
            at = next((i for i, r in enumerate(doc["rows"]) if (r["preset"], r["maker"]) == (preset, maker)), None)
            if ctx.reuse(f"{preset} {maker}", None if at is None else doc["rows"][at], settings_row,
                         row_data(args), LLAMA):
                if backfill_check(ctx, args, doc["rows"][at], work):
                    save()
                continue
            row = measure(ctx, args, preset, maker, settings_row, paths, n_params)
            if at is None:
                doc["rows"].append(row)
            else:
                doc["rows"][at] = row
            print(json.dumps({k: v for k, v in row.items() if k != "provenance"}), flush=True)
            save()
    save()
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
