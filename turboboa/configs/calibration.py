"""``CalibrationConfig``: the calibration data the statistics are collected on (:mod:`turboboa.data`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .option import OptionGroup, option

# precisions the calibration activations may be kept in between blocks
CALIB_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CalibrationConfig(OptionGroup):
    """``nsamples`` windows of ``seqlen`` tokens drawn from ``calib`` with ``seed``, in which order a block's
    layers see them, and the precision their activations are kept in between blocks."""

    calib: str = option("wikitext2", "calibration data: name or .txt/.jsonl path")
    nsamples: int = option(128, "calibration windows")
    seqlen: int = option(2048, "tokens per calibration window")
    seed: int = option(0, "seed of the calibration windows' draw and of the run")
    true_sequential: bool = option(
        False, "calibrate each group of layers on the outputs of the already quantized groups before it")
    calib_dtype: str = option(
        "float32", "precision the calibration activations (the quantized and the full-precision stream) are kept "
        "in between blocks: bfloat16 or float16 halve their memory, at an accuracy cost (each block still "
        "computes in float32)", choices=tuple(CALIB_DTYPES))

    @property
    def stream_dtype(self) -> torch.dtype:
        """The torch dtype of ``calib_dtype``."""
        return CALIB_DTYPES[self.calib_dtype]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nsamples < 1 or self.seqlen < 2:
            raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
        if self.calib_dtype not in CALIB_DTYPES:
            raise UserError(f"--calib-dtype {self.calib_dtype!r} is not one of {', '.join(CALIB_DTYPES)}")
