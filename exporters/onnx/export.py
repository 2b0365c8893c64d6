"""A QDIR as a QDQ ONNX decoder: integer weights feeding DequantizeLinear, float activations, logits out.

:func:`export_onnx` builds the graph (:mod:`.graph`) under an export profile (:mod:`.profiles`), records the
quantization in ``metadata_props`` (:mod:`.metadata`), runs ``onnx.checker.check_model(full_check=True)`` on
the written file and renames it into place; a model whose tensors exceed :data:`EXTERNAL_DATA_THRESHOLD`
bytes keeps them in ``<name>.data`` beside it. :func:`check_onnx_weights` (:mod:`.check`) confirms in
onnxruntime that every DequantizeLinear output equals the QDIR's fake-quant weight exactly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import onnx
from onnx import ModelProto, helper

from turboboa.activations import check_act_bits
from turboboa.activations.dynamic import DynamicSpec
from turboboa.activations.points import GRAPH_SCHEME
from turboboa.arch import decoder_spec
from turboboa.checkpoint import QuantizedCheckpoint
from turboboa.errors import UserError
from turboboa.formats import get_format

from .check import check_onnx_weights
from .dynamic import check_expressible
from .graph import build_decoder
from .metadata import has_tokenizer, metadata_props, package_version
from .profiles import PROFILES, make_profile
from .qnn import build_quantized_decoder

__all__ = ["EXTERNAL_DATA_THRESHOLD", "check_onnx_weights", "export_onnx", "external_data_path"]

# protobuf cannot serialize a message of 2 GiB or more; leave room for the graph itself
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def external_data_path(output: Path) -> Path:
    """Where the tensors of a model written with external data are: ``<output name>.data`` beside it."""
    return output.with_name(output.name + ".data")


def tensor_bytes(model: ModelProto) -> int:
    """Bytes of all initializers' payloads (what decides whether the proto fits 2 GiB)."""
    return sum(len(t.raw_data) for t in model.graph.initializer)


def staging_folder(output: Path) -> Path:
    """A new temporary folder beside ``output`` to write its files in before renaming them into place; an
    unwritable location is a one-line UserError."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    except OSError as e:
        raise UserError(f"cannot write {output} ({e.strerror}); choose another -o location") from None


def write_model(model: ModelProto, output: Path) -> Path:
    """Write ``model`` to ``output`` through a temporary folder beside it: save (external data when large),
    run the full checker on the file, then rename into place. Nothing is left half-written."""
    if output.is_dir():
        raise UserError(f"{output} is a folder; pass a file name ending in .onnx")
    external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data = external_data_path(output)
    tmp_dir = staging_folder(output)
    try:
        tmp = tmp_dir / output.name
        if external:
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(model, tmp)
        onnx.checker.check_model(str(tmp), full_check=True)
        for f in tmp_dir.iterdir():
            os.chmod(f, 0o644)
        if external:
            os.replace(tmp_dir / data.name, data)
        os.replace(tmp, output)
        if not external and data.exists():
            data.unlink()  # left by an earlier export to the same name
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return output


def activation_bits(ckpt: QuantizedCheckpoint, act_bits: int | None, profile: str = "generic") -> int | None:
    """The static activation bits of the export: the QDIR's encodings' (``act_bits``, when given, must match
    them), None for a QDIR without encodings; a mismatch or a missing calibration is a one-line UserError.

    A profile that quantizes the whole graph (``qnn-htp``) needs ``static-graph`` encodings (``turboboa
    calibrate --scope graph``); the other profiles need encodings of the linear layers' inputs, and export a
    QDIR calibrated for the whole graph with float activations."""
    encodings = ckpt.activations
    whole = PROFILES[profile].quantized_graph if profile in PROFILES else False
    graph = encodings is not None and encodings.scheme == GRAPH_SCHEME
    if whole and not graph:
        bits = act_bits or 16
        raise UserError(f"--profile {profile} quantizes every activation, but {ckpt.path} has "
                        f"{'no activation encodings' if encodings is None else 'encodings of linear inputs only'}; "
                        f"run turboboa calibrate {ckpt.path} --act-bits {bits} --scope graph first")
    if graph and not whole:
        if act_bits is not None:
            raise UserError(f"{ckpt.path} is calibrated for a fully quantized graph (--scope graph); export it "
                            f"with --profile qnn-htp, or calibrate again with --scope inputs")
        return None
    if act_bits is None:
        return None if encodings is None else encodings.bits
    if encodings is None:
        raise UserError(f"--act-bits {act_bits}: {ckpt.path} has no activation encodings; run `turboboa "
                        f"calibrate {ckpt.path} --act-bits {act_bits}` first")
    if encodings.bits != act_bits:
        raise UserError(f"--act-bits {act_bits} does not match the {encodings.bits}-bit activation encodings "
                        f"of {ckpt.path}; export with --act-bits {encodings.bits} or run `turboboa calibrate "
                        f"{ckpt.path} --act-bits {act_bits}`")
    return act_bits


def check_dynamic(ckpt: QuantizedCheckpoint, rules: Any) -> None:
    """Per-token activation/KV quantization and online rotations export under the generic and npu profiles
    in 4 or 8 bits; anything else is one line naming what is unsupported."""
    spec = DynamicSpec.from_config(ckpt.config)
    if not spec.active:
        return
    if rules.quantized_graph or rules.name == "openvino":
        raise UserError(f"--profile {rules.name} has static activation encodings only; {ckpt.path} quantizes "
                        f"activations per token (A{spec.act_bits}KV{spec.kv_bits}) with online rotations "
                        f"{ckpt.config.online_rotate}: export it with --profile generic or npu")
    check_expressible(spec.act_bits, spec.kv_bits)


def build_model(ckpt: QuantizedCheckpoint, opset: int | None = None, profile: str = "generic",
                seqlen: int | None = None, tokenizer: str | os.PathLike[str] | None = None,
                act_bits: int | None = None, base: Path | None = None) -> ModelProto:
    """The ONNX model of ``ckpt`` (see :func:`export_onnx`), in memory; ``base``: the folder it will be
    written to (its recorded paths are relative to it)."""
    from transformers import AutoConfig

    if ckpt.path is None:
        raise UserError("the checkpoint has no folder; load it with load_qdir")
    check_act_bits(act_bits)
    rules = make_profile(profile, opset, seqlen, activation_bits(ckpt, act_bits, profile))
    check_dynamic(ckpt, rules)
    hf_config = AutoConfig.from_pretrained(ckpt.path)
    spec = decoder_spec(hf_config)
    if rules.quantized_graph:
        graph, built = build_quantized_decoder(ckpt, spec, hf_config, rules)
    else:
        graph, built = build_decoder(ckpt, spec, hf_config, rules)
    tok = Path(tokenizer) if tokenizer is not None else Path(ckpt.path)
    if tokenizer is not None and not has_tokenizer(tok):
        raise UserError(f"--tokenizer {tok} holds no Hugging Face tokenizer files; pass a tokenizer folder or QDIR")
    opset_ids = [helper.make_opsetid("", rules.opset)]
    model = helper.make_model(graph, opset_imports=opset_ids, producer_name="turboboa",
                              producer_version=package_version(),
                              ir_version=helper.find_min_ir_version_for(opset_ids))
    grid = f"w{ckpt.config.bits}" if get_format(ckpt.config.format).configurable else ckpt.config.format
    model.doc_string = (f"turboboa {ckpt.config.method} {grid} decoder in QDQ form "
                        f"(profile {rules.name}, opset {rules.opset})")
    props = metadata_props(ckpt, spec, rules, built.encoded.values(), built.embedding_note,
                           tok if has_tokenizer(tok) else None, base)
    helper.set_model_props(model, props)
    return model


def export_onnx(ckpt: QuantizedCheckpoint, output: Path, opset: int | None = None, profile: str = "generic",
                seqlen: int | None = None, tokenizer: str | os.PathLike[str] | None = None,
                act_bits: int | None = None, **options: Any) -> Path:
    """Write ``ckpt`` as the QDQ ONNX file ``output`` and return its path.

    ``profile``: ``generic`` (default opset 21, up to 25; dynamic sequence length unless ``seqlen``) or
    ``npu`` (symmetric int4/int8 or LPBQ, per channel or blocks of 32/64/128, opset 21, static ``seqlen``,
    512 by default). ``tokenizer``: the folder recorded for ``turboboa eval`` (default: the QDIR). When the
    QDIR has static activation encodings, every quantized MatMul's input goes through their
    QuantizeLinear -> DequantizeLinear; ``act_bits`` (8 or 16) asserts their width. The same checkpoint and
    options give a byte-identical file.
    """
    if options:
        raise UserError(f"the onnx exporter takes no options {sorted(options)}; it takes opset, profile, "
                        f"seqlen, act_bits")
    output = Path(output)
    if output.suffix != ".onnx":
        raise UserError(f"the ONNX file name {output.name} must end in .onnx (turboboa eval recognizes it by that)")
    return write_model(build_model(ckpt, opset, profile, seqlen, tokenizer, act_bits, output.parent), output)


def qnn_context_path(path: Path) -> Path:
    """Where the EPContext model of the ONNX file ``path`` is written: ``<stem>_ctx.onnx`` beside it."""
    return path.with_name(f"{path.stem}_ctx.onnx")
