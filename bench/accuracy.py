"""``make accuracy``: the accuracy claims on the default model, each with its threshold, as a resumable benchmark.

Every configuration is quantized in its own process and scored on WikiText-2 raw test windows of 512 tokens,
16 x 512 calibration tokens (seed 0). The checks:

* ``gptq-w4-g128-within-10pct``: GPTQ 4 bits, group 128, with the Hadamard rotation (``--rotate hadamard``;
  the default leaves SmolLM2 unrotated, since rotating unties its head) scores at most 1.10 x the float
  model's PPL on 8 windows.
* ``turboboa-w4-g128-vs-gptq``: TurboBoA scores no higher than GPTQ at 4 bits, group 128, both with the
  defaults, on 8 windows.
* ``w3-per-channel-ordering``: TurboBoA < GPTQ < RTN at 3 bits per output channel, defaults, on 4 windows.
* ``rotation-gain-gptq-w3``: the Hadamard rotation lowers GPTQ's PPL at 3 bits per channel, on 4 windows
  (the embedding and head are q8_0 in both: rotated, the untied head takes the same type as the tied table).
* ``defaults-gptq-w4-g128``: GPTQ 4 bits, group 128, with every default (informational: no threshold).

Rows record their provenance (``bench/provenance.py``) and are reused only when settings, data sizes, machine
and library versions match; ``--fresh`` measures every row again. Results: ``bench/results/accuracy.{json,md}``.
The exit code is 1 when a check fails, so ``make accuracy`` fails with it.

    .venv/bin/python bench/accuracy.py [--device cpu|cuda] [--fresh]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import methods as mb  # noqa: E402
import provenance as pv  # noqa: E402

NSAMPLES, SEQLEN, EVAL_SEQLEN, SEED = 16, 512, 512, 0
WITHIN = 0.10  # the GPTQ 4-bit group-128 bound: at most 10% above the float model's PPL


@dataclass(frozen=True)
class Row:
    """One quantized configuration: ``turboboa quantize`` options and the windows it is scored on."""

    name: str
    options: tuple[str, ...]
    windows: int


ROWS = (
    Row("gptq-w4-g128-rotated", ("--method", "gptq", "--bits", "4", "--group-size", "128", "--rotate", "hadamard"),
        8),
    Row("gptq-w4-g128", ("--method", "gptq", "--bits", "4", "--group-size", "128"), 8),
    Row("turboboa-w4-g128", ("--method", "turboboa", "--bits", "4", "--group-size", "128"), 8),
    Row("rtn-w3-pc", ("--method", "rtn", "--bits", "3", "--group-size", "-1"), 4),
    Row("gptq-w3-pc", ("--method", "gptq", "--bits", "3", "--group-size", "-1"), 4),
    Row("turboboa-w3-pc", ("--method", "turboboa", "--bits", "3", "--group-size", "-1"), 4),
    Row("gptq-w3-pc-rotated", ("--method", "gptq", "--bits", "3", "--group-size", "-1", "--rotate", "hadamard"), 4),
)


def checks(ppl: dict[str, float], float_ppl: dict[int, float]) -> list[dict[str, Any]]:
    """Every check with its measured values, bound and verdict."""
    bound = (1 + WITHIN) * float_ppl[8]
    out = [
        {"check": "gptq-w4-g128-within-10pct", "rule": f"PPL(gptq-w4-g128-rotated) <= {1 + WITHIN:.2f} x float",
         "values": {"gptq-w4-g128-rotated": ppl["gptq-w4-g128-rotated"], "bound": round(bound, 4)},
         "passed": ppl["gptq-w4-g128-rotated"] <= bound},
        {"check": "turboboa-w4-g128-vs-gptq", "rule": "PPL(turboboa-w4-g128) <= PPL(gptq-w4-g128)",
         "values": {k: ppl[k] for k in ("turboboa-w4-g128", "gptq-w4-g128")},
         "passed": ppl["turboboa-w4-g128"] <= ppl["gptq-w4-g128"]},
        {"check": "w3-per-channel-ordering", "rule": "turboboa-w3-pc < gptq-w3-pc < rtn-w3-pc",
         "values": {k: ppl[k] for k in ("turboboa-w3-pc", "gptq-w3-pc", "rtn-w3-pc")},
         "passed": ppl["turboboa-w3-pc"] < ppl["gptq-w3-pc"] < ppl["rtn-w3-pc"]},
        {"check": "rotation-gain-gptq-w3", "rule": "gptq-w3-pc-rotated < gptq-w3-pc",
         "values": {k: ppl[k] for k in ("gptq-w3-pc-rotated", "gptq-w3-pc")},
         "passed": ppl["gptq-w3-pc-rotated"] < ppl["gptq-w3-pc"]},
        {"check": "defaults-gptq-w4-g128", "rule": "informational: GPTQ w4 g128 with every default vs float",
         "values": {"gptq-w4-g128": ppl["gptq-w4-g128"], "float": float_ppl[8],
                    "ratio": round(ppl["gptq-w4-g128"] / float_ppl[8], 4)}, "passed": None},
    ]
    return out


def write_table(doc: dict[str, Any], path: Path) -> None:
    """``accuracy.md``: the checks, then every row with its provenance."""
    legend = pv.Legend()
    lines = ["# Accuracy checks on SmolLM2-135M-Instruct (`make accuracy`)", "",
             f"Calibration {NSAMPLES} x {SEQLEN} WikiText-2 validation tokens (seed {SEED}); PPL on the first "
             f"windows of {EVAL_SEQLEN} WikiText-2 raw test tokens. Written by `bench/accuracy.py`.", "",
             "| check | rule | values | passed |", "|---|---|---|---|"]
    for c in doc.get("checks", []):
        values = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in c["values"].items())
        verdict = {True: "yes", False: "**no**", None: "—"}[c["passed"]]
        lines.append(f"| {c['check']} | {c['rule']} | {values} | {verdict} |")
    lines += ["", "| row | options | windows | PPL | quantize s | peak GiB | provenance |",
              "|---|---|---:|---:|---:|---:|---|"]
    for w, f in sorted(doc["float"].items()):
        lines.append(f"| float | | {w} | {f['ppl']:.3f} | | | {legend.cell(f)} |")
    for row in ROWS:
        r = doc["runs"].get(row.name)
        if r is not None:
            lines.append(f"| {row.name} | `{' '.join(row.options)}` | {row.windows} | {r['ppl']:.3f} | "
                         f"{r['seconds']:.1f} | {r['peak_memory_bytes'] / 2**30:.2f} | {legend.cell(r)} |")
    lines += ["", *legend.section({}, None)]
    pv.write_text_atomic(path, "\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=pv.RESULTS)
    pv.add_arguments(ap)
    a = ap.parse_args()
    ctx = pv.Context.start(a.device, a.fresh, exclude=[a.out])
    a.out.mkdir(parents=True, exist_ok=True)
    out_json = a.out / "accuracy.json"
    settings = {"model": "smollm2-135m", "nsamples": NSAMPLES, "seqlen": SEQLEN, "seed": SEED,
                "eval_seqlen": EVAL_SEQLEN}
    doc = mb.load_doc(out_json, settings, None)
    doc.setdefault("float", {})
    calib = argparse.Namespace(nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED)

    def save() -> None:
        pv.write_json_atomic(out_json, doc)
        write_table(doc, a.out / "accuracy.md")

    for windows in sorted({row.windows for row in ROWS}):
        holder: dict[str, Any] = {"float": doc["float"].get(str(windows))}
        if mb.float_row(ctx, holder, mb.eval_args(EVAL_SEQLEN, windows, ctx.device), EVAL_SEQLEN, windows):
            doc["float"][str(windows)] = holder["float"]
            save()
    for row in ROWS:
        ev = mb.eval_args(EVAL_SEQLEN, row.windows, ctx.device)
        args = ["smollm2-135m", *row.options, "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--seed",
                str(SEED), "--device", ctx.device, "-q", "--json"]
        row_settings = {"quantize": pv.quantize_settings(args), "eval": pv.command_options(["eval", "QDIR", *ev])}
        data = {"calibration": pv.calibration_data(NSAMPLES, SEQLEN),
                "evaluation": pv.evaluation_data(row.windows, EVAL_SEQLEN)}
        if ctx.reuse(row.name, doc["runs"].get(row.name), row_settings, data):
            continue
        doc["runs"][row.name] = measure(ctx, args, ev, row_settings, data, calib)
        print(f"{row.name}: ppl {doc['runs'][row.name]['ppl']:.3f}", flush=True)
        save()
    doc["checks"] = checks({k: r["ppl"] for k, r in doc["runs"].items()},
                           {int(w): f["ppl"] for w, f in doc["float"].items()})
    save()
    failed = [c["check"] for c in doc["checks"] if c["passed"] is False]
    for c in doc["checks"]:
        print(f"{c['check']}: {({True: 'passed', False: 'FAILED', None: 'recorded'})[c['passed']]} {c['values']}")
    print(f"accuracy: {len(failed)} of {sum(c['passed'] is not None for c in doc['checks'])} checks failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def measure(ctx: pv.Context, args: list[str], ev: list[str], settings: dict[str, Any], data: dict[str, Any],
            calib: argparse.Namespace) -> dict[str, Any]:
    """Quantize ``args`` into a temporary QDIR and score it: the row with its provenance."""
    import tempfile

    meter = pv.RowMeter()
    with tempfile.TemporaryDirectory() as tmp:
        qdir = Path(tmp) / "Q"
        q = pv.cli_json(["quantize", *args, "-o", str(qdir)], meter)
        settings = {**settings, "quantize": pv.confirm_quantize(settings["quantize"], qdir)}
        e = pv.cli_json(["eval", str(qdir), *ev], meter)
    measured = meter.result(quantize_seconds=q["seconds"], eval_tokens=e["tokens"], eval_windows=e["windows"],
                            calibration_tokens=calib.nsamples * calib.seqlen)
    return {"ppl": e["ppl"], "seconds": q["seconds"], "peak_memory_bytes": q["peak_memory_bytes"],
            "config": q["config"], "provenance": ctx.record(settings, data, measured)}


if __name__ == "__main__":
    sys.exit(main())
