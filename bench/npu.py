"""Benchmark: the default model on NPU toolchains, TurboBoA and RTN at W4A16 (int4 per channel) and W8A8.

For each configuration: quantize (symmetric, per output channel) with every tensor of the decoder graph
calibrated (``--act-bits A --act-scope graph``), export the ``--profile qnn-htp`` graph (with its compiled
QNN EPContext model) and the OpenVINO IR of the same graph, then ``turboboa check`` scores the same slice of
WikiText-2 test windows on the torch fake-quant model, onnxruntime CPU, OpenVINO (CPU plugin) and Qualcomm's
HTP (emulated on x86_64), with the wall time of each. Results: ``bench/results/npu.json`` (updated after every
configuration, so an interrupted run resumes) and ``npu.md``.

    .venv/bin/python bench/npu.py --windows 4 --seqlen 128
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))

from methods import machine  # noqa: E402

CONFIGS = {  # name -> (method, weight bits, activation bits)
    "turboboa-w4a16": ("turboboa", 4, 16),
    "rtn-w4a16": ("rtn", 4, 16),
    "turboboa-w8a8": ("turboboa", 8, 8),
    "rtn-w8a8": ("rtn", 8, 8),
}
BACKENDS = ("fake-quant (NPU slice)", "fake-quant (weights only)", "onnxruntime", "openvino", "qnn-htp")


def cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``turboboa ARGS``; a failure stops the benchmark with its stderr."""
    proc = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):  # check exits 1 when a tolerance is missed: still a result
        raise RuntimeError(f"turboboa {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc


def run_config(name: str, work: Path, args: argparse.Namespace) -> dict:
    """Quantize, export and check one configuration; its rows and timings."""
    method, wbits, abits = CONFIGS[name]
    qdir, onnx, ir = work / name, work / f"{name}.onnx", work / f"{name}.xml"
    t0 = time.perf_counter()
    cli("quantize", "smollm2-135m", "--method", method, "--bits", str(wbits), "--group-size", "-1", "--sym",
        "--nsamples", str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--act-bits", str(abits),
        "--act-scope", "graph", "-o", str(qdir), "-q")
    quantize_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cli("export", str(qdir), "--to", "onnx", "--profile", "qnn-htp", "--seqlen", str(args.seqlen), "--qnn-context",
        "-o", str(onnx), "-q")
    # OpenVINO's CPU plugin drops 16-bit activation quantizers: at A16 its IR is the weight-only graph (compared
    # with the fake-quant model with float activations), at A8 the qnn-htp graph itself
    ov_profile = "openvino" if abits == 16 else "qnn-htp"
    cli("export", str(qdir), "--to", "openvino", "--profile", ov_profile, "--seqlen", str(args.seqlen), "-o",
        str(ir), "-q")
    export_s = time.perf_counter() - t0
    proc = cli("check", str(qdir), "--onnx", str(onnx), "--openvino", str(ir), "--seqlen", str(args.seqlen),
               "--max-windows", str(args.windows), "--npu", "qnn-htp,openvino", "--npu-windows", str(args.windows),
               "--json", "-q")
    report = json.loads(proc.stdout)
    rows = {r["backend"]: {k: r[k] for k in ("ppl", "gap", "kl", "top1", "tokens", "seconds")}
            for r in report["backends"] if r["backend"] in BACKENDS and r["ppl"] is not None}
    checks = {c["check"]: {"value": c["value"], "passed": c["passed"]} for c in report["checks"]}
    return {"method": method, "weight_bits": wbits, "act_bits": abits, "rows": rows, "checks": checks,
            "npu_share": report["runtime"]["qnn-htp"]["npu_share"],
            "sizes_mib": {"onnx": round(onnx.stat().st_size / 2**20, 1),
                          "epcontext": round(onnx.with_name(f"{onnx.stem}_ctx.onnx").stat().st_size / 2**20, 1),
                          "openvino_bin": round(ir.with_suffix(".bin").stat().st_size / 2**20, 1)},
            "seconds": {"quantize": round(quantize_s, 1), "export": round(export_s, 1),
                        "check": report["seconds"]}}


def write_table(doc: dict, path: Path) -> None:
    s = doc["settings"]
    lines = ["# NPU toolchains on SmolLM2-135M-Instruct (WikiText-2)", "",
             f"Calibration {s['nsamples']} x {s['calib_seqlen']} tokens; every tensor of the `--profile qnn-htp` "
             f"graph quantized (static per-tensor, min-max). Evaluation: the first {s['windows']} WikiText-2 raw "
             f"test windows of {s['seqlen']} tokens on every backend. OpenVINO runs an IR on its CPU plugin, "
             f"which drops 16-bit activation quantizers: at A16 the IR is the weight-only graph (`--profile "
             f"openvino`) and its gap is to the fake-quant model with float activations; at A8 it is the qnn-htp "
             f"graph itself. qnn-htp is Qualcomm's HTP (v73) emulated on x86_64 with CPU fallback "
             f"disabled. Machine: {doc['machine']['platform']}, {doc['machine']['cpus']} CPUs.", "",
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
              "quantize s | export s | check s |", "|---|---:|---|---|---:|---:|---:|"]
    for name, run in doc["runs"].items():
        ctx = next((c["passed"] for k, c in run["checks"].items() if "EPContext" in k), None)
        sz = run["sizes_mib"]
        sec = run["seconds"]
        lines.append(f"| {name} | {run['npu_share']:.0%} | {ctx} | {sz['onnx']} / {sz['epcontext']} / "
                     f"{sz['openvino_bin']} | {sec['quantize']} | {sec['export']} | {sec['check']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--work", default=None, help="folder for QDIRs and files (default: a temporary one)")
    args = p.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "npu.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    settings = {"windows": args.windows, "seqlen": args.seqlen, "nsamples": args.nsamples,
                "calib_seqlen": args.calib_seqlen}
    if doc.get("settings") != settings:
        doc = {"settings": settings, "runs": {}}
    doc["machine"] = machine()
    with tempfile.TemporaryDirectory(prefix="turboboa-npu-", dir=args.work) as tmp:
        for name in args.configs.split(","):
            if name in doc["runs"]:
                continue
            print(f"[npu] {name}", file=sys.stderr, flush=True)
            doc["runs"][name] = run_config(name, Path(tmp), args)
            out.write_text(json.dumps(doc, indent=2) + "\n")
            write_table(doc, RESULTS / "npu.md")
    write_table(doc, RESULTS / "npu.md")


if __name__ == "__main__":
    main()
