"""Benchmark: the default model on NPU toolchains, TurboBoA and RTN at W4A16 (int4 per channel) and W8A8.

For each configuration: quantize (symmetric, per output channel) with every tensor of the decoder graph
calibrated (``--act-bits A --act-scope graph``), export the ``--profile qnn-htp`` graph (with its compiled
QNN EPContext model) and the OpenVINO IR of the same graph, then ``turboboa check`` scores the same slice of
WikiText-2 test windows on the torch fake-quant model, onnxruntime CPU, OpenVINO (CPU plugin) and Qualcomm's
HTP (emulated on x86_64), with the wall time of each. Results: ``bench/results/npu.json`` (written atomically
after every configuration, so an interrupted run resumes) and ``npu.md``. A configuration is reused only when
its provenance (settings, data sizes, machine, library versions; ``bench/provenance.py``) matches the current
run; ``--fresh`` measures every one again.

    .venv/bin/python bench/npu.py --windows 4 --seqlen 128
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

RESULTS = pv.RESULTS

CONFIGS = {  # name -> (method, weight bits, activation bits)
    "turboboa-w4a16": ("turboboa", 4, 16),
    "rtn-w4a16": ("rtn", 4, 16),
    "turboboa-w8a8": ("turboboa", 8, 8),
    "rtn-w8a8": ("rtn", 8, 8),
}
BACKENDS = ("fake-quant (NPU slice)", "fake-quant (weights only)", "onnxruntime", "openvino", "qnn-htp")
NPU_PACKAGES = ("onnxruntime-qnn", "openvino")  # library versions the rows record beyond the usual ones


def commands(name: str, qdir: str, onnx: str, ir: str, args: argparse.Namespace) -> dict[str, list[str]]:
    """The ``turboboa`` command lines of one configuration (subcommand first): quantize, the two exports, check."""
    method, wbits, abits = CONFIGS[name]
    # OpenVINO's CPU plugin drops 16-bit activation quantizers: at A16 its IR is the weight-only graph (compared
    # with the fake-quant model with float activations), at A8 the qnn-htp graph itself
    ov_profile = "openvino" if abits == 16 else "qnn-htp"
    return {
        "quantize": ["quantize", "smollm2-135m", "--method", method, "--bits", str(wbits), "--group-size", "-1",
                     "--sym", "--nsamples", str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--act-bits",
                     str(abits), "--act-scope", "graph", "--device", args.device, "-o", qdir, "-q"],
        "export_onnx": ["export", qdir, "--to", "onnx", "--profile", "qnn-htp", "--seqlen", str(args.seqlen),
                        "--qnn-context", "-o", onnx, "-q"],
        "export_openvino": ["export", qdir, "--to", "openvino", "--profile", ov_profile, "--seqlen",
                            str(args.seqlen), "-o", ir, "-q"],
        "check": ["check", qdir, "--onnx", onnx, "--openvino", ir, "--seqlen", str(args.seqlen), "--max-windows",
                  str(args.windows), "--npu", "qnn-htp,openvino", "--npu-windows", str(args.windows),
                  "--device", args.device, "--json", "-q"],
    }


def config_settings(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Resolved settings of one configuration: every option of its four commands."""
    cmds = commands(name, "QDIR", "model.onnx", "model.xml", args)
    return {"quantize": pv.quantize_settings(cmds["quantize"][1:]),
            **{step: pv.command_options(cmd) for step, cmd in cmds.items() if step != "quantize"}}


def config_data(args: argparse.Namespace) -> dict[str, Any]:
    """Calibration and evaluation sizes of every configuration."""
    return {"calibration": pv.calibration_data(args.nsamples, args.calib_seqlen),
            "evaluation": pv.evaluation_data(args.windows, args.seqlen)}


def run_config(ctx: pv.Context, name: str, work: Path, args: argparse.Namespace, settings: dict[str, Any]) -> dict:
    """Quantize, export and check one configuration; its rows, timings and provenance."""
    method, wbits, abits = CONFIGS[name]
    qdir, onnx, ir = work / name, work / f"{name}.onnx", work / f"{name}.xml"
    cmds = commands(name, str(qdir), str(onnx), str(ir), args)
    meter = pv.RowMeter()

    def cli(step: str) -> pv.Child:  # check exits 1 when a tolerance is missed: still a result
        return meter.run([sys.executable, "-m", "cli", *cmds[step]], ok=(0, 1))

    quantize_s = cli("quantize").seconds
    rec = pv.qdir_record(qdir)
    settings = {**settings, "quantize": pv.confirm_quantize(settings["quantize"], qdir)}
    if str(rec["device"]).startswith("cuda"):
        meter.add(gpu=rec["peak_memory_bytes"])
    export_s = cli("export_onnx").seconds + cli("export_openvino").seconds
    report = json.loads(cli("check").stdout)
    rows = {r["backend"]: {k: r[k] for k in ("ppl", "gap", "kl", "top1", "tokens", "seconds")}
            for r in report["backends"] if r["backend"] in BACKENDS and r["ppl"] is not None}
    checks = {c["check"]: {"value": c["value"], "passed": c["passed"]} for c in report["checks"]}
    measured = meter.result(calibration_tokens=(rec["calibration"] or {}).get("tokens"),
                            eval_tokens={b: r["tokens"] for b, r in rows.items()})
    return {"method": method, "weight_bits": wbits, "act_bits": abits, "rows": rows, "checks": checks,
            "npu_share": report["runtime"]["qnn-htp"]["npu_share"],
            "sizes_mib": {"onnx": round(onnx.stat().st_size / 2**20, 1),
                          "epcontext": round(onnx.with_name(f"{onnx.stem}_ctx.onnx").stat().st_size / 2**20, 1),
                          "openvino_bin": round(ir.with_suffix(".bin").stat().st_size / 2**20, 1)},
            "seconds": {"quantize": round(quantize_s, 1), "export": round(export_s, 1),
                        "check": report["seconds"]},
            "provenance": ctx.record(settings, config_data(args), measured, NPU_PACKAGES)}


def write_table(doc: dict, path: Path) -> None:
    """``npu.md``: the backends' scores per configuration, then per configuration its files, times and
    provenance, then the provenance section."""
    s = doc["settings"]
    legend = pv.Legend()
    lines = ["# NPU toolchains on SmolLM2-135M-Instruct (WikiText-2)", "",
             f"Calibration {s['nsamples']} x {s['calib_seqlen']} tokens; every tensor of the `--profile qnn-htp` "
             f"graph quantized (static per-tensor, min-max). Evaluation: the first {s['windows']} WikiText-2 raw "
             f"test windows of {s['seqlen']} tokens on every backend. OpenVINO runs an IR on its CPU plugin, "
             f"which drops 16-bit activation quantizers: at A16 the IR is the weight-only graph (`--profile "
             f"openvino`) and its gap is to the fake-quant model with float activations; at A8 it is the qnn-htp "
             f"graph itself. qnn-htp is Qualcomm's HTP (v73) emulated on x86_64 with CPU fallback "
             f"disabled. Each configuration's machine and commit under Provenance.", "",
             "| config | backend | PPL | gap | KL | top-1 | seconds |", "|---|---|---:|---:|---:|---:|---:|"]
    for name, run in doc["runs"].items():
        for backend in BACKENDS:
            r = run["rows"].get(backend)
            if r is None:
                continue
            gap = "" if backend.startswith("fake-quant (NPU") else f"{r['gap']:+.2%}"
            lines.append(f"| {name} | {backend} | {r['ppl']:.3f} | {gap} | {r['kl']:.4f} | {r['top1']:.1%} | "
                         f"{r['seconds']:.1f} |")
    lines += ["", "| config | HTP nodes on NPU | EPContext == graph | files (MiB): onnx / EPContext / OV bin | "
              "quantize s | export s | check s | provenance |", "|---|---:|---|---|---:|---:|---:|---|"]
    for name, run in doc["runs"].items():
        ctx = next((c["passed"] for k, c in run["checks"].items() if "EPContext" in k), None)
        sz = run["sizes_mib"]
        sec = run["seconds"]
        lines.append(f"| {name} | {run['npu_share']:.0%} | {ctx} | {sz['onnx']} / {sz['epcontext']} / "
                     f"{sz['openvino_bin']} | {sec['quantize']} | {sec['export']} | {sec['check']:.0f} "
                     f"| {legend.cell(run)} |")
    lines += ["", *legend.section(legacy_machine=doc.get("machine"))]
    pv.write_text_atomic(path, "\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--work", default=None, help="folder for QDIRs and files (default: a temporary one)")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of npu.json and npu.md")
    pv.add_arguments(p)
    args = p.parse_args()
    ctx = pv.Context.start(args.device, args.fresh, exclude=[args.out])
    args.device = ctx.device
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "npu.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    settings = {"windows": args.windows, "seqlen": args.seqlen, "nsamples": args.nsamples,
                "calib_seqlen": args.calib_seqlen}
    if doc.get("settings") != settings:
        doc = {"settings": settings, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="turboboa-npu-", dir=args.work) as tmp:
        for name in args.configs.split(","):
            cfg_settings = config_settings(name, args)
            if ctx.reuse(name, doc["runs"].get(name), cfg_settings, config_data(args), NPU_PACKAGES):
                continue
            doc["runs"][name] = run_config(ctx, name, Path(tmp).resolve(), args, cfg_settings)
            pv.drop_legacy_fields(doc, doc["runs"].values())
            pv.write_json_atomic(out, doc)
            write_table(doc, args.out / "npu.md")
    write_table(doc, args.out / "npu.md")


if __name__ == "__main__":
    main()
