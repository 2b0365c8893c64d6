"""The README's supported-families table says what the adapters do: one row per registered ``model_type``,
all four methods, ``--rotate`` yes exactly when the adapter has no rotation refusal, the GGUF column naming
the llama.cpp architecture (or "no"), the ONNX column "yes" exactly when the adapter gives the ONNX graph a
decoder for the family's default config, and ``npu`` named only then."""

from __future__ import annotations

import re

from transformers import AutoConfig

from turboboa.arch import supported_model_types
from turboboa.arch.base import GgufArch, adapter_class
from turboboa.errors import UserError

from .conftest import ROOT


def table_rows() -> dict[str, list[str]]:
    """``model_type`` -> the row's cells after the first, from the README's families table."""
    text = (ROOT / "README.md").read_text()
    start = text.index("| HF `model_type` (family) |")
    rows = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[re.match(r"`([^`]+)`", cells[0]).group(1)] = cells[1:]
    return rows


def test_the_families_table_matches_the_adapters() -> None:
    rows = table_rows()
    assert sorted(rows) == supported_model_types()
    for model_type, (methods, rotate, gguf, onnx) in rows.items():
        cls = adapter_class(model_type, None)
        assert methods == "rtn, gptq, boa, turboboa", model_type
        assert rotate.startswith("yes") == (cls.ROTATION_REFUSAL is None), model_type
        if isinstance(cls.GGUF, GgufArch):
            assert gguf.startswith("yes") and f"`{cls.GGUF.name}`" in gguf, model_type
        else:
            assert gguf.startswith("no"), model_type
        try:
            cls().decoder_spec(AutoConfig.for_model(model_type))
            exportable = True
        except UserError:
            exportable = False
        assert onnx.startswith("yes") == exportable, model_type
