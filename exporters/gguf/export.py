"""A QDIR as a llama.cpp GGUF file: every quantized layer's codes and stored grid packed as its ggml type.

The solver already quantized each layer onto the grid its ggml type stores (``turboboa quantize --format``),
so this only packs: ``fmt.pack(codes, grid)`` gives the block bytes, and ``gguf.quants.dequantize`` of them
equals the QDIR's fake-quant weight exactly (:func:`check_gguf_weights`). Float tensors (embeddings, norms,
a separate head) are written as F32, so they too are what the fake-quant model holds.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from tqdm.auto import tqdm

from turboboa.checkpoint import QuantizedCheckpoint
from turboboa.errors import UserError
from turboboa.formats import get_format
from turboboa.models.loader import ALIASES, alias_gguf_path
from turboboa.quantized import QuantizedLinear

from .metadata import arch_spec, hyperparameters
from .tensors import GgufTensor, permute_qk_rows
from .writer import gguf_tensor_name, write_gguf

COMPARE_ELEMENTS = 1 << 24  # weights compared at a time by check_gguf_weights


def source_gguf_of(ckpt: QuantizedCheckpoint) -> Path | None:
    """The GGUF file the checkpoint's model came from, when it is one and still present (its tokenizer
    metadata is then copied as is)."""
    spec = str(ckpt.meta.get("model", ""))
    try:
        if spec in ALIASES:
            return alias_gguf_path(spec)
    except UserError:
        return None
    path = Path(spec)
    return path if path.suffix == ".gguf" and path.is_file() else None


def check_gguf_config(cfg: Any) -> None:
    """A one-line UserError when the checkpoint computes more than a plain Llama: online rotations (a
    Hadamard transform inside the block, which llama.cpp does not compute) or per-token activation/KV
    quantization (llama.cpp quantizes activations its own way, so the file would not compute what the
    fake-quant model does). Rotations fused into the weights export as they are."""
    if getattr(cfg, "online_rotate", "none") != "none":
        raise UserError(f"this checkpoint needs online rotations ({cfg.online_rotate}) that llama.cpp does not "
                        f"compute; export it with --to onnx, or quantize with --online-rotate none for GGUF")
    if getattr(cfg, "dyn_act_bits", 16) < 16 or getattr(cfg, "kv_bits", 16) < 16:
        raise UserError(f"this checkpoint simulates per-token A{cfg.dyn_act_bits}/KV{cfg.kv_bits} quantization, "
                        f"which llama.cpp does not (it quantizes activations its own way); export it with --to "
                        f"onnx, or quantize without --act-bits/--kv-bits for GGUF")


def gguf_tensors(ckpt: QuantizedCheckpoint, progress: bool = False) -> dict[str, GgufTensor]:
    """Every tensor of the checkpoint for the GGUF writer: packed ggml rows or F32 values, by HF name
    (``progress``: a bar with ETA over the layers being packed, on stderr). A layer whose format has no ggml
    type is refused in one line, the format's own (``Format.gguf_refusal``)."""
    check_gguf_config(ckpt.config)
    tensors = {name: GgufTensor.from_float(t) for name, t in ckpt.float_tensors.items()}
    for name, q in ckpt.layers.items():
        fmt = get_format(q.fmt)
        if fmt.ggml_type is None:
            raise UserError(fmt.gguf_refusal(str(ckpt.path), name))
    for name, q in tqdm(ckpt.layers.items(), desc="pack gguf", unit="layer", total=len(ckpt.layers),
                        file=sys.stderr, disable=not progress):
        fmt = get_format(q.fmt)
        assert q.grid is not None
        tensors[f"{name}.weight"] = GgufTensor.from_packed(fmt.ggml_type, fmt.pack(q.codes, q.grid), q.shape)
    return tensors


def _extra_kv(ckpt: QuantizedCheckpoint) -> dict[str, Any]:
    """The quantization settings as ``turboboa.*`` keys."""
    cfg = ckpt.config
    calib = ckpt.meta.get("calibration", {})
    formats = sorted({q.fmt for q in ckpt.layers.values()})
    return {
        "method": cfg.method, "format": cfg.format, "layer_formats": ",".join(formats),
        "calib": str(calib.get("data", cfg.calib)), "nsamples": int(calib.get("nsamples", cfg.nsamples)),
        "seqlen": int(calib.get("seqlen", cfg.seqlen)), "seed": int(cfg.seed),
        "rotate": str(getattr(cfg, "rotate", "none")),
        "version": str(ckpt.meta.get("versions", {}).get("turboboa", "")),
    }


def export_gguf(ckpt: QuantizedCheckpoint, output: Path, progress: bool = False, **options: Any) -> Path:
    """Write ``ckpt`` as the GGUF file ``output`` (atomically) and return its path; ``progress``: bars with ETA
    for packing and writing on stderr."""
    if options:
        raise UserError(f"the gguf exporter takes no options {sorted(options)}")
    return _write(ckpt, output, gguf_tensors, progress)


def export_fakequant_f32(ckpt: QuantizedCheckpoint, output: Path, progress: bool = False) -> Path:
    """Write ``ckpt``'s fake-quant model as an F32 GGUF file ``output``: every quantized weight stored as its
    float values ``W_hat`` instead of its packed codes, the same architecture and metadata otherwise. llama.cpp
    then computes the fake-quant model with float matrix products, which isolates its graph from the arithmetic
    of its quantized kernels (``turboboa check --gguf-graph``)."""
    return _write(ckpt, output, fakequant_f32_tensors, progress)


def fakequant_f32_tensors(ckpt: QuantizedCheckpoint, progress: bool = False) -> dict[str, GgufTensor]:
    """Every tensor of the checkpoint as F32 values, a quantized layer's weight dequantized."""
    check_gguf_config(ckpt.config)
    tensors = {name: GgufTensor.from_float(t) for name, t in ckpt.float_tensors.items()}
    for name, q in tqdm(ckpt.layers.items(), desc="dequantize", unit="layer", total=len(ckpt.layers),
                        file=sys.stderr, disable=not progress):
        tensors[f"{name}.weight"] = GgufTensor.from_float(q.dequantize())
    return tensors


def _write(ckpt: QuantizedCheckpoint, output: Path,
           make_tensors: Callable[[QuantizedCheckpoint, bool], dict[str, GgufTensor]], progress: bool) -> Path:
    """Write the tensors ``make_tensors`` gives for ``ckpt`` with its architecture, tokenizer and settings."""
    from transformers import AutoConfig, AutoTokenizer

    assert ckpt.path is not None
    hf_config = AutoConfig.from_pretrained(ckpt.path)
    arch_spec(hf_config)  # a family without a llama.cpp architecture is refused before any packing
    tensors = make_tensors(ckpt, progress)
    extra = _extra_kv(ckpt)
    extra["bits_per_weight"] = round(bits_per_weight(tensors), 4)
    source = source_gguf_of(ckpt)
    tokenizer = None if source is not None else AutoTokenizer.from_pretrained(ckpt.path)
    return write_gguf(output, hf_config, tokenizer, tensors, source_gguf=source, extra_kv=extra, progress=progress)


def bits_per_weight(tensors: dict[str, GgufTensor]) -> float:
    """Bits per weight of the tensor data: 8 x stored bytes / weights (what llama-quantize reports as BPW)."""
    stored = sum(t.payload().nbytes for t in tensors.values())
    return 8 * stored / max(1, sum(t.n_elements for t in tensors.values()))


def check_gguf_weights(path: str | Path, ckpt: QuantizedCheckpoint) -> dict[str, float]:
    """For every quantized layer: max |gguf.quants.dequantize(file bytes) - fake-quant weight| (after undoing
    llama's q/k row permutation). All zeros mean the file holds exactly the checkpoint's weights."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(ckpt.path)
    spec, hp = arch_spec(hf_config), hyperparameters(hf_config)
    by_name = {t.name: t for t in GGUFReader(path).tensors}
    out = {}
    for name, q in ckpt.layers.items():
        found = gguf_tensor_name(spec, f"{name}.weight")
        t = by_name[found[1] if found is not None else name]
        role = spec.layout.locate(name)[1]
        heads = None
        if spec.permute_qk and role in ("q", "k"):
            heads = hp.n_head if role == "q" else hp.n_head_kv
        out[name] = _max_abs_diff(np.asarray(t.data), t.tensor_type, q, heads)
    return out


def _max_abs_diff(data: np.ndarray, tensor_type: Any, q: QuantizedLinear, heads: int | None) -> float:
    """max |dequantized file rows - fake-quant rows| of one tensor (NaN when either holds one), compared
    :data:`COMPARE_ELEMENTS` weights at a time so a big table's temporaries stay small; ``heads``: the rows
    are llama's q/k permutation over that many heads, undone on the whole tensor first."""
    rows, cols = q.shape
    if heads is not None:
        w = _unpermute(gguf_dequantize(data, tensor_type).reshape(rows, cols), heads)
        return float(np.abs(w - q.dequantize().numpy()).max())
    data = data.reshape(rows, -1)
    step = max(1, COMPARE_ELEMENTS // cols)
    worst = []
    for r0 in range(0, rows, step):
        w = gguf_dequantize(data[r0 : r0 + step], tensor_type).reshape(-1, cols)
        worst.append(np.abs(w - q.row_slice(r0, r0 + step).dequantize().numpy()).max())
    return float(np.max(worst))  # np.max keeps a NaN


def _unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk_rows`."""
    n = rows.shape[0]
    perm = permute_qk_rows(np.arange(n), n_head)
    out = np.empty_like(rows)
    out[perm] = rows
    return out

