"""``turboboa.quantize``: a model into a QDIR (padding, rotation, the blockwise solve, static activation
encodings, resume), atomically."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .activations import calibrate_activations, check_act_bits
from .activations.dynamic import DynamicSpec
from .activations.qdir import graph_encodings
from .arch import get_adapter
from .blockwise import check_group_size, quantize_model, select_device
from .checkpoint import (
    DeferredLayers,
    estimate_qdir_bytes,
    is_qdir,
    load_qdir,
    save_activations,
    save_qdir,
)
from .config import QuantConfig
from .data import calibration_batch
from .distributed import World, rank_device
from .errors import UserError
from .formats.registry import get_format
from .models import load_float_model
from .models.loader import load_streamed
from .models.padding import pad_model, residual_peaks, residual_placement
from .models.stream import StreamedModel
from .numerics import check_model_finite
from .output_files import check_writable, prepare_output
from .resume import BlockCheckpointer, apply_layers, fingerprint
from .rotation import install_online_down, rotate_model
from .rotation.fuse import rotate_streamed, rotation_unties_head


@dataclass
class QuantizeSummary:
    output: Path
    layers: int
    seconds: float
    peak_memory: int
    source: str
    config: QuantConfig
    rotation: dict[str, Any] | None = None

    def line(self) -> str:
        """One line for the user: layers, method, grid, rotation, time, peak memory, output."""
        cfg = self.config
        g = "per-channel" if cfg.group_size <= 0 else f"g{cfg.group_size}"
        grid = f"w{cfg.bits} {g}" if get_format(cfg.format).configurable else f"format {cfg.format}"
        if cfg.preset:
            grid = f"preset {cfg.preset}"
        if cfg.is_weight_activation:
            grid += " " + DynamicSpec.from_config(cfg).label().lower()
        if cfg.rotate != "none":
            grid += f", rotate {cfg.rotate}" + ("" if cfg.online_rotate == "none" else f" (online {cfg.online_rotate})")
            if self.rotation and self.rotation.get("untied_head"):
                grid += ", head untied from the embedding (the final norm's weight folded into it)"
        return (f"quantized {self.layers} layers with {cfg.method} {grid} in {self.seconds:.1f} s, "
                f"peak memory {self.peak_memory / 2**30:.2f} GiB -> {self.output}")


def check_output_location(output: Path) -> None:
    """The output must be creatable: its parent writable, and the path not an unrelated existing file/folder."""
    check_writable(output)
    if output.exists() and (output.is_file() or (any(output.iterdir()) and not is_qdir(output))):
        raise UserError(f"{output} exists and is not a turboboa QDIR; choose another -o location or remove it")


def quantize(model: str, cfg: QuantConfig, output: str | os.PathLike, device: str = "auto",
             progress: bool = True, act_bits: int | None = None, resume: bool = False,
             act_scope: str = "inputs", stream: bool = True) -> QuantizeSummary:
    """Quantize ``model`` with ``cfg`` and write the QDIR ``output`` (atomically: nothing half-written).

    ``act_bits`` (8 or 16): also calibrate static activation encodings (:func:`calibrate`) on the same
    calibration batch, right after the weights, and store them in the same QDIR; ``act_scope`` "graph"
    calibrates every tensor of the fully quantized decoder instead (:func:`calibrate` with ``scope="graph"``).

    After every finished block the state needed to continue is committed to ``<output>.partial/``
    (:mod:`turboboa.resume`). ``resume``: continue from it when it is there (a run with another model,
    configuration, calibration or device is refused in one line); the QDIR is then bit-identical to an
    uninterrupted run's. Without ``resume`` an existing work folder is replaced. It is removed on success.

    Non-finite weights (at load), Hessians, block outputs or solved grids are a one-line
    :class:`~turboboa.numerics.NonFiniteError` naming the tensor or layer; nothing is written under ``output``.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each rank runs a share of the calibration shards and of each
    stage's layers (:mod:`turboboa.blockwise`, :mod:`turboboa.distributed`); only rank 0 writes the QDIR and the
    resume state, the others wait for it and fail with it. The QDIR is byte-identical to one process's.

    ``stream`` (the default): a model in safetensors files (a local folder, or a GGUF file's float cache) is
    read block by block (:mod:`turboboa.models.stream`), so host memory holds one block, the calibration
    streams and one block's statistics, not the model (docs/checkpoint-and-reliability.md, "Streaming the
    float model"). ``--pad-to`` and input activation encodings (``act_bits`` with ``act_scope`` "inputs")
    load the whole model, as does ``stream=False``.
    """
    t0 = time.time()
    check_act_bits(act_bits)
    if act_scope not in ("inputs", "graph"):
        raise UserError(f"unknown activation scope {act_scope!r}; choose inputs or graph")
    if act_bits is not None and cfg.is_weight_activation:
        raise UserError("static activation encodings cannot be combined with per-token --act-bits/--kv-bits "
                        "quantization; choose one activation scheme")
    output = Path(output)
    check_output_location(output)
    dev = rank_device(select_device(device))
    world = World.join(dev)
    try:
        return _quantize(model, cfg, output, dev, world, progress and world.is_main, act_bits, resume, act_scope,
                         t0, stream)
    finally:
        world.close()


def _quantize(model: str, cfg: QuantConfig, output: Path, dev: torch.device, world: World, progress: bool,
              act_bits: int | None, resume: bool, act_scope: str, t0: float, stream: bool) -> QuantizeSummary:
    """:func:`quantize` once the device and the ranks are known."""
    # the whole model in memory only where a step needs all of it at once: padding widens every block,
    # input encodings calibrate the whole fake-quant model
    whole = not stream or bool(cfg.pad_to) or (act_bits is not None and act_scope == "inputs")
    loaded = None if whole else load_streamed(model, get_adapter)
    loaded = loaded or load_float_model(model)
    streamed: StreamedModel | None = loaded.streamed
    check_model_finite(loaded.model, f"the float model {model}")  # a streamed model: its tables; blocks when read
    adapter = get_adapter(loaded.model)  # an unsupported architecture is named before padding or rotation
    parameters = sum(p.numel() for p in loaded.model.parameters())  # a tied head once, before padding
    calib = calibration_batch(loaded.tokenizer, cfg.calib, cfg.nsamples, cfg.seqlen, cfg.seed)
    padding = pad(loaded.model, cfg, calib) if cfg.pad_to else None
    cfg = cfg.resolve_rotation(rotation_unties_head(loaded.model), rotatable=adapter.ROTATION_REFUSAL is None)
    rotation = rotate(loaded.model, cfg, streamed)
    block_layers = list(check_group_size(loaded.model, adapter, cfg))  # full names, in block order
    world.on_main(lambda: prepare_output(output, estimate_qdir_bytes(loaded.model), "the QDIR"))
    torch.manual_seed(cfg.seed)
    n_blocks = len(adapter.blocks(loaded.model))
    saver = BlockCheckpointer(output, fingerprint(loaded.model, calib, cfg, dev, streamed and
                                                  streamed.source.identity()), n_blocks)
    # a refused resume keeps the work folder (for the right command line); the other ranks read what rank 0 kept
    point = world.on_main(lambda: saver.start(resume))
    if world.broadcast(point is not None) and not world.is_main:
        point = saver.read()
    try:
        if point is not None and streamed is not None:
            for i in range(point.next_block):  # their norms and biases, as the finished run holds them
                streamed.load_block(i)
                streamed.release_block(i)
            point.layers = {}
        elif point is not None:
            apply_layers(loaded.model, point.layers)
        if point is not None:
            torch.set_rng_state(point.rng)
        result = quantize_model(loaded.model, calib, cfg, dev, progress=progress,
                                start_block=0 if point is None else point.next_block,
                                state=None if point is None else point.streams,
                                on_block_done=lambda i, done, state: world.on_main(
                                    lambda: saver.on_block_done(i, done, state)),
                                world=world, streamed=streamed)
        layers = {**(point.layers if point is not None else {}), **result.layers}
        meta: dict[str, Any] = {
            "source": loaded.source,
            "model": model,
            "parameters": parameters,
            "calibration": {"data": cfg.calib, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen, "seed": cfg.seed,
                            "tokens": int(calib.numel())},
            "device": str(dev),
            "ranks": world.size,
            "padding": padding,
            "rotation": rotation,
            "dynamic_activations": DynamicSpec.from_config(cfg).summary() if cfg.is_weight_activation else None,
            "timings": {"quantize_seconds": round(sum(saver.block_seconds) + result.seconds
                                                  - sum(result.block_seconds), 3),
                        "block_seconds": [round(s, 3) for s in saver.block_seconds],
                        "phase_seconds": {k: round(v, 3) for k, v in result.phase_seconds.items()},
                        "peak_memory_bytes": result.peak_memory,
                        "resumed_from_block": None if point is None else point.next_block,
                        "streamed": streamed is not None},
        }

        def write() -> None:
            activations = None
            if act_bits is not None and act_scope == "inputs":
                names = [name for name in layers if name != adapter.LAYOUT.embedding]
                activations = calibrate_activations(loaded.model, calib, act_bits, names, dev, progress,
                                                    calibration=meta["calibration"])
            deferred = None
            if streamed is not None:
                tables = [m for m in (loaded.model.get_input_embeddings(), loaded.model.get_output_embeddings())
                          if m is not None]
                deferred = DeferredLayers(block_layers, saver.stored_bytes(), lambda: saver.blocks(n_blocks),
                                          lambda: [streamed.release_table(m) for m in tables])
            save_qdir(output, loaded.model, loaded.tokenizer, layers, cfg, meta, activations, deferred)

        world.on_main(write)
    except UserError:
        if world.is_main:
            saver.discard()  # bad input or non-finite values fail the same way again: nothing to resume
        raise
    if world.is_main:
        saver.discard()
    if act_bits is not None and act_scope != "inputs":
        world.on_main(lambda: save_activations(output, graph_encodings(
            load_qdir(output), calib, act_bits, act_scope, dev, progress, {**meta["calibration"]})))
    n_layers = len(layers) + (len(block_layers) if streamed is not None else 0)  # a streamed run's blocks on disk
    return QuantizeSummary(output, n_layers, time.time() - t0, result.peak_memory, loaded.source, cfg, rotation)


def rotate(model: Any, cfg: QuantConfig, streamed: StreamedModel | None = None) -> dict[str, Any] | None:
    """``--rotate``: fold the norms and fuse the rotations into ``model`` (in place, after any padding; a
    streamed model's blocks as they are read), and install the online rotation of the down projection's input
    the calibration must see; returns the QDIR's report (or None)."""

    if cfg.rotate == "none":  # (QuantConfig refuses an online down rotation without one)
        return None
    spec = DynamicSpec.from_config(cfg)
    if streamed is not None:
        report = rotate_streamed(streamed, cfg.rotate, cfg.rotate_seed, online_down=spec.online_down)
    else:
        report = rotate_model(model, cfg.rotate, cfg.rotate_seed, online_down=spec.online_down)
    if spec.online_down:
        install_online_down(model)
    report["online_qk"] = spec.online_qk
    return report


def pad(model: Any, cfg: QuantConfig, calib: torch.Tensor) -> dict[str, Any]:
    """``--pad-to``: widen ``model`` in place; with ``--pad-order activation`` the residual zero channels are
    placed by the float model's activation peaks on the calibration batch (:mod:`turboboa.models.padding`)."""
    index = None
    if cfg.pad_order == "activation":
        padded = -(-model.config.hidden_size // cfg.pad_to) * cfg.pad_to
        index = residual_placement(residual_peaks(model, calib), padded, cfg.pad_to)
    report = pad_model(model, cfg.pad_to, hidden_index=index)
    report["order"] = cfg.pad_order
    return report
