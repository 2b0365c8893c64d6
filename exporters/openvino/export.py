"""``turboboa export --to openvino``: the QDQ ONNX decoder converted to an OpenVINO IR (``.xml`` + ``.bin``).

The ONNX model is built in memory exactly as ``--to onnx`` builds it (:func:`exporters.onnx.export.build_model`,
the ``openvino`` profile by default: int4/int8 weights per channel or in blocks), written to a temporary
folder beside the output, converted with ``openvino.convert_model`` and saved with ``compress_to_fp16=False``
(float tensors stay float32; the quantized weights stay the integer Constants of OpenVINO's decompression
subgraph, :mod:`.check`). The ONNX metadata is stored in the IR's ``rt_info`` (:mod:`.metadata`), and the
IR is read back and checked before ``<name>.bin`` and ``<name>.xml`` are renamed into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from onnx import ModelProto

from exporters.onnx.export import build_model, staging_folder, write_model
from turboboa.checkpoint import QuantizedCheckpoint
from turboboa.errors import UserError

from .check import compressed_weight_types
from .metadata import write_rt_info
from .package import import_openvino

# rt_info key (under ``turboboa``): how many quantized weights the IR holds in each integer element type
WEIGHT_TYPES_KEY = "turboboa.ir_weight_types"
# a node name OpenVINO generates: its type and a process-wide counter
GENERATED_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*_[0-9]+")


def weights_path(output: Path) -> Path:
    """The ``.bin`` file of the IR ``output`` (same name, beside it: where OpenVINO looks for it)."""
    return output.with_suffix(".bin")


def _stage(progress: bool, text: str) -> None:
    """Print the export stage ``text`` on stderr when ``progress`` (OpenVINO's conversion has no progress bar)."""
    if progress:
        print(f"openvino export: {text}", file=sys.stderr, flush=True)


def weight_type_counts(types: dict[str, str]) -> str:
    """JSON ``{"i4": 14}``: quantized layers per element type of their weight Constant."""
    return json.dumps(dict(sorted(Counter(types.values()).items())), sort_keys=True)


def convert(onnx_model: ModelProto, tmp_dir: Path, stem: str) -> Any:
    """The ``ov.Model`` of ``onnx_model``, converted from a file written (and checked) under ``tmp_dir``,
    with the turboboa metadata in its ``rt_info``; a weight OpenVINO did not keep compressed is a UserError."""
    ov = import_openvino()
    path = write_model(onnx_model, tmp_dir / f"{stem}.onnx")
    try:
        model = ov.convert_model(str(path))
    except Exception as e:  # noqa: BLE001 - the frontend raises its own exception types
        detail = " ".join(str(e).split())[:300]
        raise UserError(f"OpenVINO cannot convert the ONNX model ({detail}); export with --to onnx instead") from None
    props = {p.key: p.value for p in onnx_model.metadata_props}
    props[WEIGHT_TYPES_KEY] = weight_type_counts(compressed_weight_types(model, onnx_model))
    write_rt_info(model, props)
    renumber_generated_names(model)
    return model


def renumber_generated_names(model: Any) -> None:
    """Give the nodes OpenVINO named itself (``Constant_6218``: a counter global to the process) names from
    their position in the graph instead, so the same checkpoint and options give a byte-identical ``.xml``."""
    for index, op in enumerate(model.get_ordered_ops()):
        if GENERATED_NAME.fullmatch(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_{index}")


def write_ir(onnx_model: ModelProto, output: Path, progress: bool = False) -> Path:
    """Convert ``onnx_model`` and write the IR ``output`` (``.xml``) and its ``.bin`` through a temporary
    folder beside them: save, read back and check the weights, then rename (``.bin`` first). Nothing is left
    half-written under the final names."""
    ov = import_openvino()
    if output.is_dir():
        raise UserError(f"{output} is a folder; pass a file name ending in .xml")
    tmp_dir = staging_folder(output)
    try:
        _stage(progress, "converting the ONNX graph with OpenVINO")
        model = convert(onnx_model, tmp_dir, output.stem)
        tmp_xml = tmp_dir / output.name
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        del model
        _stage(progress, "reading the IR back to check its weights")
        compressed_weight_types(ov.Core().read_model(str(tmp_xml)), onnx_model)
        for f in (tmp_xml, weights_path(tmp_xml)):
            os.chmod(f, 0o644)
        os.replace(weights_path(tmp_xml), weights_path(output))
        os.replace(tmp_xml, output)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return output


def export_openvino(ckpt: QuantizedCheckpoint, output: Path, profile: str = "openvino", seqlen: int | None = None,
                    act_bits: int | None = None, progress: bool = False, **options: Any) -> Path:
    """Write ``ckpt`` as the OpenVINO IR ``output`` (``.xml``, weights in the ``.bin`` beside it) and return
    its path.

    ``profile``, ``seqlen`` and ``act_bits`` are the ONNX exporter's (:func:`exporters.onnx.export_onnx`):
    ``openvino`` by default, ``npu`` (symmetric int4/int8 weights, static ``seqlen``, 512 tokens unless
    given), or ``generic`` for asymmetric grids and a dynamic length. Quantized weights stay integer Constants (i4/u4/i8/u8); the
    tokenizer folder (relative to the IR) and the other ``turboboa.*`` keys are in ``rt_info[turboboa]``.
    """
    if options:
        raise UserError(f"the openvino exporter takes no options {sorted(options)}; it takes profile, seqlen, "
                        f"act_bits")
    import_openvino()
    output = Path(output)
    if output.suffix != ".xml":
        raise UserError(f"the OpenVINO IR file name {output.name} must end in .xml (its weights go beside it in "
                        f"{output.stem}.bin)")
    _stage(progress, "building the ONNX graph")
    model = build_model(ckpt, None, profile, seqlen, None, act_bits, output.parent)
    return write_ir(model, output, progress)
