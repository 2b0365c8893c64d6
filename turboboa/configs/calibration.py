"""``CalibrationConfig``: the calibration data the statistics are collected on (:mod:`turboboa.data`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .option import OptionGroup, option


@dataclass(frozen=True)
class CalibrationConfig(OptionGroup):
    """``nsamples`` windows of ``seqlen`` tokens drawn from ``calib`` with ``seed``, and in which order a
    block's layers see them."""

    calib: str = option("wikitext2", "calibration data: name or .txt/.jsonl path")
    nsamples: int = option(128, "calibration windows")
    seqlen: int = option(2048, "tokens per calibration window")
    seed: int = option(0, "seed of the calibration windows' draw and of the run")
    true_sequential: bool = option(
        False, "calibrate each group of layers on the outputs of the already quantized groups before it")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nsamples < 1 or self.seqlen < 2:
            raise UserError("--nsamples must be >= 1 and --seqlen >= 2")
