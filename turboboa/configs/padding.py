"""``PaddingConfig``: the function-preserving widening of every layer (:mod:`turboboa.models.padding`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .option import OptionGroup, option

PAD_ORDERS = ("natural", "activation")


@dataclass(frozen=True)
class PaddingConfig(OptionGroup):
    """Zero channels that widen every linear input to a multiple of ``pad_to`` (0: no padding)."""

    pad_to: int = option(0, "pad every layer width to a multiple of this (function-preserving), e.g. 256 for "
                         "k-quants")
    pad_order: str = option(
        "natural", "where the residual zero channels go: natural (at the end) or activation (they share a "
        "256-block with the largest activations, which llama.cpp's 8-bit activation blocks then round finer; "
        "it moves the weights' groups, see docs/formats-and-export.md)", choices=PAD_ORDERS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pad_to < 0 or (self.pad_to and self.pad_to % 32):
            raise UserError(f"--pad-to {self.pad_to} must be a positive multiple of 32 (256 for k-quants)")
        if self.pad_order not in PAD_ORDERS:
            raise UserError(f"unknown --pad-order '{self.pad_order}'; choose one of {', '.join(PAD_ORDERS)}")
