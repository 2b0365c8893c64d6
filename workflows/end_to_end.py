"""``turboboa run``: one command from a model to checked runtime files (quantize, export, check, report).

OUTDIR after a run::

    qdir/          the quantized checkpoint (turboboa quantize)
    model.gguf     llama.cpp file (--export gguf)
    model.onnx     QDQ ONNX decoder, --onnx-profile (generic, npu or qnn-htp) (--export onnx; model.onnx.data beside it past 2 GB)
    report.json    the check's report (runtime_check.checker.check) plus this run's settings
    report.md      the same as a table and a verdict
    report.png     PPL per backend (needs matplotlib)
    SHA256SUMS     the SHA-256 of every file above, in ``sha256sum`` format (``sha256sum -c SHA256SUMS``)

Everything that can be refused is refused before quantizing (one line, exit 2): an unknown export name, an
export format that cannot hold the grid the options ask for, an OUTDIR that holds something else. Every file
is written under a temporary name and renamed when complete (the QDIR as a folder, the exporters' and the
reports' files one by one), and SHA256SUMS is written last. The hidden temporaries a killed run left in
OUTDIR are removed when it runs again (with ``--resume``, the quantization continues from its last block).
"""

from __future__ import annotations

import dataclasses
import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.gguf.export import check_gguf_config
from exporters.onnx.weights import ONNX_FORMATS, check_onnx_format, onnx_expressible
from runtime_check.checker import CheckSettings, quantization_summary
from runtime_check.checker import check as run_check
from runtime_check.report import JSON_NAME, MD_NAME, PNG_NAME, atomic_write, write_report
from turboboa import quantization
from turboboa.activations import check_act_bits
from turboboa.arch import LINEAR_ROLES, GgufArch
from turboboa.arch.base import registered_adapters
from turboboa.checkpoint import load_qdir
from turboboa.checksums import sha256_file, sums_text
from turboboa.config import QuantConfig
from turboboa.configs.grid import FLOAT
from turboboa.errors import UserError
from turboboa.formats import get_format, is_ggml_format
from turboboa.formats.choice import FALLBACK, parse_overrides
from turboboa.formats.presets import ModelShape, preset_type
from turboboa.models.loader import folder_model_type
from turboboa.output_files import remove_stale_temporaries
from workflows.export import export

EXPORTS = ("gguf", "onnx")
FILE_NAMES = {"gguf": "model.gguf", "onnx": "model.onnx"}
QDIR_NAME = "qdir"
MANIFEST = "SHA256SUMS"
GGUF_DEFAULT_FORMAT = "q4_0"


def parse_exports(text: str) -> tuple[str, ...]:
    """``"gguf,onnx"`` -> ``("gguf", "onnx")`` (order kept, repeats dropped); an unknown or empty name is a
    :class:`UserError`."""
    names = [n.strip().lower() for n in text.split(",")] if text.strip() else []
    unknown = [n for n in names if n not in EXPORTS]
    if unknown or not names:
        what = f"unknown export format {unknown[0]!r}" if unknown else "--export names no format"
        raise UserError(f"{what}; --export takes a comma-separated list of {', '.join(EXPORTS)}")
    return tuple(dict.fromkeys(names))


def choose_format(cfg: QuantConfig, exports: tuple[str, ...], format_given: bool) -> tuple[QuantConfig, str | None]:
    """The configuration to quantize with, and a note when ``run`` picked the format: with gguf among the
    exports and neither ``--format`` nor ``--preset`` given, layers go onto ggml's q4_0 grid (which GGUF
    stores; ONNX holds it too once exporters/onnx has an encoder for it)."""
    if "gguf" not in exports or format_given or cfg.preset:
        return cfg, None
    note = (f"--format {GGUF_DEFAULT_FORMAT} chosen by turboboa run: --export includes gguf and neither --format "
            f"nor --preset was given")
    return dataclasses.replace(cfg, format=GGUF_DEFAULT_FORMAT), note


def possible_formats(cfg: QuantConfig) -> set[str]:
    """Every storage format a linear layer of ``cfg`` may get, whatever the model's widths: the preset's types
    (every rule of :func:`~turboboa.formats.presets.preset_format`) or ``--format``, the ``--tensor-format``
    overrides, and the width fallbacks of each."""
    formats = {cfg.format}
    if cfg.preset:  # the preset decides every layer's type (--format is not used): all its rules' types
        shapes = [ModelShape(n, g, False) for n in (1, 2, 8, 16, 24, 32, 48, 64) for g in (1, 2, 4, 8)]
        formats = {preset_type(cfg.preset, "head", None, shapes[0])}
        formats |= {preset_type(cfg.preset, role, i, shape)
                    for shape in shapes for i in range(shape.n_layers) for role in LINEAR_ROLES}
    formats |= {fmt for _, fmt in parse_overrides(cfg.tensor_formats)}
    return formats | {FALLBACK[f] for f in formats if f in FALLBACK}


def check_exports(cfg: QuantConfig, exports: tuple[str, ...], act_bits: int | None,
                  onnx_profile: str = "generic", model_type: str | None = None) -> None:
    """A :class:`UserError` when a requested export format cannot hold what ``cfg`` quantizes onto: GGUF needs
    a ggml type for every layer (embedding included), a family llama.cpp runs (``model_type``, when known
    before loading) and no static activation encodings; ONNX needs a grid with a DequantizeLinear form that
    ``onnx_profile`` takes (a quantized embedding of another type is stored dequantized, so any type), and
    ``npu`` needs symmetric uniform grids."""
    formats = possible_formats(cfg)
    family = registered_adapters().get(model_type) if model_type else None  # an unknown one is named at load
    if family is not None:
        gguf_arch = family.GGUF
        if "gguf" in exports and not isinstance(gguf_arch, GgufArch):
            raise UserError(f"--export gguf cannot hold a {model_type} model ({gguf_arch}); use --export onnx")
    if "gguf" in exports:
        embedding = {cfg.embed_format.lower()} - {"", FLOAT}  # a float table is F32 in the file
        bad = sorted(f for f in formats | embedding if not is_ggml_format(f))
        if bad:
            raise UserError(f"--export gguf cannot hold the {bad[0]} grid (GGUF stores ggml types only); quantize "
                            f"with a ggml --format (q4_0, q4_k, ...) or --preset, or drop gguf from --export")
        check_gguf_config(cfg)
        if act_bits is not None:
            raise UserError("--export gguf cannot hold static activation encodings (--act-bits): llama.cpp "
                            "quantizes activations its own way; drop --act-bits or export onnx only")
    if "onnx" in exports:
        bad = sorted(f for f in formats if not onnx_expressible(f))
        if bad:
            raise UserError(f"--export onnx cannot hold the {bad[0]} grid (the ONNX exporter takes "
                            f"{', '.join(sorted(ONNX_FORMATS))}); choose one of those with --format, or drop onnx "
                            f"from --export")
        for fmt in sorted(formats):
            check_onnx_format(fmt, onnx_profile)
        run_grid = any(get_format(f).configurable for f in formats)  # some layer on the run's --bits grid
        if onnx_profile in ("npu", "qnn-htp") and run_grid and not cfg.sym:
            raise UserError(f"--onnx-profile {onnx_profile} needs symmetric weights (zero point 0); add --sym, or "
                            f"use --onnx-profile generic")
        if onnx_profile == "qnn-htp" and act_bits is None:
            raise UserError("--onnx-profile qnn-htp quantizes every activation; add --act-bits 16 (W4A16) or 8 "
                            "(W8A8)")
        if onnx_profile == "qnn-htp" and run_grid and 0 < cfg.group_size < 2**31:
            raise UserError("--onnx-profile qnn-htp takes uniform grids per output channel only; add "
                            "--group-size -1, or --format lpbq4 for blocks")


def run_output_names() -> set[str]:
    """The names a run writes in OUTDIR: the QDIR (and its resume work folder), the exported files, the
    reports and the manifest."""
    return {QDIR_NAME, f"{QDIR_NAME}.partial", *FILE_NAMES.values(), f"{FILE_NAMES['onnx']}.data", JSON_NAME,
            MD_NAME, PNG_NAME, MANIFEST}


def is_run_output(name: str) -> bool:
    """Whether a name in OUTDIR is one a run writes (:func:`run_output_names`) or a hidden temporary file of
    an interrupted write."""
    return name in run_output_names() or name.startswith(".")


def check_outdir(outdir: Path) -> None:
    """OUTDIR must be new, empty, or hold only what a run writes (a previous or interrupted run's files, which
    this run replaces); anything else is refused."""
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"{outdir} exists and is not a folder; choose another -o location")
    foreign = sorted(p.name for p in outdir.iterdir() if not is_run_output(p.name)) if outdir.is_dir() else []
    if foreign:
        raise UserError(f"{outdir} holds {foreign[0]}, which is not a turboboa run's file; choose another -o "
                        f"location or remove it")


def write_manifest(outdir: Path, files: list[Path], known: dict[str, str] | None = None) -> Path:
    """``OUTDIR/SHA256SUMS``: ``<sha256>  <path relative to OUTDIR>`` per file, sorted by path (what
    ``sha256sum -c`` reads); written atomically. ``known``: digests already checked, by relative path (the
    QDIR's own SHA256SUMS), not computed again."""
    known = known or {}
    rel = {p.relative_to(outdir).as_posix() for p in files}
    text = sums_text({r: known.get(r) or sha256_file(outdir / r) for r in rel})
    return atomic_write(outdir / MANIFEST, text.encode())


def previous_outputs(outdir: Path) -> set[str]:
    """The files a previous run listed in ``OUTDIR/SHA256SUMS`` (relative paths), none without one."""
    manifest = outdir / MANIFEST
    if not manifest.is_file():
        return set()
    return {line.split("  ", 1)[1] for line in manifest.read_text().splitlines() if "  " in line}


@dataclass
class RunResult:
    """What a run produced: OUTDIR, the report (``passed``: True / False, None with ``check=False``), the
    report files and every file listed in the manifest."""

    outdir: Path
    report: dict[str, Any]
    report_files: dict[str, Path]
    files: list[Path]

    @property
    def passed(self) -> bool | None:
        return self.report["passed"]


def run(model: str, cfg: QuantConfig, outdir: str | Path, exports: tuple[str, ...], *, format_given: bool = True,
        check: bool = True, settings: Any = None, device: str = "auto", act_bits: int | None = None,
        progress: bool = True, resume: bool = False, log: Any = None, onnx_profile: str = "generic",
        act_scope: str = "inputs", stream: bool = True) -> RunResult:
    """Quantize ``model`` with ``cfg`` into ``OUTDIR/qdir``, export every format of ``exports``, check the
    files against the QDIR (``settings``: a :class:`runtime_check.checker.CheckSettings`), write the reports
    and the SHA-256 manifest. ``onnx_profile``: the ONNX export's profile (``npu``: static shapes of the
    check's window length; ``qnn-htp``: every tensor quantized, so the activations are calibrated with
    ``act_scope="graph"``). ``resume`` continues an interrupted quantization into the same OUTDIR
    (:func:`turboboa.quantization.quantize`), which reads the model block by block unless ``stream`` is False.
    ``log`` (a callable taking a line) hears one line per step."""
    say = log or (lambda line: None)
    outdir = Path(outdir)
    settings = settings or CheckSettings()
    settings.validate()
    check_act_bits(act_bits)
    cfg, format_note = choose_format(cfg, exports, format_given)
    check_exports(cfg, exports, act_bits, onnx_profile, folder_model_type(model))
    check_outdir(outdir)
    for name in run_output_names():  # what a killed run left: the hidden temporaries of its files
        remove_stale_temporaries(outdir / name)
    stale = previous_outputs(outdir)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if onnx_profile == "qnn-htp" and "onnx" in exports:
        act_scope = "graph"
    summary = quantization.quantize(model, cfg, outdir / QDIR_NAME, device=device, progress=progress, act_bits=act_bits,
                           resume=resume, act_scope=act_scope, stream=stream)
    timings["quantize"] = round(time.perf_counter() - t0, 3)
    gc.collect()  # the float model quantized in place is garbage now; free it before the exports
    say(summary.line())
    cfg = summary.config
    ckpt = load_qdir(outdir / QDIR_NAME)
    written = {kind: outdir / FILE_NAMES[kind] for kind in exports}
    for kind, path in written.items():
        t0 = time.perf_counter()
        options = {"profile": onnx_profile, "seqlen": settings.seqlen} if kind == "onnx" and onnx_profile != "generic" \
            else {}
        export(ckpt, kind, path, progress=progress, **options)
        timings[f"export_{kind}"] = round(time.perf_counter() - t0, 3)
        say(f"exported {kind} in {timings[f'export_{kind}']:.1f} s -> {path}")

    digests, summary_of_qdir = ckpt.digests, quantization_summary(ckpt)
    del ckpt  # the check loads the QDIR itself: one copy of its tensors at a time
    gc.collect()
    if check:
        report = run_check(outdir / QDIR_NAME, gguf=written.get("gguf"), onnx=written.get("onnx"),
                           settings=settings, progress=progress)
    else:
        report = {"passed": None, "qdir": str(outdir / QDIR_NAME), "files": {k: str(p) for k, p in written.items()},
                  "quantization": summary_of_qdir, "notes": ["not checked: --no-check"]}
    report["run"] = {"model": model, "exports": list(exports), "outdir": str(outdir), "config": cfg.to_dict(),
                     "act_bits": act_bits, "format_choice": format_note, "seconds": timings}
    if format_note:
        report.setdefault("notes", []).insert(0, format_note)
    report_files = write_report(report, outdir)

    files = [p for p in sorted((outdir / QDIR_NAME).rglob("*")) if p.is_file()]
    for path in written.values():
        data = path.with_name(path.name + ".data")
        files += [path, data] if data.is_file() else [path]
    files += list(report_files.values())
    keep = {p.relative_to(outdir).as_posix() for p in files}
    for name in sorted(stale - keep):  # a previous run's file this run did not write again
        old = outdir / name
        if old.resolve().is_relative_to(outdir.resolve()):
            old.unlink(missing_ok=True)
    write_manifest(outdir, files, {f"{QDIR_NAME}/{name}": digest for name, digest in digests.items()})
    return RunResult(outdir, report, report_files, files)
