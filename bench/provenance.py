"""Provenance of benchmark rows, the rule that reuses a stored row, measured child processes, atomic writes.

Every row a benchmark script measures carries a ``provenance`` entry (:meth:`Context.record`):

* ``commit`` and ``dirty``: the git commit checked out and whether the working tree had uncommitted or untracked
  changes (result folders excluded);
* ``measured_at``: UTC date and time the row was written;
* ``settings``: everything that made the row, resolved: for a ``turboboa quantize`` step the full
  :class:`~turboboa.config.QuantConfig` (every option, defaults and ``auto`` choices included) as the CLI builds
  it, the device, and every option of the other ``turboboa`` commands the row ran (:func:`command_options`);
* ``data``: calibration and evaluation sizes (``nsamples x seqlen`` and their token count, windows x seqlen);
* ``machine``: CPU model, logical CPUs, torch threads, GPU name (or null), operating system and architecture;
* ``versions``: turboboa, torch, transformers, numpy, safetensors, gguf, onnx, onnxruntime and the row's extras
  (llama-cpp-python, onnxruntime-qnn, openvino), from :func:`turboboa.checkpoint.package_versions`;
* ``measured``: wall time, the largest peak resident set of the row's child processes, peak GPU memory when
  the row ran on a GPU, and what the row's steps reported (evaluation tokens, ...).

A stored row is reused only when its ``settings``, ``data``, ``machine`` and ``versions`` all equal the current
run's (:meth:`Context.mismatch`); a reused row keeps its own commit and date, so a reader sees its age. Rows
without a ``provenance`` entry (written before rows recorded one) are never reused, and ``--fresh`` reuses
nothing. Result files are written atomically (:func:`turboboa.output_files.atomic_file`): a temporary file beside the
target, renamed onto it when complete.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # the parent parses command lines with the same `cli` its children run
    sys.path.insert(0, str(ROOT))

from turboboa.output_files import atomic_file, write_text_atomic  # noqa: E402

SCHEMA = 1
KEY_FIELDS = ("settings", "data", "machine", "versions")
# options that only choose where output goes or how much is printed: not part of a row's settings
OUTPUT_OPTIONS = ("output", "outdir", "report_dir", "quiet", "as_json", "resume")


def normalized(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, keys strings), for comparisons with stored rows."""
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------------------------- the record


def git_state(root: Path = ROOT, exclude: Iterable[Path] = ()) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool}`` of the git tree at ``root``; ``dirty`` is True when tracked files
    differ from the commit or untracked files exist, ignoring ``bench/results`` and the folders ``exclude``
    (a benchmark's own output). Both are None when ``root`` is not a git tree or git is missing."""
    root = Path(root).resolve()
    specs = [":(exclude)bench/results"]
    for p in exclude:
        try:
            rel = Path(p).resolve().relative_to(root)
        except ValueError:
            continue
        if str(rel) != ".":
            specs.append(f":(exclude){rel.as_posix()}")
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", ".", *specs],
                                capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": bool(status.strip())}


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Hardware", "cpu model", "Processor") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """This machine as rows record it: CPU model, logical CPUs, the threads torch uses (the children inherit
    the environment that sets them), the first GPU's name (None without CUDA), operating system and
    architecture (no kernel release: it changes without changing the numbers)."""
    import torch

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "os": f"{platform.system()} {platform.machine()}"}


def library_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Versions of the packages that decide a row's numbers (those a QDIR records, then ``extra``)."""
    from turboboa.checkpoint import package_versions

    return package_versions(tuple(extra))


def resolve_device(name: str) -> str:
    """``auto`` resolved to ``cuda`` or ``cpu`` (as ``turboboa --device`` resolves it); an unavailable or
    unknown device stops the script with the CLI's message."""
    from turboboa.blockwise import select_device
    from turboboa.errors import UserError

    try:
        return str(select_device(name))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


def command_options(args: Sequence[str]) -> dict[str, Any]:
    """Every option of the ``turboboa`` command line ``args`` (the subcommand first, e.g. ``["eval", "QDIR",
    "--seqlen", "512"]``) as the CLI parses it, defaults included; the options that only choose output
    locations or printing (-o, -q, --json, --resume) are left out."""
    import cli

    name, *rest = args
    command = cli.app.commands[name]
    with command.make_context(name, list(rest)) as ctx:
        params = dict(ctx.params)
    return normalized({k: v for k, v in params.items() if k not in OUTPUT_OPTIONS})


def quantize_settings(args: Sequence[str]) -> dict[str, Any]:
    """What ``turboboa quantize ARGS`` (``args`` without the subcommand) runs, fully resolved by the CLI's own
    code: the model, every :class:`~turboboa.config.QuantConfig` field (defaults and ``--rotate auto`` /
    ``--online-rotate auto`` / group-size choices resolved), the static activation bits and the activation
    scope, and the device as given (pass a resolved one)."""
    import cli

    params = command_options(["quantize", *args, *([] if _has_output(args) else ["-o", "QDIR"])])
    scope, act_bits = cli.activation_scheme(params)
    return normalized({"model": params["model"], "quant_config": cli.quant_config(params).to_dict(),
                       "act_bits": act_bits, "act_scope": scope, "device": params["device"]})


def _has_output(args: Sequence[str]) -> bool:
    return any(a in ("-o", "--output") or a.startswith("--output=") for a in args)


def qdir_record(qdir: Path) -> dict[str, Any]:
    """What a QDIR says about the run that made it (``quant_config.json``): the resolved QuantConfig, device,
    calibration, package versions, phase timings and peak memory (peak GPU memory when made on CUDA, else
    the quantizing process's peak resident set)."""
    doc = json.loads((Path(qdir) / "quant_config.json").read_text())
    timings = doc.get("timings") or {}
    return {"quant_config": doc.get("quant_config"), "device": doc.get("device"),
            "calibration": doc.get("calibration"), "versions": doc.get("versions"),
            "phase_seconds": timings.get("phase_seconds"), "peak_memory_bytes": timings.get("peak_memory_bytes"),
            "block_seconds": timings.get("block_seconds"), "resumed_from_block": timings.get("resumed_from_block")}


def confirm_quantize(settings: dict[str, Any], qdir: Path) -> dict[str, Any]:
    """``settings`` (from :func:`quantize_settings`) with the QuantConfig the QDIR recorded: the same dict when
    they agree (a predicted "auto" agrees with whatever the run resolved it to, which the QDIR records), else
    the QDIR's config (what made the row), with a warning on stderr."""
    recorded = normalized(qdir_record(qdir)["quant_config"])
    predicted = settings["quant_config"]
    # "auto" choices that need the model (--rotate auto) are resolved by the run: any recorded value matches
    differ = sorted(k for k in set(recorded) | set(predicted)
                    if recorded.get(k) != predicted.get(k) and predicted.get(k) != "auto")
    if not differ:
        return settings
    print(f"[bench] warning: {qdir}'s QuantConfig differs from the one predicted from its command line in "
          f"{', '.join(differ)}; the row records the QDIR's", file=sys.stderr, flush=True)
    return {**settings, "quant_config": recorded}


def calibration_data(nsamples: int, seqlen: int) -> dict[str, int]:
    """Calibration size: ``nsamples`` sequences of ``seqlen`` tokens."""
    return {"nsamples": nsamples, "seqlen": seqlen, "tokens": nsamples * seqlen}


def evaluation_data(windows: int | None, seqlen: int) -> dict[str, Any]:
    """Evaluation size as asked: the first ``windows`` windows (None: all) of ``seqlen`` tokens, and the tokens
    they hold when the count is given (the scored tokens, one fewer per window, are in ``measured``)."""
    return {"windows": windows, "seqlen": seqlen, "tokens": windows * seqlen if windows else None}


@dataclass
class Context:
    """One benchmark invocation: the device chosen once, the commit, machine and library versions every row it
    measures records, and whether stored rows may be reused (never under ``--fresh``)."""

    device: str
    fresh: bool
    git: dict[str, Any]
    machine: dict[str, Any]
    invocation: str = field(default_factory=lambda: uuid.uuid4().hex)
    _versions: dict[tuple[str, ...], dict[str, str]] = field(default_factory=dict)

    @classmethod
    def start(cls, device: str = "auto", fresh: bool = False, exclude: Iterable[Path] = ()) -> Context:
        """The context of this process: ``device`` resolved, the git state of the repository (``exclude``:
        output folders that do not make the tree dirty), this machine."""
        return cls(device=resolve_device(device), fresh=fresh, git=git_state(ROOT, exclude), machine=machine_info())

    def versions(self, extra: Sequence[str] = ()) -> dict[str, str]:
        """:func:`library_versions` with ``extra``, read once per invocation."""
        k = tuple(extra)
        if k not in self._versions:
            self._versions[k] = library_versions(k)
        return self._versions[k]

    def key(self, settings: dict[str, Any], data: dict[str, Any], extra_versions: Sequence[str] = ()) -> dict:
        """The fields a stored row must match to be reused, for a row of ``settings`` and ``data`` now."""
        return normalized({"settings": settings, "data": data, "machine": self.machine,
                           "versions": self.versions(extra_versions)})

    def record(self, settings: dict[str, Any], data: dict[str, Any], measured: dict[str, Any],
               extra_versions: Sequence[str] = ()) -> dict[str, Any]:
        """The ``provenance`` entry of a row measured now: schema, commit, dirty, date, the key fields and
        ``measured`` (wall time, peak memory, ...)."""
        return {"schema": SCHEMA, "commit": self.git["commit"], "dirty": self.git["dirty"],
                "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                **self.key(settings, data, extra_versions), "measured": normalized(measured)}

    def mismatch(self, row: Any, settings: dict[str, Any], data: dict[str, Any],
                 extra_versions: Sequence[str] = ()) -> str | None:
        """None when ``row`` may be reused for ``settings`` and ``data`` now, else why not."""
        if self.fresh:
            return "--fresh"
        if not isinstance(row, dict):
            return "not measured yet"
        prov = row.get("provenance")
        if not isinstance(prov, dict):
            return "no provenance (a row of an earlier run)"
        if prov.get("schema") != SCHEMA:
            return f"provenance schema {prov.get('schema')} (now {SCHEMA})"
        key = self.key(settings, data, extra_versions)
        differ = [f for f in KEY_FIELDS if normalized(prov.get(f)) != key[f]]
        return f"{', '.join(differ)} differ" if differ else None

    def reusable(self, row: Any, settings: dict[str, Any], data: dict[str, Any],
                 extra_versions: Sequence[str] = ()) -> bool:
        """``row`` may be reused (:meth:`mismatch` is None)."""
        return self.mismatch(row, settings, data, extra_versions) is None

    def reuse(self, name: str, row: Any, settings: dict[str, Any], data: dict[str, Any],
              extra_versions: Sequence[str] = ()) -> bool:
        """:meth:`reusable`, with a line on stderr saying which rows are reused and why the others are measured."""
        why = self.mismatch(row, settings, data, extra_versions)
        if why is None:
            prov = row["provenance"]
            print(f"[bench] {name}: reused (measured at {short_commit(prov)} on {prov['measured_at'][:10]})",
                  file=sys.stderr, flush=True)
            return True
        print(f"[bench] {name}: measuring ({why})", file=sys.stderr, flush=True)
        return False

    def cache_key(self, settings: dict[str, Any], data: dict[str, Any], extra_versions: Sequence[str] = ()) -> dict:
        """The key of an intermediate file (a shared QDIR, a converted model) made for ``settings``: the row key
        plus the commit; made from a dirty tree or under ``--fresh`` it is this invocation's alone."""
        own = self.fresh or self.git["dirty"] is not False
        return {**self.key(settings, data, extra_versions), "commit": self.git["commit"],
                "invocation": self.invocation if own else None}

    def cache_valid(self, path: Path, settings: dict[str, Any], data: dict[str, Any],
                    extra_versions: Sequence[str] = ()) -> bool:
        """``path`` exists and its sidecar (:meth:`mark_cache`) holds the current :meth:`cache_key`."""
        side = _sidecar(path)
        if not (Path(path).exists() and side.exists()):
            return False
        try:
            return json.loads(side.read_text()) == normalized(self.cache_key(settings, data, extra_versions))
        except json.JSONDecodeError:
            return False

    def mark_cache(self, path: Path, settings: dict[str, Any], data: dict[str, Any],
                   extra_versions: Sequence[str] = ()) -> None:
        """Record beside ``path`` the :meth:`cache_key` it was made for."""
        write_json_atomic(_sidecar(path), self.cache_key(settings, data, extra_versions))


def _sidecar(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".provenance.json")


def add_arguments(parser: Any) -> None:
    """The options every benchmark script takes: ``--device`` (resolved once, passed to every step) and
    ``--fresh``."""
    parser.add_argument("--device", default="auto",
                        help="auto | cpu | cuda: chosen once and passed to every step (default auto)")
    parser.add_argument("--fresh", action="store_true",
                        help="measure every row again: no stored row is reused (an interrupted --fresh run "
                             "resumes without --fresh: rows it measured match the current run)")


def has_provenance(row: Any) -> bool:
    """``row`` carries a provenance entry."""
    return isinstance(row, dict) and isinstance(row.get("provenance"), dict)


def drop_legacy_fields(doc: dict[str, Any], rows: Iterable[Any], fields: Sequence[str] = ("machine",),
                       holder: dict[str, Any] | None = None) -> None:
    """Remove the document-level ``fields`` (the machine line of an earlier run, which described its rows) from
    ``holder`` (default ``doc``) once every row in ``rows`` (None: no row) carries its own provenance; kept,
    unchanged, while some row still lacks one."""
    if all(has_provenance(r) for r in rows if r is not None):
        for f in fields:
            (doc if holder is None else holder).pop(f, None)


# -------------------------------------------------------------------------------------------- measurement


@dataclass
class Child:
    """A finished child process: exit code, output (empty when it went to a log), wall time, peak resident set."""

    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int | None


class ChildFailed(RuntimeError):
    """A benchmark step's process exited with an unexpected code."""


def rss_bytes(maxrss: int) -> int:
    """``ru_maxrss`` in bytes."""
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024  # Linux reports KiB


def run_child(cmd: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None,
              log: Path | None = None) -> Child:
    """Run ``cmd`` to its end: its stdout and stderr (appended to ``log`` instead, when given), wall time, and
    the peak resident set size of that process and the descendants it waited for (``os.wait4``; None where
    the platform lacks it)."""
    cmd = [str(c) for c in cmd]
    with ExitStack() as stack:
        out = stack.enter_context(tempfile.TemporaryFile("w+"))
        err = stack.enter_context(tempfile.TemporaryFile("w+"))
        if log is not None:
            logf = stack.enter_context(open(log, "a"))
            logf.write(f"\n$ {' '.join(cmd)}\n")
            logf.flush()
            out = err = logf
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err)
        peak = None
        try:
            if hasattr(os, "wait4"):
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                peak = rss_bytes(usage.ru_maxrss)
            else:
                proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        seconds = time.perf_counter() - t0
        texts = ["", ""]
        if log is None:
            for i, f in enumerate((out, err)):
                f.seek(0)
                texts[i] = f.read()
        return Child(cmd, proc.returncode, texts[0], texts[1], seconds, peak)


class RowMeter:
    """Wall time of one benchmark row from its creation, the largest peak resident set of the child processes
    it ran, and the largest peak GPU memory its steps reported."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.offset = 0.0
        self.peak_rss_bytes: int | None = None
        self.peak_gpu_bytes: int | None = None

    def run(self, cmd: Sequence[str], cwd: Path | None = ROOT, log: Path | None = None,
            ok: Sequence[int] = (0,)) -> Child:
        """:func:`run_child` counted in this row; an exit code outside ``ok`` raises :class:`ChildFailed`
        with the end of its stderr (or the log's path)."""
        child = run_child(cmd, cwd=cwd, log=log)
        self.add(rss=child.peak_rss_bytes)
        if child.returncode not in ok:
            where = f"see {log}" if log is not None else (child.stderr.strip()[-2000:] or child.stdout[-2000:])
            raise ChildFailed(f"failed ({child.returncode}): {' '.join(child.cmd)}: {where}")
        return child

    def add(self, rss: int | None = None, gpu: int | None = None) -> None:
        """Count a peak resident set (bytes) and a peak GPU memory (bytes) measured elsewhere."""
        if rss is not None:
            self.peak_rss_bytes = max(self.peak_rss_bytes or 0, int(rss))
        if gpu is not None:
            self.peak_gpu_bytes = max(self.peak_gpu_bytes or 0, int(gpu))

    def absorb(self, measured: dict[str, Any]) -> None:
        """Count a step measured earlier (another meter's :meth:`result`, e.g. a QDIR two rows share)."""
        self.offset += float(measured.get("wall_seconds") or 0.0)
        self.add(rss=measured.get("peak_rss_bytes"), gpu=measured.get("peak_gpu_bytes"))

    def result(self, **extra: Any) -> dict[str, Any]:
        """``{"wall_seconds", "peak_rss_bytes", "peak_gpu_bytes", **extra}`` so far."""
        return {"wall_seconds": round(time.perf_counter() - self.t0 + self.offset, 2),
                "peak_rss_bytes": self.peak_rss_bytes, "peak_gpu_bytes": self.peak_gpu_bytes, **extra}


def cli_json(args: Sequence[str], meter: RowMeter | None = None) -> dict[str, Any]:
    """Run ``turboboa ARGS`` (``python -m cli``, counted in ``meter`` when given) and return the JSON object its
    last stdout line prints (the command's ``--json`` summary)."""
    child = (meter or RowMeter()).run([sys.executable, "-m", "cli", *args], cwd=ROOT)
    return json.loads(child.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- writing


def write_json_atomic(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON in ``path``, atomically (:func:`turboboa.output_files.atomic_file`: a temporary file
    beside it, renamed onto it when complete); nothing is written when ``obj`` does not serialize."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_figure(fig: Any, path: Path, **kwargs: Any) -> None:
    """``fig.savefig`` into ``path`` atomically, in the format its suffix names."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lstrip(".") or "png", **kwargs)


# -------------------------------------------------------------------------------------------- markdown


def short_commit(prov: dict[str, Any]) -> str:
    """The commit's first 7 digits, ``+dirty`` when the tree had changes; "unknown commit" without git."""
    commit = prov.get("commit")
    if not commit:
        return "unknown commit"
    return commit[:7] + ("+dirty" if prov.get("dirty") else "")


def describe_machine(m: Any) -> str:
    """A machine record in one line (a record of an earlier run, in whatever shape it has, as its fields)."""
    if isinstance(m, dict) and "cpu" in m:
        return (f"{m['cpu']}, {m['cpus']} CPUs, torch {m['threads']} threads, GPU {m['gpu'] or 'none'}, "
                f"{m['os']}")
    if isinstance(m, dict):
        return ", ".join(f"{k} {v}" for k, v in m.items())
    return str(m)


def describe_versions(v: dict[str, str]) -> str:
    """Library versions in one line."""
    return ", ".join(f"{k} {ver}" for k, ver in v.items())


class Legend:
    """Per-row provenance cells of a markdown table (short commit, date, machine ``M<i>``, versions ``V<i>``)
    and the section that spells out the machines and version sets."""

    def __init__(self) -> None:
        self.machines: list[Any] = []
        self.versions: list[Any] = []
        self.legacy = False

    @staticmethod
    def _index(seen: list[Any], value: Any) -> int:
        value = normalized(value)
        if value not in seen:
            seen.append(value)
        return seen.index(value) + 1

    def cell(self, row: Any) -> str:
        """``abc1234 2025-01-31 M1 V1`` for a row with provenance, ``not recorded`` for a row of an earlier run
        (``-`` for no row)."""
        if row is None:
            return "-"
        if not has_provenance(row):
            self.legacy = True
            return "not recorded"
        prov = row["provenance"]
        m = self._index(self.machines, prov["machine"])
        v = self._index(self.versions, prov["versions"])
        return f"`{short_commit(prov)}` {prov['measured_at'][:10]} M{m} V{v}"

    def section(self, named: dict[str, Any] | None = None, legacy_machine: Any = None,
                title: str = "## Provenance") -> list[str]:
        """The markdown section: cells of the ``named`` rows outside the tables (e.g. the float model's), the
        machines and version sets the cells name, and what ``not recorded`` means (with ``legacy_machine``,
        the machine line an earlier run wrote for the whole document)."""
        cells = {name: self.cell(row) for name, row in (named or {}).items()}
        lines = [title, "",
                 "Each row's provenance: the commit that measured it (`+dirty`: with uncommitted changes), the "
                 "date, its machine (M) and library versions (V). A row is reused only when its settings, data "
                 "sizes, machine and versions all match the run's; it then keeps its own commit and date. The "
                 "full record (resolved settings, wall time, peak memory) is each row's `provenance` in the "
                 "JSON file.", ""]
        lines += [f"- {name}: {cell}" for name, cell in cells.items()]
        lines += [f"- M{i}: {describe_machine(m)}" for i, m in enumerate(self.machines, 1)]
        lines += [f"- V{i}: {describe_versions(v)}" for i, v in enumerate(self.versions, 1)]
        if self.legacy:
            text = ("- not recorded: measured by an earlier version of the benchmark, before rows recorded their "
                    "commit, settings and machine; such rows are never reused")
            if legacy_machine:
                text += f" (the machine line it wrote for the document: {describe_machine(legacy_machine)})"
            lines.append(text)
        return lines
