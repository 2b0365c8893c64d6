"""``metadata_props`` of the exported model: how it was quantized, how the weights are stored, and where its
tokenizer is, as ``turboboa.*`` string keys in a fixed order (no timestamps, so exports are reproducible)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from turboboa.arch.decoder import DecoderSpec
from turboboa.checkpoint import QuantizedCheckpoint
from turboboa.formats import get_format

from .containers import LEVEL_FORMATS
from .profiles import ExportProfile
from .weights import EncodedWeight

PREFIX = "turboboa."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def package_version() -> str:
    """The installed turboboa version ("unknown" when it is not installed as a package)."""
    import importlib.metadata as md

    try:
        return md.version("turboboa")
    except md.PackageNotFoundError:
        return "unknown"


def has_tokenizer(folder: Path) -> bool:
    """True when ``folder`` holds Hugging Face tokenizer files."""
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def containers_by_bits(encoded: Iterable[EncodedWeight]) -> dict[str, str]:
    """``{"4": "uint4+zp", "2": "int4"}``: the container(s) each bit width is stored in."""
    found: dict[int, set[str]] = {}
    for e in encoded:
        found.setdefault(e.bits, set()).add(e.container)
    return {str(bits): ",".join(sorted(labels)) for bits, labels in sorted(found.items())}


def layer_formats(encoded: Iterable[EncodedWeight]) -> dict[str, int]:
    """``{"q4_0": 12, "q8_0": 2}``: how many quantized MatMul weights each storage format holds."""
    counts: dict[str, int] = {}
    for e in encoded:
        counts[e.fmt] = counts.get(e.fmt, 0) + 1
    return dict(sorted(counts.items()))


def grid_summary(ckpt: QuantizedCheckpoint) -> tuple[str, str, str]:
    """``(bits, group size, sym)`` of the run's format (``Format.grid_params``): the uniform grid's
    (``--bits``, ``--group-size``, ``--sym``), or the storage format's own when one was asked for (``--format
    q4_0``: 4, 32, true; ``q6_k``: 6, 16, true)."""
    cfg = ckpt.config
    bits, group_size, sym = get_format(cfg.format).grid_params(cfg.bits, cfg.group_size, cfg.sym)
    group = str(group_size) if group_size > 0 else "per-channel"
    return str(bits), group, str(bool(sym)).lower()


def weight_pattern(encoded: Iterable[EncodedWeight]) -> str:
    """How the quantized weights reach their MatMuls (the LPBQ pattern too when some layer uses it)."""
    text = "integer [K,N] -> DequantizeLinear (axis 0 blocked, or axis 1 per channel) -> MatMul"
    levels = sorted({e.fmt for e in encoded if e.fmt in LEVEL_FORMATS})
    if levels:
        text += (f"; {', '.join(levels)}: the signed ggml level (q - l0) [K,N] -> DequantizeLinear (axis 0, "
                 f"block_size = the type's group, float32 scale d or fp32(d*sc), no zero point) -> MatMul")
    if any(e.container == "int4+lpbq" for e in encoded):
        text += ("; lpbq: uint8 k [K/B,N] -> DequantizeLinear(axis 1, float32 scale [N]) -> block scales -> "
                 "int4 [K,N] DequantizeLinear (axis 0, block_size B) -> MatMul")
    return text


def activations_summary(ckpt: QuantizedCheckpoint, profile: ExportProfile) -> str:
    """JSON of the static activation quantization in the graph, or "none" (float activations)."""
    if profile.act_bits is None or ckpt.activations is None:
        return "none"
    summary = ckpt.activations.summary()
    summary["pattern"] = "QuantizeLinear -> DequantizeLinear on the input of every quantized MatMul"
    return json.dumps(summary, sort_keys=True)


def _path(path: Path, base: Path | None) -> str:
    """``path`` relative to the folder ``base`` (POSIX separators), absolute without ``base``."""
    path = path.resolve()
    return Path(os.path.relpath(path, base.resolve())).as_posix() if base is not None else str(path)


def metadata_props(ckpt: QuantizedCheckpoint, spec: DecoderSpec, profile: ExportProfile,
                   encoded: Iterable[EncodedWeight], embedding: str, tokenizer: Path | None,
                   base: Path | None = None) -> dict[str, str]:
    """Every ``turboboa.*`` key of the model (values are strings; JSON for structured ones). Paths (the source
    QDIR, the tokenizer) are relative to ``base``, the folder the model is written to, so the file does not
    depend on where its folder lies and moves with its QDIR; absolute without ``base``."""
    cfg = ckpt.config
    calib = ckpt.meta.get("calibration", {})
    calibration = {"data": str(calib.get("data", cfg.calib)), "nsamples": int(calib.get("nsamples", cfg.nsamples)),
                   "seqlen": int(calib.get("seqlen", cfg.seqlen)), "seed": int(calib.get("seed", cfg.seed))}
    encoded = list(encoded)
    bits, group_size, sym = grid_summary(ckpt)
    props = {
        "method": cfg.method,
        "bits": bits,
        "group_size": group_size,
        "sym": sym,
        "format": cfg.format,
        "layer_formats": json.dumps(layer_formats(encoded), sort_keys=True),
        "calibration": json.dumps(calibration, sort_keys=True),
        "containers": json.dumps(containers_by_bits(encoded), sort_keys=True),
        "weight_pattern": weight_pattern(encoded),
        "embedding": embedding,
        "padding": json.dumps(ckpt.meta.get("padding"), sort_keys=True),
        "profile": profile.name,
        "opset": str(profile.opset),
        "seqlen": str(profile.seqlen) if profile.static else "dynamic",
        "max_positions": str(spec.max_positions),
        "act_bits": "none" if profile.act_bits is None else str(profile.act_bits),
        "activations": activations_summary(ckpt, profile),
        "dynamic_activations": json.dumps(ckpt.meta.get("dynamic_activations"), sort_keys=True),
        "rotation": json.dumps(ckpt.meta.get("rotation"), sort_keys=True),
        "model_type": spec.model_type,
        "version": package_version(),
        "source_qdir": _path(Path(ckpt.path), base) if ckpt.path is not None else "",
        "tokenizer": _path(tokenizer, base) if tokenizer is not None else "",
    }
    return {PREFIX + k: v for k, v in props.items()}
