"""Benchmark: ``turboboa run`` end to end on a model (quantize, export, check), its check report kept.

Runs ``turboboa run MODEL ARGS -o <temporary folder>`` in a child process and writes
``bench/results/<name>.json`` (the run's ``report.json`` under ``report``, with the row's provenance:
``bench/provenance.py``), ``<name>.md`` (the run's ``report.md``, the temporary folder written as ``<run>``,
then the provenance section) and ``<name>.png`` (the report's chart) atomically. The exported files themselves
are not kept. The row is reused only when the resolved settings, data sizes, machine and library versions
match; ``--fresh`` measures it again.

    .venv/bin/python bench/run_check.py --name gemma-3-270m-run -- gemma-3-270m --export gguf,onnx \\
        --nsamples 16 --seqlen 512 --eval-seqlen 512 --max-windows 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance as pv  # noqa: E402

LLAMA = ("llama_cpp_python",)  # the check runs the GGUF in llama.cpp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="the result files' name in --out")
    ap.add_argument("--out", type=Path, default=pv.RESULTS)
    ap.add_argument("run_args", nargs="+", help="after --: the model and the options of `turboboa run`")
    pv.add_arguments(ap)
    a = ap.parse_args()
    ctx = pv.Context.start(a.device, a.fresh, exclude=[a.out])
    args = [*a.run_args, "--device", ctx.device]
    settings = {"run": pv.command_options(["run", *args, "-o", "RUN"])}
    params = settings["run"]
    data = {"calibration": pv.calibration_data(params["nsamples"], params["seqlen"]),
            "evaluation": pv.evaluation_data(params["max_windows"], params["eval_seqlen"])}
    out_json = a.out / f"{a.name}.json"
    doc = json.loads(out_json.read_text()) if out_json.exists() else None
    if ctx.reuse(a.name, doc, settings, data, extra_versions=LLAMA):
        return
    meter = pv.RowMeter()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        child = meter.run([sys.executable, "-m", "cli", "run", *args, "-q", "-o", str(run)], ok=(0, 1))
        if not (run / "report.json").exists():
            raise SystemExit(f"error: turboboa run wrote no report ({child.returncode}): {child.stderr[-2000:]}")
        report = json.loads((run / "report.json").read_text())
        text = (run / "report.md").read_text().replace(str(run), "<run>")
        a.out.mkdir(parents=True, exist_ok=True)
        if (run / "report.png").exists():
            with pv.atomic_file(a.out / f"{a.name}.png") as target:
                shutil.copyfile(run / "report.png", target)
    doc = {"report": report, "provenance": ctx.record(settings, data, meter.result(exit_code=child.returncode),
                                                      extra_versions=LLAMA)}
    pv.write_json_atomic(out_json, doc)
    legend = pv.Legend()
    lines = [text.rstrip(), "", *legend.section({f"`turboboa run {' '.join(a.run_args)}`": doc})]
    pv.write_text_atomic(a.out / f"{a.name}.md", "\n".join(lines) + "\n")
    print(f"{a.name}: check {'passed' if report['passed'] else 'FAILED'}, {meter.result()['wall_seconds']:.0f} s",
          flush=True)


if __name__ == "__main__":
    main()
