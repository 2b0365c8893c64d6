"""The turboboa metadata of an OpenVINO IR: the ONNX export's ``turboboa.*`` keys stored in the model's
``rt_info`` under ``turboboa`` (``<rt_info><turboboa><tokenizer value=.../>``), read back with the same
``turboboa.*`` keys the ONNX file has (so :data:`runtime_check.onnxrt.TOKENIZER_KEY` works for both)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

RT_INFO_ROOT = "turboboa"
PREFIX = RT_INFO_ROOT + "."
# where OpenVINO's ONNX frontend itself copies an ONNX model's metadata_props (a fallback when reading an IR
# that someone converted from our ONNX file with ovc)
FRAMEWORK_SECTION = "framework"


def write_rt_info(model: Any, props: Mapping[str, str]) -> None:
    """Store every ``turboboa.<key>`` of ``props`` as ``rt_info[turboboa][<key>]`` of the ``ov.Model``."""
    for key, value in props.items():
        if key.startswith(PREFIX):
            model.set_rt_info(str(value), [RT_INFO_ROOT, key[len(PREFIX):]])


def read_rt_info(model: Any) -> dict[str, str]:
    """The ``turboboa.*`` metadata of an ``ov.Model``: ``rt_info[turboboa]`` (written by the exporter), else
    the ONNX frontend's copy of the ONNX ``metadata_props`` (``rt_info[framework]``); empty when neither."""
    info = model.get_rt_info()
    keys = set(info.keys())
    if RT_INFO_ROOT in keys:
        return {PREFIX + k: v.astype(str) for k, v in info[RT_INFO_ROOT].items()}
    if FRAMEWORK_SECTION in keys:
        section = info[FRAMEWORK_SECTION]
        if isinstance(section, dict):
            return {k: v.astype(str) for k, v in section.items() if k.startswith(PREFIX)}
    return {}
