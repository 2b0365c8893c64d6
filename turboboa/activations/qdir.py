"""``turboboa calibrate``: static activation encodings of a QDIR's fake-quant model, added to the QDIR."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..arch import get_adapter
from ..blockwise import select_device
from ..checkpoint import (
    is_qdir,
    load_fakequant_model,
    load_qdir,
    save_activations,
)
from ..data import calibration_batch
from ..errors import UserError
from . import ActivationEncodings, calibrate_activations, check_act_bits
from .simulate import calibrate_graph


def calibrate(qdir: str | os.PathLike, act_bits: int, calib: str | None = None, nsamples: int | None = None,
              seqlen: int | None = None, seed: int | None = None, device: str = "auto",
              progress: bool = True, scope: str = "inputs") -> ActivationEncodings:
    """Calibrate static per-tensor activation encodings (uint8/uint16, min-max) for every quantized layer of
    the QDIR ``qdir`` on its fake-quant model, and add them to it (replacing earlier ones) atomically.

    The calibration set defaults to the QDIR's own (data, nsamples, seqlen, seed); each argument overrides
    one of them. Each layer's input is observed with every earlier layer's encoding already on
    (:mod:`turboboa.activations.calibrate`). ``scope="graph"``: encodings of every tensor of the fully
    quantized decoder (:mod:`turboboa.activations.simulate`), what ``--profile qnn-htp`` exports."""
    from transformers import AutoTokenizer

    check_act_bits(act_bits)
    if not is_qdir(qdir):
        raise UserError(f"{qdir} is not a turboboa QDIR (no quant_config.json); quantize a model first")
    ckpt = load_qdir(qdir)
    recorded = ckpt.meta.get("calibration", {})
    cfg = ckpt.config
    spec = {"data": calib or recorded.get("data", cfg.calib),
            "nsamples": int(nsamples or recorded.get("nsamples", cfg.nsamples)),
            "seqlen": int(seqlen or recorded.get("seqlen", cfg.seqlen)),
            "seed": int(recorded.get("seed", cfg.seed) if seed is None else seed)}
    dev = select_device(device)
    tokenizer = AutoTokenizer.from_pretrained(qdir)
    ids = calibration_batch(tokenizer, spec["data"], spec["nsamples"], spec["seqlen"], spec["seed"])
    calibration = {**spec, "tokens": int(ids.numel())}
    if scope != "inputs":
        encodings = graph_encodings(ckpt, ids, act_bits, scope, dev, progress, calibration)
        save_activations(qdir, encodings)
        return encodings
    model = load_fakequant_model(ckpt, activations=False)
    embedding = get_adapter(model).LAYOUT.embedding
    layers = [name for name in ckpt.layers if name != embedding]
    encodings = calibrate_activations(model, ids, act_bits, layers, dev, progress, calibration=calibration)
    save_activations(qdir, encodings)
    return encodings


def graph_encodings(ckpt: Any, ids: torch.Tensor, act_bits: int, scope: str, device: torch.device,
                    progress: bool, calibration: dict[str, Any]) -> ActivationEncodings:
    """``--scope graph`` encodings of ``ckpt`` on ``ids``; another scope is a one-line UserError."""
    if scope != "graph":
        raise UserError(f"unknown activation scope {scope!r}; choose inputs or graph")
    return calibrate_graph(ckpt, ids, act_bits, device, progress, calibration)
