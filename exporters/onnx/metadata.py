"""``metadata_props`` of the exported model: how it was quantized, how the weights are stored, and where its
tokenizer is, as ``turboboa.*`` string keys in a fixed order (no timestamps, so exports are reproducible)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from turboboa.checkpoint import QuantizedCheckpoint

from .arch import DecoderSpec
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


def weight_pattern(encoded: Iterable[EncodedWeight]) -> str:
    """How the quantized weights reach their MatMuls (the LPBQ pattern too when some layer uses it)."""
    text = "integer [K,N] -> DequantizeLinear (axis 0 blocked, or axis 1 per channel) -> MatMul"
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


def metadata_props(ckpt: QuantizedCheckpoint, spec: DecoderSpec, profile: ExportProfile,
                   encoded: Iterable[EncodedWeight], embedding: str, tokenizer: Path | None) -> dict[str, str]:
    """Every ``turboboa.*`` key of the model (values are strings; JSON for structured ones)."""
    cfg = ckpt.config
    calib = ckpt.meta.get("calibration", {})
    calibration = {"data": str(calib.get("data", cfg.calib)), "nsamples": int(calib.get("nsamples", cfg.nsamples)),
                   "seqlen": int(calib.get("seqlen", cfg.seqlen)), "seed": int(calib.get("seed", cfg.seed))}
    props = {
        "method": cfg.method,
        "bits": str(cfg.bits),
        "group_size": str(cfg.group_size) if cfg.group_size > 0 else "per-channel",
        "sym": str(bool(cfg.sym)).lower(),
        "format": cfg.format,
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
        "model_type": spec.model_type,
        "version": package_version(),
        "source_qdir": str(Path(ckpt.path).resolve()) if ckpt.path is not None else "",
        "tokenizer": str(tokenizer.resolve()) if tokenizer is not None else "",
    }
    return {PREFIX + k: v for k, v in props.items()}
