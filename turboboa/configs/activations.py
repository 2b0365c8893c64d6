"""``ActivationConfig``: per-token dynamic quantization of the block layers' inputs and of the KV cache
(``WxAyKVz``, :mod:`turboboa.activations.dynamic`), and how the command line's ``--act-bits`` reads.

``--act-bits`` names two schemes: per-token dynamic activations (this group's ``dyn_act_bits``) or static
per-tensor encodings calibrated into the QDIR (the command's own, :func:`turboboa.quantization.quantize`'s
``act_bits``); ``--act-scope`` chooses (:func:`activation_scope`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..activations.dynamic import check_dynamic_bits
from .option import OptionGroup, option

ACT_SCOPES = ("auto", "inputs", "graph", "token")  # --act-scope
FLOAT_BITS = 16  # a width of 16 bits: no quantizer, the tensor stays float


def activation_scope(act_bits: int | None, scope: str, kv_bits: int | None) -> str:
    """How ``--act-bits`` reads under ``--act-scope scope``: "token" (per-token dynamic) or "inputs"/"graph"
    (static encodings of the layer inputs / of every tensor of the decoder graph); "auto" is "token" for 4 or
    6 bits or when ``--kv-bits`` is given, else "inputs"."""
    if scope == "auto":
        return "token" if act_bits in (4, 6) or kv_bits is not None else "inputs"
    return scope


def per_token_act_bits(given: Mapping[str, Any]) -> int:
    """``dyn_act_bits`` from the command line: ``--act-bits`` where it is per token (:func:`activation_scope`),
    else float."""
    scope = activation_scope(given["act_bits"], given["act_scope"], given["kv_bits"])
    return (given["act_bits"] or FLOAT_BITS) if scope == "token" else FLOAT_BITS


def kv_cache_bits(given: Mapping[str, Any]) -> int:
    """``kv_bits`` from the command line: ``--kv-bits``, float when not given."""
    return given["kv_bits"] or FLOAT_BITS


@dataclass(frozen=True)
class ActivationConfig(OptionGroup):
    """Per-token dynamic min-max quantization of every block linear layer's input (``dyn_act_bits``) and of
    the keys and values per token and head (``kv_bits``); 16 bits keeps them float."""

    dyn_act_bits: int = option(
        FLOAT_BITS, "activation quantization: 4 or 6 (or 8 with --act-scope token): per-token dynamic min-max "
        "of every block layer's input (the papers' WxAy); 8 or 16 otherwise: static per-tensor uint8/uint16 "
        "calibrated on the calibration set (the NPU profiles')", flag="--act-bits", read=per_token_act_bits)
    dyn_act_sym: bool = option(True, "per-token activations asymmetric (default symmetric)", flag="--act-asym")
    kv_bits: int = option(FLOAT_BITS, "4, 8 or 16: keys and values quantized per token and head, dynamic "
                          "min-max (asymmetric)", read=kv_cache_bits)
    kv_sym: bool = option(False, "symmetric key/value quantization (default asymmetric)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_dynamic_bits(self.dyn_act_bits, self.kv_bits)

    @property
    def is_weight_activation(self) -> bool:
        """Per-token activation or KV quantization is on (``WxAyKVz``)."""
        return self.dyn_act_bits < FLOAT_BITS or self.kv_bits < FLOAT_BITS
