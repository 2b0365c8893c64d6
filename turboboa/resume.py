"""Resumable quantization: the state after every finished block, kept in a work folder beside the output.

``<output>.partial/`` holds, each file written under a temporary name and renamed when complete:

* ``block-NNNN.safetensors``: the quantized layers of block NNNN (the QDIR layout, :func:`layer_tensors`);
* ``streams-NNNN.safetensors``: the input of block NNNN for every calibration sequence, the quantized stream
  ``X`` and, for TurboBoA's F2, the full-precision stream ``X_fp``, plus the torch RNG state;
* ``state.json``: the commit point, written last: the next block, the seconds of each finished block, and a
  fingerprint of the float model (after padding), the configuration, the calibration tokens, the device type
  and the package versions. A resume whose fingerprint differs is refused in one line.

A restarted run continues from ``state.json``'s next block with exactly the tensors the interrupted run held,
so its QDIR is bit-identical to an uninterrupted run's. The folder is removed when the QDIR is written, and
after a :class:`UserError` (bad input fails again the same way); an interrupt, a crash or a kill leaves it
for ``resume=True``. A kill while a file is written leaves at most a hidden temporary file in the folder
(never a file under its final name); the resumed run ignores it and removes it with the folder.

The tests kill the process (:func:`turboboa.output_files.kill_point`) at ``solve:<block>`` (in the pipeline) and at
``state-write:<block>`` (halfway through ``state.json``'s temporary file, before its rename).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .checkpoint import layer_tensors, layers_from_tensors, package_versions
from .config import QuantConfig
from .errors import UserError
from .output_files import atomic_file, prepare_output, write_errors_as_user_errors, write_text_atomic
from .quantized import QuantizedLinear

WORK_SUFFIX = ".partial"
STATE_FILE = "state.json"
STATE_FORMAT = "turboboa-resume"
STATE_VERSION = 1


def work_dir(output: str | os.PathLike[str]) -> Path:
    """The work folder of the output ``output``: ``<output>.partial`` beside it."""
    output = Path(output)
    return output.with_name(output.name + WORK_SUFFIX)


def fingerprint(model: torch.nn.Module, calib_ids: torch.Tensor, cfg: QuantConfig, device: torch.device,
                source: str | None = None) -> str:
    """SHA-256 over everything that decides a block's result: every tensor of ``model`` (name, dtype, shape,
    bytes; a tensor not read yet, of a streamed model, by name, dtype and shape), the identity of the files
    a streamed model reads (``source``, :meth:`TensorSource.identity`), the configuration, the calibration
    tokens, the device type and the package versions."""
    h = hashlib.sha256()
    versions = {k: v for k, v in package_versions().items() if k in ("turboboa", "torch", "transformers")}
    head = {"state_version": STATE_VERSION, "config": cfg.to_dict(), "device": device.type, "versions": versions}
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    if source is not None:
        h.update(f"streamed|{source}".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if not t.is_meta:
            h.update(_tensor_bytes(t))
    h.update(_tensor_bytes(calib_ids.to(torch.int64)))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


@dataclass
class ResumePoint:
    """What a restarted run continues from: the next block, its input streams, the layers already done."""

    next_block: int
    layers: dict[str, QuantizedLinear]
    streams: dict[str, torch.Tensor | None]
    rng: torch.Tensor
    block_seconds: list[float] = field(default_factory=list)


class BlockCheckpointer:
    """Persists the pipeline's state after each finished block (``on_block_done``) and reads it back."""

    def __init__(self, output: str | os.PathLike[str], print_: str, n_blocks: int) -> None:
        self.folder = work_dir(output)
        self.fingerprint = print_
        self.n_blocks = n_blocks
        self.block_seconds: list[float] = []

    # -- starting ---------------------------------------------------------------------------------------
    def start(self, resume: bool) -> ResumePoint | None:
        """With ``resume`` and a committed state: check its fingerprint and return where to continue; otherwise
        (no state, or no ``resume``) clear the work folder and start from block 0."""
        if resume and (self.folder / STATE_FILE).is_file():
            point = self.read()
            self.block_seconds = list(point.block_seconds)
            return point
        self.discard()
        return None

    def read(self) -> ResumePoint:
        """The committed state, read only (the ranks but 0 of a ``torchrun`` run read what rank 0 kept)."""
        try:
            state = json.loads((self.folder / STATE_FILE).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot resume: {self.folder / STATE_FILE} is unreadable ({e}); run again without "
                            f"--resume to start over") from None
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise UserError(f"cannot resume: {self.folder} was written by another turboboa version (state version "
                            f"{state.get('version')}, this one writes {STATE_VERSION}); run again without --resume")
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"cannot resume: {self.folder} was left by a run with another model, configuration, "
                            f"calibration or device (fingerprint {str(state.get('fingerprint'))[:12]} vs "
                            f"{self.fingerprint[:12]}); run again without --resume to start over")
        nxt = int(state["next_block"])
        try:
            layers: dict[str, QuantizedLinear] = {}
            for i in range(nxt):
                tensors = load_file(str(self.folder / _block_file(i)))
                layers.update(layers_from_tensors(state["blocks"][str(i)], tensors))
            streams = load_file(str(self.folder / _streams_file(nxt)))
        except Exception as e:  # noqa: BLE001 - any read error: the work folder is damaged
            raise UserError(f"cannot resume: {self.folder} is damaged ({' '.join(str(e).split())[:200]}); run "
                            f"again without --resume to start over") from None
        return ResumePoint(nxt, layers, {"X": streams["X"], "X_fp": streams.get("X_fp")}, streams["rng"],
                           [float(s) for s in state.get("block_seconds", [])])

    # -- after each block -------------------------------------------------------------------------------
    def on_block_done(self, i: int, layers: dict[str, QuantizedLinear], state: dict[str, Any]) -> None:
        """Commit block ``i``: its layers, the next block's input streams and the RNG state, then
        ``state.json``; the previous streams file is removed once the new state is committed."""
        self.block_seconds.append(float(state.get("seconds", 0.0)))
        streams = {"X": state["X"].detach().cpu().contiguous(), "rng": torch.get_rng_state()}
        if state.get("X_fp") is not None:
            streams["X_fp"] = state["X_fp"].detach().cpu().contiguous()
        tensors, entries = layer_tensors(layers)
        needed = sum(t.numel() * t.element_size() for t in (*streams.values(), *tensors.values()))
        with write_errors_as_user_errors(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            prepare_output(self.folder / STATE_FILE, needed, "the resume state")
            with atomic_file(self.folder / _block_file(i)) as tmp:
                save_file(tensors, str(tmp))
            with atomic_file(self.folder / _streams_file(i + 1)) as tmp:
                save_file(streams, str(tmp))
            blocks = self._committed_blocks()
            blocks[str(i)] = entries
            doc = {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": self.fingerprint,
                   "n_blocks": self.n_blocks, "next_block": i + 1, "block_seconds": self.block_seconds,
                   "blocks": blocks}
            write_text_atomic(self.folder / STATE_FILE, json.dumps(doc, indent=1) + "\n",
                              kill_at=f"state-write:{i}")
            (self.folder / _streams_file(i)).unlink(missing_ok=True)

    def blocks(self, stop: int) -> Iterator[dict[str, QuantizedLinear]]:
        """The quantized layers of the committed blocks 0 to ``stop - 1``, one block at a time, read from their
        files."""
        entries = self._committed_blocks()
        for i in range(stop):
            yield layers_from_tensors(entries[str(i)], load_file(str(self.folder / _block_file(i))))

    def stored_bytes(self) -> int:
        """Bytes of the committed blocks' layer files."""
        return sum(f.stat().st_size for f in self.folder.glob("block-*.safetensors"))

    def _committed_blocks(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.folder / STATE_FILE).read_text()).get("blocks", {}))
        except (OSError, json.JSONDecodeError):
            return {}

    # -- the end --------------------------------------------------------------------------------------------
    def discard(self) -> None:
        """Remove the work folder (after success, a UserError, or when starting over)."""
        shutil.rmtree(self.folder, ignore_errors=True)


def _block_file(i: int) -> str:
    return f"block-{i:04d}.safetensors"


def _streams_file(i: int) -> str:
    return f"streams-{i:04d}.safetensors"


def apply_layers(model: torch.nn.Module, layers: dict[str, QuantizedLinear]) -> None:
    """Load the fake-quant weight of every layer in ``layers`` into ``model`` (what the pipeline did to the
    blocks it finished before the interruption)."""
    with torch.no_grad():
        for name, q in layers.items():
            weight = model.get_submodule(name).weight
            weight.copy_(q.dequantize().to(weight.device, weight.dtype))
