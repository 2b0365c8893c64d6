"""Run a QDQ ONNX graph on Qualcomm's QNN HTP backend (the Hexagon NPU), emulated on x86_64 by ``onnxruntime-qnn``.

``onnxruntime-qnn`` is a plugin execution provider: :func:`register_qnn` registers its library with onnxruntime
once per process, and :func:`open_qnn_session` opens a session on the HTP backend with CPU fallback disabled, so
that a session only exists when the HTP compiler accepts the whole graph (the graph is "NPU-bound").

Which node runs where comes from onnxruntime's own record of the partition (session option
``session.record_ep_graph_assignment_info`` and ``InferenceSession.get_provider_graph_assignment_info``, new in
onnxruntime 1.24): a session that may fall back lists its CPU nodes in :attr:`QnnSession.fallback_nodes`; a
refused session is opened again with fallback allowed to name the nodes in the refusal (:class:`UserError`).

Provider options (:data:`PROVIDER_OPTIONS`):

* ``htp_arch = 73``: compile for HTP v73 (Snapdragon 8 Gen 2 and X Elite), the oldest NPU of current
  Snapdragon phones and Copilot+ PCs; the emulator's default (``0``) compiles for v68.
* ``enable_htp_fp16_precision`` is not passed: onnxruntime-qnn 2.7 refuses it without a ``soc_model`` (which
  would pin one chip and override ``htp_arch``), and it only concerns float ops, which a fully QDQ graph lacks.
* ``offload_graph_io_quantization = 0``: the graph-input QuantizeLinear and graph-output DequantizeLinear run
  on the HTP too. The default (``1``) hands them to the CPU EP when fallback is allowed, but keeps them on the
  HTP when it is not; ``0`` gives both modes the same partition, so that the fallback list names only nodes the
  HTP cannot run.

``ep.context_embed_mode = 1`` for EPContext models (:func:`open_qnn_session` with ``context_out``): the compiled
QNN context binary is stored inside the ``.onnx`` file, so one file ships to the device, the atomic rename moves
it whole, and it cannot lose its ``.bin`` (whose name mode 0 derives from the temporary file name). Protobuf
caps such a file at 2 GiB.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from runtime_check.onnxrt import OnnxLogits, session_options, validate_onnx
from turboboa.errors import UserError

EP_NAME = "QNNExecutionProvider"
CPU_EP = "CPUExecutionProvider"
MISSING = "the qnn-htp backend needs the npu extra; install it with: pip install -e '.[npu]'"
PROVIDER_OPTIONS: dict[str, str] = {
    "htp_arch": "73",
    "offload_graph_io_quantization": "0",
}
REFUSED = "fallback to CPU EP has been explicitly disabled"  # onnxruntime's refusal, when a node would leave the EP
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})
_REGISTER_LOCK = threading.Lock()


def qnn_available() -> bool:
    """Whether ``onnxruntime_qnn`` imports (the ``npu`` extra is installed)."""
    try:
        importlib.import_module("onnxruntime_qnn")
    except ImportError:
        return False
    return True


def require_qnn() -> ModuleType:
    """The ``onnxruntime_qnn`` module; a one-line UserError when it is not installed or onnxruntime is too old."""
    try:
        module = importlib.import_module("onnxruntime_qnn")
    except ImportError:
        raise UserError(MISSING) from None
    import onnxruntime as ort

    if not (hasattr(ort, "register_execution_provider_library")
            and hasattr(ort.InferenceSession, "get_provider_graph_assignment_info")):
        raise UserError(f"onnxruntime {ort.__version__} cannot load plugin execution providers such as "
                        f"onnxruntime-qnn or report their partition; upgrade it with: pip install -U "
                        f"'onnxruntime>=1.24.2'")
    return module


def register_qnn() -> list[Any]:
    """Register the QNN EP library with onnxruntime (once per process) and return its ``OrtEpDevice`` list."""
    oq = require_qnn()
    import onnxruntime as ort

    with _REGISTER_LOCK:
        devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
        if not devices:
            try:
                ort.register_execution_provider_library(EP_NAME, oq.get_library_path())
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise UserError(f"onnxruntime cannot load the QNN EP library {oq.get_library_path()} "
                                f"({_one_line(e)}); reinstall it with: pip install -e '.[npu]'") from None
            devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise UserError(f"onnxruntime-qnn {oq.__version__} registered no {EP_NAME} device; reinstall it with: "
                        f"pip install -e '.[npu]'")
    return devices


def _one_line(error: BaseException, limit: int = 300) -> str:
    """``error``'s message on one line, at most ``limit`` characters."""
    return " ".join(str(error).split())[:limit]


def _node_label(name: str, op_type: str) -> str:
    """How a node is named in messages (function-inlined nodes have no name)."""
    return repr(name) if name else f"<unnamed {op_type}>"


@dataclass
class QnnSession:
    """An onnxruntime session on the QNN HTP backend, with its partition.

    ``assignment`` lists every node of the partitioned graph as (execution provider, node name, op type), in
    onnxruntime's order; it counts the graph onnxruntime partitions (after its basic rewrites and the inlining
    of function ops such as Mish), Q/DQ nodes included, each node counting once whatever its cost.
    """

    session: Any
    path: Path
    allow_fallback: bool
    threads: int
    provider_options: dict[str, str]
    assignment: list[tuple[str, str, str]] = field(default_factory=list)
    context_path: Path | None = None
    build_seconds: float = 0.0

    @property
    def fallback_nodes(self) -> list[tuple[str, str]]:
        """(name, op type) of each node that runs on the CPU EP instead of the NPU."""
        return [(name, op) for ep, name, op in self.assignment if ep != EP_NAME]

    @property
    def npu_share(self) -> float:
        """The share of the graph's nodes that run on the QNN EP (HTP backend)."""
        if not self.assignment:
            return 0.0
        return sum(ep == EP_NAME for ep, _, _ in self.assignment) / len(self.assignment)

    def run(self, output_names: list[str] | None, feeds: dict[str, Any]) -> list[Any]:
        """The outputs ``output_names`` (all with None) of one run on ``feeds``, as onnxruntime returns them."""
        return self.session.run(output_names, feeds)

    def describe(self) -> dict[str, Any]:
        """The settings that decide the numbers: versions, backend, provider options, fallback and NPU share."""
        import onnxruntime as ort

        oq = require_qnn()
        machine = platform.machine()
        emulated = machine.lower() in ("x86_64", "amd64")
        return {
            "providers": EP_NAME,
            "onnxruntime": ort.__version__,
            "onnxruntime_qnn": oq.__version__,
            "backend": f"QNN HTP, emulated on {machine}" if emulated else f"QNN HTP on {machine}",
            **{f"qnn.{k}": v for k, v in self.provider_options.items() if k != "backend_path"},
            "qnn.enable_htp_fp16_precision": "not passed (EP default; it would need a soc_model)",
            "cpu_fallback": "allowed" if self.allow_fallback else "disabled",
            "npu_share": round(self.npu_share, 6),
            "nodes": len(self.assignment),
            "fallback_nodes": [f"{name} ({op})" for name, op in self.fallback_nodes],
            "intra_op_num_threads": self.threads,
            "build_seconds": round(self.build_seconds, 3),
            **({"context_model": str(self.context_path)} if self.context_path else {}),
        }


def _graph_facts(path: Path) -> tuple[dict[str, str], bool]:
    """``path``'s ``turboboa.*`` metadata and whether it is an EPContext model; a UserError for a file that is
    not a complete ONNX model or that has an input of dynamic shape (the QNN EP compiles static shapes only)."""
    import onnx

    meta = validate_onnx(path)
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        if value.name in inits:
            continue
        dims = value.type.tensor_type.shape.dim
        dynamic = [d.dim_param or "?" for d in dims if not d.HasField("dim_value") or d.dim_value <= 0]
        if dynamic:
            raise UserError(f"qnn-htp needs static shapes, but input {value.name!r} of {path} has dynamic "
                            f"dimension(s) {', '.join(dynamic)}; export it with a fixed sequence length (--seqlen N)")
    is_context = any(n.op_type == "EPContext" for n in model.graph.node)
    return meta, is_context


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """Move what native code writes to stdout (file descriptor 1) inside the block to stderr, less the notice
    ``# LIBNATIVE: No alternate configuration ...`` that libQnnHtp prints when it loads, so that stdout keeps
    only the program's own output (``--json`` summaries)."""
    if os.name != "posix":
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 1)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None).fflush(None)  # C stdio buffers still pointing at the temporary file
            os.dup2(saved, 1)
            os.close(saved)
            captured.seek(0)
            lines = [ln for ln in captured.read().decode(errors="replace").splitlines()
                     if ln.strip() and "LIBNATIVE:" not in ln]
            if lines:
                print("\n".join(lines), file=sys.stderr)


def _build(path: Path, *, allow_fallback: bool, threads: int, context_file: Path | None = None) -> Any:
    """An onnxruntime session on ``path`` with the QNN EP (HTP backend) first; onnxruntime's exception as is."""
    import onnxruntime as ort

    devices = register_qnn()
    oq = require_qnn()
    opts = session_options(threads)
    opts.log_severity_level = 4  # the EP logs refusals as errors; the UserError names them instead
    opts.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    opts.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if allow_fallback else "1")
    if context_file is not None:
        opts.add_session_config_entry("ep.context_enable", "1")
        opts.add_session_config_entry("ep.context_file_path", str(context_file))
        opts.add_session_config_entry("ep.context_embed_mode", "1")
    opts.add_provider_for_devices(devices, {"backend_path": oq.get_qnn_htp_path(), **PROVIDER_OPTIONS})
    with _native_stdout_to_stderr():
        return ort.InferenceSession(str(path), sess_options=opts)


def _assignment(session: Any) -> list[tuple[str, str, str]]:
    """(execution provider, node name, op type) of every node of ``session``'s partitioned graph."""
    return [(sub.ep_name, node.name, node.op_type)
            for sub in session.get_provider_graph_assignment_info() for node in sub.get_nodes()]


def _refusal(path: Path, threads: int) -> UserError:
    """The UserError for a graph the HTP does not take whole: its first CPU node (compute nodes before Q/DQ),
    found by opening ``path`` again with fallback allowed."""
    try:
        cpu = [(n, op) for ep, n, op in _assignment(_build(path, allow_fallback=True, threads=threads)) if ep != EP_NAME]
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        return UserError(f"qnn-htp rejects part of {path} and cannot compile the rest either ({_one_line(e)}); "
                         f"export it fully QDQ (uint8/uint16 activations, int4/int8 per-channel weights)")
    named = [n for n in cpu if n[1] not in QDQ_OPS] or cpu
    if not named:
        return UserError(f"qnn-htp rejects {path} (onnxruntime assigns nodes to the CPU EP but lists none); "
                         f"open it with CPU fallback allowed to see the partition")
    (name, op), more = named[0], len(named) - 1
    extra = f" and {more} more" if more else ""
    return UserError(f"qnn-htp rejects node {_node_label(name, op)} ({op}){extra}; {len(cpu)} node(s) of "
                     f"{path.name} would run on the CPU: export those ops in a form the HTP supports, or allow "
                     f"CPU fallback")


def _compile_hint(error: str) -> str:
    """The fix to suggest when the QNN EP fails on a graph it did not refuse node by node."""
    if "finalize" in error.lower():
        return ("the HTP took every node but could not build them, as happens with float ops and with Q/DQ "
                "parameters an op cannot take (a Gather re-quantized to another scale): export it fully QDQ, "
                "scales kept through data-movement ops")
    return "export it again as a static-shape QDQ graph, and reinstall the npu extra if the QNN EP itself failed"


def _finish_context(tmp: Path, out: Path, meta: dict[str, str]) -> None:
    """Give the EPContext model at ``tmp`` the source's ``turboboa.*`` metadata and move it to ``out`` atomically."""
    if not tmp.is_file():
        raise UserError(f"qnn-htp wrote no EPContext model for {out.name} (no node was compiled for the NPU); "
                        f"check the graph with CPU fallback allowed")
    if meta:
        import onnx

        model = onnx.load(str(tmp))
        have = {p.key for p in model.metadata_props}
        for key, value in meta.items():
            if key not in have:
                model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(tmp))
    os.replace(tmp, out)


def open_qnn_session(path: str | os.PathLike[str], allow_fallback: bool = False, context_out: Path | None = None,
                     threads: int | None = None) -> QnnSession:
    """A session running the ONNX file ``path`` on the QNN HTP backend.

    Without ``allow_fallback`` every node must run on the HTP, else a one-line UserError names the first node
    it rejects. With ``context_out`` the compiled graph is also written there as an EPContext model (the
    precompiled form that ships to Snapdragon devices, binary embedded), via a temporary file and a rename.
    ``threads`` sets the CPU EP's intra-op threads (default: all cores).
    """
    path = Path(path)
    require_qnn()
    meta, _ = _graph_facts(path)
    return _open(path, meta, allow_fallback, context_out, int(threads or max(1, os.cpu_count() or 1)))


def _open(path: Path, meta: dict[str, str], allow_fallback: bool, context_out: Path | None,
          nthreads: int) -> QnnSession:
    """:func:`open_qnn_session` on a checked file ``path`` whose ``turboboa.*`` metadata is ``meta``."""
    tmp = None
    if context_out is not None:
        context_out = Path(context_out)
        context_out.parent.mkdir(parents=True, exist_ok=True)
        tmp = context_out.with_name(f".{context_out.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp.onnx")
    start = time.perf_counter()
    try:
        try:
            session = _build(path, allow_fallback=allow_fallback, threads=nthreads, context_file=tmp)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            if REFUSED in str(e):
                raise _refusal(path, nthreads) from None
            raise UserError(f"qnn-htp cannot compile {path} ({_one_line(e)}); {_compile_hint(str(e))}") from None
        seconds = time.perf_counter() - start
        if tmp is not None:
            _finish_context(tmp, context_out, meta)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return QnnSession(session=session, path=path, allow_fallback=allow_fallback, threads=nthreads,
                      provider_options=dict(PROVIDER_OPTIONS), assignment=_assignment(session),
                      context_path=context_out, build_seconds=seconds)


def load_context_model(path: str | os.PathLike[str], allow_fallback: bool = False,
                       threads: int | None = None) -> QnnSession:
    """A session on the EPContext model ``path`` (written by :func:`open_qnn_session` with ``context_out``),
    run on the QNN HTP backend from its precompiled binary; a UserError for a model without EPContext nodes."""
    path = Path(path)
    require_qnn()
    meta, is_context = _graph_facts(path)
    if not is_context:
        raise UserError(f"{path} has no EPContext node, so it is not a compiled QNN model; compile it with "
                        f"open_qnn_session(..., context_out=PATH) and load PATH")
    return _open(path, meta, allow_fallback, None, int(threads or max(1, os.cpu_count() or 1)))


class QnnLogits(OnnxLogits):
    """A ``logits_fn``: input ids (1, L) -> float32 logits (1, L, V) computed on the QNN HTP backend.

    The graph must have a static sequence length (the QNN EP compiles static shapes only). ``context_out``
    also writes the compiled EPContext model; an EPContext model itself loads like any other graph.
    """

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None, allow_fallback: bool = False,
                 context_out: Path | None = None) -> None:
        self.allow_fallback = allow_fallback
        self.context_out = context_out
        self.run_seconds: list[float] = []
        super().__init__(path, threads)

    def _open_session(self) -> Any:
        """The QNN HTP session (kept as ``self.qnn``); OnnxLogits reads the inputs and metadata from it."""
        self.qnn = open_qnn_session(self.path, self.allow_fallback, self.context_out, self.threads)
        return self.qnn.session

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the logits (1, L, V) the HTP computes for ``input_ids`` (1, L), timing the run."""
        start = time.perf_counter()
        logits = super().__call__(input_ids)
        self.run_seconds.append(time.perf_counter() - start)
        return logits

    def describe(self) -> dict[str, Any]:
        """The session settings that decide the numbers, the NPU share and the mean wall time per run."""
        runs = self.run_seconds
        return {**self.qnn.describe(), "runs": len(runs),
                "seconds_per_run": round(sum(runs) / len(runs), 4) if runs else None}

    def close(self) -> None:
        """Release the session."""
        super().close()
        if getattr(self, "qnn", None) is not None:
            self.qnn.session = None

    def __enter__(self) -> QnnLogits:
        return self


def qnn_logits_fn(path: str | os.PathLike[str], threads: int | None = None, allow_fallback: bool = False,
                  context_out: Path | None = None) -> QnnLogits:
    """A logits function running the ONNX file ``path`` on the QNN HTP backend; use it with ``with``."""
    return QnnLogits(path, threads, allow_fallback, context_out)
