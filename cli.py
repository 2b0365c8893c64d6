"""The ``turboboa`` command: a thin click layer over the core (:mod:`turboboa.quantization`,
:mod:`turboboa.activations.qdir`) and the workflows.

The options of ``quantize`` and ``run`` are derived from the typed configurations (:mod:`turboboa.configs`),
imported with the core's light modules (torch, not transformers); the rest (the pipeline's models, the
exporters, the runtimes) is imported inside each command, so ``turboboa --help`` and a refused option answer
without loading it."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click

from turboboa.config import QuantConfig
from turboboa.configs.activations import ACT_SCOPES, activation_scope
from turboboa.configs.option import CliOption, cli_options
from turboboa.distributed import is_main_process, world_size_from_env
from turboboa.errors import UserError

DEFAULT_MODEL = "smollm2-135m"
F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def app() -> None:
    """Quantize LLMs to 2-8 bits with TurboBoA, BoA, GPTQ or RTN, and measure them."""


def config_option(opt: CliOption) -> Callable[[F], F]:
    """The click option of a configuration field (:mod:`turboboa.configs.option`): its flag, help, type and
    default as the field declares them; a closed set of values is a ``click.Choice``."""
    if opt.is_switch:
        return click.option(opt.flags, opt.param, is_flag=True, help=opt.help)
    value_type = click.Choice(opt.option.choices) if opt.option.choices else opt.type
    default = None if opt.option.read is not None else opt.default
    return click.option(opt.flags, opt.param, type=value_type, default=default, show_default=opt.shows_default,
                        multiple=opt.multiple, metavar=opt.option.metavar, help=opt.help)


# Every option of `quantize` but MODEL and -o, shared by `quantize` and `run` in the order `--help` lists them:
# the QuantConfig fields' (declared in turboboa/configs/), then the command's own (how to run, not what).
QUANTIZE_OPTIONS: list[Callable[[F], F]] = [
    *(config_option(opt) for opt in cli_options(QuantConfig)),
    click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda"),
    click.option("--act-scope", type=click.Choice(ACT_SCOPES), default="auto", show_default=True,
                 help="how --act-bits reads: token: per-token dynamic; inputs: static, the linear layers' inputs; "
                      "graph: static, every tensor of the decoder graph (what --profile qnn-htp exports); auto: "
                      "token for --act-bits 4/6 or with --kv-bits, else inputs"),
    click.option("--resume", is_flag=True,
                 help="continue an interrupted run from its last finished block (state kept in <output>.partial/); "
                      "the result is identical to an uninterrupted run's"),
    click.option("--stream/--no-stream", default=True, show_default=True,
                 help="read the float model block by block, so memory holds one block and not the model "
                      "(--pad-to and --act-scope inputs load it whole); --no-stream loads it whole first"),
]


def quantize_options(fn: F) -> F:
    """Decorator: add :data:`QUANTIZE_OPTIONS` to a command (listed in that order by ``--help``)."""
    for option in reversed(QUANTIZE_OPTIONS):
        fn = option(fn)
    return fn


def activation_scheme(options: Mapping[str, Any]) -> tuple[str, int | None]:
    """``(scope, static bits)``: how ``--act-bits`` reads (:func:`~turboboa.configs.activations.activation_scope`)
    and the static width it leaves to the command (None when activations are per-token or float)."""
    bits = options["act_bits"]
    scope = activation_scope(bits, options["act_scope"], options["kv_bits"])
    return scope, (bits if scope != "token" else None)


def quant_config(options: Mapping[str, Any]) -> QuantConfig:
    """The :class:`QuantConfig` of the parsed quantize options ``options`` (click parameter names): each field
    read from its flag; the options that are no field (``device``, the static ``act_bits``, ...) are left to
    the command."""
    return QuantConfig.from_options(options)


@app.command()
@click.argument("model", required=False, default=DEFAULT_MODEL)
@quantize_options
@click.option("-o", "--output", required=True, help="QDIR folder to write")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def quantize(model: str, output: str, quiet: bool, as_json: bool, **options: Any) -> None:
    """Quantize MODEL (default smollm2-135m) into the quantized checkpoint folder -o QDIR."""
    from turboboa import quantization

    cfg = quant_config(options)
    scope, act_bits = activation_scheme(options)
    summary = quantization.quantize(model, cfg, output, device=options["device"], progress=not quiet, act_bits=act_bits,
                           act_scope="inputs" if scope == "token" else scope,
                           resume=options["resume"], stream=options["stream"])
    if not is_main_process():  # under torchrun only rank 0 reports
        return
    if as_json:
        click.echo(json.dumps({"output": str(summary.output), "layers": summary.layers,
                               "seconds": round(summary.seconds, 3), "peak_memory_bytes": summary.peak_memory,
                               "config": summary.config.to_dict(), "act_bits": act_bits, "rotation": summary.rotation}))
    else:
        click.echo(summary.line() + (f", activations uint{act_bits}" if act_bits else ""), err=True)


@app.command()
@click.argument("qdir")
@click.option("--act-bits", type=int, required=True,
              help="8 or 16: uint8/uint16 per-tensor encodings (min-max)")
@click.option("--scope", type=click.Choice(["inputs", "graph"]), default="inputs", show_default=True,
              help="the linear layers' inputs, or every tensor of the decoder graph (for --profile qnn-htp)")
@click.option("--calib", default=None, help="calibration data (default: the QDIR's)")
@click.option("--nsamples", type=int, default=None, help="(default: the QDIR's)")
@click.option("--seqlen", type=int, default=None, help="(default: the QDIR's)")
@click.option("--seed", type=int, default=None, help="(default: the QDIR's)")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary")
def calibrate(qdir: str, act_bits: int, scope: str, calib: str | None, nsamples: int | None, seqlen: int | None,
              seed: int | None, device: str, quiet: bool, as_json: bool) -> None:
    """Add (or replace) static activation encodings in QDIR: a per-tensor scale and zero point for the input
    of every quantized layer (``--scope graph``: for every tensor of the fully quantized decoder), calibrated
    on the fake-quant model (rewritten atomically)."""
    import time

    from turboboa.activations.qdir import calibrate as calibrate_qdir

    t0 = time.time()
    enc = calibrate_qdir(qdir, act_bits, calib=calib, nsamples=nsamples, seqlen=seqlen, seed=seed,
                        device=device, progress=not quiet, scope=scope)
    if as_json:
        click.echo(json.dumps({"output": qdir, **enc.summary(), "seconds": round(time.time() - t0, 3)}))
    else:
        calib = enc.calibration
        what = "tensors of the quantized graph" if scope == "graph" else "layer inputs"
        click.echo(f"calibrated {len(enc.layers)} {what}, {enc.label()}, on {calib['nsamples']} x "
                   f"{calib['seqlen']} tokens in {time.time() - t0:.1f} s -> {qdir}", err=True)


@app.command(name="eval")
@click.argument("target", required=False, default=DEFAULT_MODEL)
@click.option("--data", default="wikitext2", show_default=True, help="evaluation data: name or .txt/.jsonl path")
@click.option("--seqlen", type=int, default=2048, show_default=True)
@click.option("--max-windows", type=int, default=None, help="only the first K windows")
@click.option("--device", default="auto", show_default=True)
@click.option("--backend", default="auto", show_default=True,
              help="auto | torch | llama.cpp | ort | qnn-htp | openvino (auto: llama.cpp for a .gguf file, "
                   "onnxruntime for an .onnx file, openvino for an .xml IR, torch otherwise)")
@click.option("--tokenizer", default=None, help="HF tokenizer folder (or QDIR) for the tokens; default: the model's")
@click.option("--threads", type=int, default=None, help="llama.cpp / onnxruntime threads (default: all cores)")
@click.option("--rotate", default="none", show_default=True,
              help="a float model with this rotation fused (hadamard | random): proves it function-preserving")
@click.option("--rotate-seed", type=int, default=0, show_default=True)
@click.option("--act-bits", type=int, default=None,
              help="a QDIR: simulate its weights under per-token activations of this width (4, 6, 8, 16)")
@click.option("--kv-bits", type=int, default=None, help="a QDIR: ... and keys/values of this width (4, 8, 16)")
@click.option("-q", "--quiet", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def eval_cmd(target: str, data: str, seqlen: int, max_windows: int | None, device: str, backend: str,
             tokenizer: str | None, threads: int | None, rotate: str, rotate_seed: int, act_bits: int | None,
             kv_bits: int | None, quiet: bool, as_json: bool) -> None:
    """Perplexity of TARGET: a model (default smollm2-135m), a QDIR (its fake-quant model), a .gguf file
    (run in llama.cpp) or an .onnx file (run in onnxruntime)."""
    from workflows.evaluate import evaluate

    res = evaluate(target, data=data, seqlen=seqlen, max_windows=max_windows, device=device,
                   progress=not quiet and not as_json, backend=backend, tokenizer=tokenizer, threads=threads,
                   rotate=rotate, rotate_seed=rotate_seed,
                   dynamic={"act_bits": act_bits, "kv_bits": kv_bits} if act_bits or kv_bits else None)
    if as_json:
        click.echo(json.dumps(res.to_dict()))
    else:
        act = res.extra.get("activations")
        note = f", activations {act['scheme']} {act['dtype']} {act['granularity']}" if act else ""
        dyn = res.extra.get("dynamic_activations")
        if dyn:
            note += f", per-token activations A{dyn['act_bits']} KV{dyn['kv_bits']}"
        click.echo(f"{res.backend}: ppl {res.ppl:.4f} over {res.tokens} tokens "
                   f"({res.windows} windows of {res.seqlen}) in {res.seconds:.1f} s{note}")


@app.command(name="export")
@click.argument("qdir")
@click.option("--to", "to", required=True,
              help="exporter name: gguf, onnx, openvino (or one registered by a plugin)")
@click.option("-o", "--output", required=True, help="file to write")
@click.option("--opset", type=int, default=None, help="onnx: opset (default 21; 25 stores 2-bit grids as int2)")
@click.option("--profile", default=None,
              help="onnx: generic (default) | npu (symmetric int4/int8, static shapes) | qnn-htp (every tensor "
                   "quantized, what Qualcomm's HTP compiles whole) | openvino: openvino (default), npu or generic")
@click.option("--qnn-context", is_flag=True,
              help="onnx --profile qnn-htp: also write the compiled QNN EPContext model <name>_ctx.onnx beside it")
@click.option("--seqlen", type=int, default=None,
              help="onnx: static sequence length (default: dynamic under generic, 512 under npu)")
@click.option("--act-bits", type=int, default=None,
              help="onnx: the QDIR's static activation encodings (8 or 16), QuantizeLinear -> "
                   "DequantizeLinear on each quantized MatMul's input (emitted whenever the QDIR has them; "
                   "this checks their width)")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
def export_cmd(qdir: str, to: str, output: str, opset: int | None, profile: str | None, qnn_context: bool,
               seqlen: int | None, act_bits: int | None, quiet: bool) -> None:
    """Pack the quantized checkpoint QDIR into a runtime file (-o), e.g. a llama.cpp GGUF or a QDQ ONNX model."""
    from exporters import size_summary
    from turboboa.checkpoint import load_qdir, source_parameters
    from workflows.export import export

    given = {"opset": opset, "profile": profile, "seqlen": seqlen, "act_bits": act_bits,
             "qnn_context": qnn_context or None}
    options = {k: v for k, v in given.items() if v is not None}
    ckpt = load_qdir(qdir)
    path = export(ckpt, to, output, progress=not quiet, **options)
    size = size_summary(path, source_parameters(ckpt))
    click.echo(f"wrote {path}: {size['mib']:.1f} MiB, {size['bits_per_weight']:.3f} bits per weight "
               f"({source_parameters(ckpt)} parameters in the source model)", err=True)


CHECK_OPTIONS: list[Callable[[F], F]] = [
    click.option("--data", default="wikitext2", show_default=True, help="evaluation data: name or .txt/.jsonl path"),
    click.option("--max-windows", type=int, default=None, help="only the first K windows (default: all)"),
    click.option("--gguf-tol", type=float, default=None,
                 help="largest |PPL(llama.cpp) / PPL(fake-quant) - 1| that passes (default: the model family's, "
                      "for the rounding of llama.cpp's 8-bit activation blocks; see docs/formats-and-export.md)"),
    click.option("--gguf-graph", is_flag=True,
                 help="also score the fake-quant weights as an F32 GGUF in llama.cpp (a temporary file the size "
                      "of the float model): float products, so its gap (<= 0.1%) checks llama.cpp's graph alone"),
    click.option("--onnx-tol", type=float, default=None,
                 help="largest |PPL(onnxruntime) / PPL(fake-quant) - 1| that passes (default 0.001; 0.02 for a "
                      "--profile qnn-htp graph, where every tensor is quantized)"),
    click.option("--threads", type=int, default=None, help="llama.cpp / onnxruntime threads (default: all cores)"),
]


def check_options(fn: F) -> F:
    """Decorator: the evaluation options `check` and `run` share (the window length is each command's own:
    `--seqlen` for check, `--eval-seqlen` for run, whose `--seqlen` is the calibration's)."""
    for option in reversed(CHECK_OPTIONS):
        fn = option(fn)
    return fn


def echo_report(report: dict[str, Any], as_json: bool, report_md: str | None) -> None:
    """Print a check report: the JSON object, or the backend table, weights and verdict followed by the path
    of report.md (the last line) when one was written."""
    from runtime_check.report import backend_table, check_lines, weight_lines

    if as_json:
        click.echo(json.dumps(report))
        return
    if report.get("backends"):
        click.echo("\n".join([*backend_table(report), "", *weight_lines(report), *check_lines(report)]))
    verdict = {True: "check passed", False: "check FAILED", None: "not checked (--no-check)"}[report["passed"]]
    click.echo(verdict)
    if report_md is not None:
        click.echo(report_md)


@app.command(name="check")
@click.argument("qdir")
@click.option("--gguf", type=click.Path(dir_okay=False), default=None, help="GGUF file exported from QDIR")
@click.option("--onnx", type=click.Path(dir_okay=False), default=None, help="ONNX file exported from QDIR")
@click.option("--seqlen", type=int, default=512, show_default=True, help="tokens per evaluation window")
@click.option("--npu", default=None,
              help="NPU backends, comma-separated: qnn-htp (the --onnx file on Qualcomm's HTP, emulated), openvino "
                   "(--openvino IR, else the --onnx file), on the first --npu-windows windows")
@click.option("--npu-windows", type=int, default=4, show_default=True, help="windows the NPU backends score")
@click.option("--htp-tol", type=float, default=0.02, show_default=True,
              help="largest |PPL(qnn-htp) / PPL(fake-quant) - 1| on the NPU slice that passes")
@click.option("--openvino-tol", type=float, default=0.005, show_default=True,
              help="largest |PPL(openvino) / PPL(fake-quant) - 1| on the NPU slice that passes")
@click.option("--allow-fallback", is_flag=True, help="qnn-htp: let rejected nodes run on the CPU (listed)")
@click.option("--localize", is_flag=True,
              help="qnn-htp: compare each block's output on the HTP with the fake-quant model's (first window)")
@click.option("--openvino", "openvino_ir", type=click.Path(dir_okay=False), default=None,
              help="OpenVINO IR (.xml) exported from QDIR, for --npu openvino")
@click.option("--qnn-context", type=click.Path(dir_okay=False), default=None,
              help="QNN EPContext model to load back and compare (default: <onnx name>_ctx.onnx when present)")
@check_options
@click.option("--device", default="auto", show_default=True, help="torch models: auto | cpu | cuda")
@click.option("-o", "--output", "report_dir", default=None,
              help="folder to write report.json, report.md and report.png into")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
def check_cmd(qdir: str, gguf: str | None, onnx: str | None, seqlen: int, npu: str | None, npu_windows: int,
              htp_tol: float, openvino_tol: float, allow_fallback: bool, localize: bool, openvino_ir: str | None,
              qnn_context: str | None, data: str, max_windows: int | None, gguf_tol: float | None, gguf_graph: bool,
              onnx_tol: float | None, threads: int | None, device: str, report_dir: str | None, quiet: bool,
              as_json: bool) -> int:
    """Check exported files against the QDIR they came from: every quantized weight identical, and the float,
    fake-quant, llama.cpp (--gguf) and onnxruntime (--onnx) models on the same windows (PPL, gap, KL, top-1);
    --npu adds Qualcomm's HTP (emulated) and OpenVINO on a slice of them. Exit code 1 when a check fails, 0
    when all pass."""
    from runtime_check.checker import CheckSettings, check
    from runtime_check.npu import parse_npu
    from runtime_check.report import MD_NAME, write_report

    settings = CheckSettings(data=data, seqlen=seqlen, max_windows=max_windows, gguf_tol=gguf_tol,
                             gguf_graph=gguf_graph, onnx_tol=onnx_tol, threads=threads, device=device, npu=parse_npu(npu),
                             npu_windows=npu_windows, htp_tol=htp_tol, openvino_tol=openvino_tol,
                             allow_fallback=allow_fallback, localize=localize)
    report = check(qdir, gguf=gguf, onnx=onnx, settings=settings, progress=not quiet and not as_json,
                   openvino=openvino_ir, qnn_context=qnn_context)
    written = write_report(report, report_dir) if report_dir is not None else {}
    echo_report(report, as_json, str(written[MD_NAME]) if written else None)
    return 0 if report["passed"] else 1


@app.command(name="run")
@click.argument("model", required=False, default=DEFAULT_MODEL)
@quantize_options
@click.option("--export", "export_list", default="gguf,onnx", show_default=True,
              help="formats to export, comma-separated: gguf (llama.cpp), onnx (QDQ, onnxruntime / NPU toolchains); "
                   "with gguf and neither --format nor --preset, --format q4_0 is used")
@click.option("--check/--no-check", "run_check", default=True, show_default=True,
              help="check the exported files against the quantized model (turboboa check)")
@click.option("--eval-seqlen", type=int, default=512, show_default=True, help="check: tokens per evaluation window")
@click.option("--onnx-profile", default="generic", show_default=True,
              help="profile of model.onnx: generic | npu (symmetric int4/int8, static shapes of --eval-seqlen) | "
                   "qnn-htp (every tensor quantized: needs --act-bits, per-channel --sym or lpbq4)")
@check_options
@click.option("-o", "--output", "outdir", required=True,
              help="OUTDIR: qdir/, model.gguf, model.onnx, report.{json,md,png}, SHA256SUMS")
@click.option("-q", "--quiet", is_flag=True, help="no progress bars or step lines")
@click.option("--json", "as_json", is_flag=True, help="print the report as one JSON object")
@click.pass_context
def run_cmd(ctx: click.Context, model: str, export_list: str, run_check: bool, eval_seqlen: int, onnx_profile: str,
            data: str,
            max_windows: int | None, gguf_tol: float | None, gguf_graph: bool, onnx_tol: float | None,
            threads: int | None, outdir: str,
            quiet: bool, as_json: bool, **options: Any) -> int:
    """Quantize MODEL (default smollm2-135m) into OUTDIR/qdir, export OUTDIR/model.gguf and/or model.onnx,
    check them (as turboboa check), and write the reports and a SHA-256 manifest. The last line printed is
    the path of report.md. Exit code 1 when a check fails."""
    from click.core import ParameterSource

    from runtime_check.checker import CheckSettings
    from runtime_check.report import MD_NAME
    from workflows.end_to_end import MANIFEST, parse_exports, run

    if world_size_from_env() > 1:
        raise UserError("turboboa run is one process; under torchrun run `turboboa quantize`, then export and "
                        "check the QDIR in one process")
    exports = parse_exports(export_list)
    cfg = quant_config(options)
    scope, act_bits = activation_scheme(options)
    settings = CheckSettings(data=data, seqlen=eval_seqlen, max_windows=max_windows, gguf_tol=gguf_tol,
                             gguf_graph=gguf_graph, onnx_tol=onnx_tol, threads=threads, device=options["device"])
    format_given = ctx.get_parameter_source("format") != ParameterSource.DEFAULT
    log = None if quiet or as_json else (lambda line: click.echo(line, err=True))
    result = run(model, cfg, outdir, exports, format_given=format_given, check=run_check, settings=settings,
                 device=options["device"], act_bits=act_bits, progress=not quiet and not as_json,
                 resume=options["resume"], stream=options["stream"], log=log, onnx_profile=onnx_profile,
                 act_scope="inputs" if scope == "token" else scope)
    report = result.report
    if as_json:
        report = {**report, "report_files": {k: str(p) for k, p in result.report_files.items()},
                  "manifest": str(result.outdir / MANIFEST)}
    echo_report(report, as_json, str(result.report_files[MD_NAME]))
    return 1 if result.passed is False else 0


def quiet_libraries() -> None:
    """Keep stderr for our own lines: no transformers warnings or weight-loading progress bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input is one line on stderr and exit code 2, never a traceback. Under ``torchrun`` every
    rank exits with the same code and only rank 0 prints the line."""
    quiet_libraries()

    def fail(message: str, code: int) -> None:
        if is_main_process():
            click.echo(f"error: {' '.join(message.split())}", err=True)
        sys.exit(code)

    try:
        rv = app.main(args=argv, prog_name="turboboa", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        fail("aborted", 130)
    except click.ClickException as e:
        fail(e.format_message(), 2)
    except UserError as e:
        fail(str(e), 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
