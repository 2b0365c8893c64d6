"""``write_gguf``: a llama.cpp-loadable GGUF file from an HF config, a tokenizer and HF-named tensors.

File layout: ``general.*`` keys, the model hyperparameters, file type and quantization version, the
``tokenizer.*`` keys, then ``turboboa.*`` keys; tensors are named by role (the family's adapter maps each HF
module name to its block and role, :data:`TENSOR_OF_ROLE` maps the role to llama.cpp's tensor name) and written
in a fixed order (model-level tensors, then layer by layer, alphabetically within each). For ``llama`` the q/k
rows (weights and biases, float or packed) are permuted to ggml's rope order. The file is written under a
temporary name in the target folder and renamed into place when complete. There are no timestamps, so equal
inputs give byte-identical files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gguf import (
    MODEL_TENSOR,
    MODEL_TENSORS,
    TENSOR_NAMES,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
)

from turboboa.errors import UserError
from turboboa.output_files import atomic_file, kill_point

from .metadata import (
    ArchSpec,
    Hyperparameters,
    add_file_info,
    add_hyperparameters,
    arch_spec,
    file_type,
    hyperparameters,
)
from .source import KeyValue, read_kv
from .tensors import GgufTensor
from .tokenizer import add_hf_tokenizer, copy_tokenizer

# general.* keys this writer sets itself; the other general.* keys of a source GGUF are carried over
OWN_GENERAL_KEYS = ("general.architecture", "general.type", "general.name", "general.file_type",
                    "general.quantization_version", "general.alignment")
# llama.cpp's tensor of each role (turboboa.arch.layout); blocks' tensors are "blk.{bid}.<name>"
TENSOR_OF_ROLE = {"embedding": MODEL_TENSOR.TOKEN_EMBD, "final_norm": MODEL_TENSOR.OUTPUT_NORM,
                  "head": MODEL_TENSOR.OUTPUT, "attention_norm": MODEL_TENSOR.ATTN_NORM, "q": MODEL_TENSOR.ATTN_Q,
                  "k": MODEL_TENSOR.ATTN_K, "v": MODEL_TENSOR.ATTN_V, "o": MODEL_TENSOR.ATTN_OUT,
                  "mlp_norm": MODEL_TENSOR.FFN_NORM, "gate": MODEL_TENSOR.FFN_GATE, "up": MODEL_TENSOR.FFN_UP,
                  "down": MODEL_TENSOR.FFN_DOWN, "q_norm": MODEL_TENSOR.ATTN_Q_NORM,
                  "k_norm": MODEL_TENSOR.ATTN_K_NORM, "attention_post_norm": MODEL_TENSOR.ATTN_POST_NORM,
                  "mlp_post_norm": MODEL_TENSOR.FFN_POST_NORM}
# an architecture whose MLP has a pre- and a post-norm (gemma3) names its MLP norm FFN_PRE_NORM
PRE_NORM_OF = {MODEL_TENSOR.FFN_NORM: MODEL_TENSOR.FFN_PRE_NORM}
BLOCK_ROLES = ("attention_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down", "q_norm", "k_norm",
               "attention_post_norm", "mlp_post_norm")
NORM_ROLES = ("final_norm", "attention_norm", "mlp_norm", "q_norm", "k_norm", "attention_post_norm",
              "mlp_post_norm")
_LAYER = re.compile(r"^blk\.(\d+)\.")


def gguf_tensor_name(spec: ArchSpec, hf_name: str) -> tuple[MODEL_TENSOR, str] | None:
    """``(kind, GGUF name)`` of the HF tensor ``hf_name`` (``<module>.weight`` or ``.bias``): its module's role
    in the family's layout, named as llama.cpp names that role; None for a tensor without one."""
    module, dot, suffix = hf_name.rpartition(".")
    if not dot or suffix not in ("weight", "bias"):
        return None
    block, role = spec.layout.locate(module)
    kind = TENSOR_OF_ROLE.get(role) if role is not None else None
    if kind is None or (block is None) != (role not in BLOCK_ROLES):
        return None
    if kind not in MODEL_TENSORS[spec.arch] and PRE_NORM_OF.get(kind) in MODEL_TENSORS[spec.arch]:
        kind = PRE_NORM_OF[kind]
    name = TENSOR_NAMES[kind] if block is None else TENSOR_NAMES[kind].format(bid=block)
    return kind, f"{name}.{suffix}"


def _gguf_tensors(spec: ArchSpec, hp: Hyperparameters,
                  tensors: Mapping[str, GgufTensor]) -> dict[str, GgufTensor]:
    """Map HF names to GGUF names, drop a tied head, permute llama's q/k rows, and check completeness.

    Returns the tensors by GGUF name in file order: model-level tensors first, then by layer, by name.
    """
    allowed = set(MODEL_TENSORS[spec.arch])
    heads = {MODEL_TENSOR.ATTN_Q: hp.n_head, MODEL_TENSOR.ATTN_K: hp.n_head_kv}
    out: dict[str, GgufTensor] = {}
    for hf_name, tensor in tensors.items():
        found = gguf_tensor_name(spec, hf_name)
        if found is None or found[0] not in allowed:
            raise UserError(f"tensor {hf_name!r} has no place in a {spec.name} GGUF file; pass only the "
                            f"model's weights, norms and biases")
        kind, name = found
        if kind == MODEL_TENSOR.OUTPUT and hp.tied_embeddings:
            continue  # llama.cpp uses token_embd as the output matrix
        if spec.permute_qk and kind in heads:
            tensor = tensor.with_rows_permuted(heads[kind])
        if spec.norm_offset and spec.layout.locate(hf_name.rpartition(".")[0])[1] in NORM_ROLES:
            tensor = GgufTensor.from_float(tensor.data + spec.norm_offset)
        out[name] = tensor
    missing = [name for name in _required_names(spec, hp) if name not in out]
    if missing:
        raise UserError(f"the tensors for the GGUF file lack {', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''}")
    return dict(sorted(out.items(), key=lambda item: _order_key(item[0])))


def _required_names(spec: ArchSpec, hp: Hyperparameters) -> list[str]:
    """GGUF names of the tensors llama.cpp needs for this architecture and config."""
    top = [MODEL_TENSOR.TOKEN_EMBD, MODEL_TENSOR.OUTPUT_NORM] + ([] if hp.tied_embeddings else [MODEL_TENSOR.OUTPUT])
    names = [f"{TENSOR_NAMES[t]}.weight" for t in top]
    present = spec.layout.roles.present()
    norms = ("attention_norm", "mlp_norm", *spec.layout.head_norms())
    allowed = MODEL_TENSORS[spec.arch]
    layer = [TENSOR_OF_ROLE[r] for r in BLOCK_ROLES if r in present or r in norms]
    layer = [PRE_NORM_OF.get(t, t) if t not in allowed else t for t in layer]
    for bid in range(hp.n_layer):
        names += [f"{TENSOR_NAMES[t].format(bid=bid)}.weight" for t in layer]
        if spec.qkv_bias:
            names += [f"{TENSOR_NAMES[t].format(bid=bid)}.bias"
                      for t in (MODEL_TENSOR.ATTN_Q, MODEL_TENSOR.ATTN_K, MODEL_TENSOR.ATTN_V)]
    return names


def _order_key(name: str) -> tuple[int, str]:
    """Sort key: model-level tensors (layer -1) first, then layer index, then name."""
    match = _LAYER.match(name)
    return (int(match.group(1)) if match else -1, name)


def _add_extra_kv(writer: GGUFWriter, extra_kv: Mapping[str, Any]) -> None:
    """Write ``extra_kv`` as ``turboboa.*`` keys (prefix added when missing), in sorted key order.

    bool -> BOOL, int -> INT64, float -> FLOAT64, str -> STRING; anything else is a TypeError.
    """
    for key in sorted(extra_kv):
        value = extra_kv[key]
        full = key if key.startswith("turboboa.") else f"turboboa.{key}"
        if isinstance(value, bool):
            writer.add_bool(full, value)
        elif isinstance(value, int):
            writer.add_int64(full, value)
        elif isinstance(value, float):
            writer.add_float64(full, value)
        elif isinstance(value, str):
            writer.add_key_value(full, value, GGUFValueType.STRING)  # add_string drops ""
        else:
            raise TypeError(f"extra_kv[{key!r}] must be a str, int, float or bool, not {type(value).__name__}")


def _model_name(hf_config: Any, source_general: list[KeyValue]) -> str:
    """``general.name``: the source GGUF's, else the config's ``name_or_path`` folder name, else ``model``."""
    for kv in source_general:
        if kv.key == "general.name":
            return kv.value.decode("utf-8")
    name_or_path = str(getattr(hf_config, "name_or_path", "") or "")
    return Path(name_or_path).name or "model"


def _add_metadata(writer: GGUFWriter, hf_config: Any, hp: Hyperparameters, tokenizer_dir_or_tokenizer: Any,
                  source_gguf: Path | None, extra_kv: Mapping[str, Any], name: str | None, ftype: LlamaFileType,
                  embd_rows: int) -> None:
    """Add every key: ``general.*``, hyperparameters, file type, ``tokenizer.*``, then ``turboboa.*``."""
    # one parse of the source file for both prefixes: a 262k-token vocabulary takes seconds to read
    source_kv = read_kv(source_gguf, ("general.", "tokenizer.")) if source_gguf is not None else []
    source_general = [kv for kv in source_kv if kv.key.startswith("general.")]
    writer.add_type("model")
    writer.add_name(name or _model_name(hf_config, source_general))
    for kv in source_general:
        if kv.key not in OWN_GENERAL_KEYS:
            kv.add_to(writer)
    add_hyperparameters(writer, hp)
    add_file_info(writer, ftype)
    if source_gguf is not None:
        n_tokens = copy_tokenizer(writer, source_kv)
    else:
        n_tokens = add_hf_tokenizer(writer, tokenizer_dir_or_tokenizer, hp.vocab_size)
    if n_tokens != embd_rows:
        raise UserError(f"the tokenizer has {n_tokens} tokens but token_embd has {embd_rows} rows; "
                        f"llama.cpp needs one row per token")
    _add_extra_kv(writer, extra_kv)


def write_gguf(path: str | os.PathLike[str], hf_config: Any, tokenizer_dir_or_tokenizer: Any,
               tensors: Mapping[str, GgufTensor], *, source_gguf: Path | None = None,
               extra_kv: Mapping[str, Any] | None = None, name: str | None = None,
               ftype: LlamaFileType | None = None, progress: bool = False) -> Path:
    """Write a GGUF file for llama.cpp and return its path.

    ``hf_config``: the model's ``PretrainedConfig`` (of a family whose adapter names a llama.cpp
    architecture). ``tensors``: every weight, norm and bias by HF name (a tied head's weight may be included;
    it is dropped). Tokenizer: with
    ``source_gguf`` every ``tokenizer.*`` key (and the descriptive ``general.*`` keys) of that file are copied;
    otherwise they are built from ``tokenizer_dir_or_tokenizer`` (an HF tokenizer folder or object).
    ``extra_kv``: quantization settings stored as ``turboboa.*`` keys. ``name`` overrides ``general.name``;
    ``ftype`` overrides the ``general.file_type`` derived from the matrices' types. ``progress``: a bar with
    ETA over the tensor bytes on stderr.
    """
    path = Path(path)
    spec = arch_spec(hf_config)
    hp = hyperparameters(hf_config)
    ordered = _gguf_tensors(spec, hp, tensors)
    embd_rows = ordered[f"{TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD]}.weight"].shape[0]
    if ftype is None:
        ftype = file_type((t.stored_type, t.n_elements) for t in ordered.values() if len(t.shape) == 2)
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, spec.name)
        try:
            _add_metadata(writer, hf_config, hp, tokenizer_dir_or_tokenizer, source_gguf, extra_kv or {}, name,
                          ftype, embd_rows)
            for gguf_name, tensor in ordered.items():
                writer.add_tensor(gguf_name, tensor.payload(),
                                  raw_dtype=tensor.stored_type if tensor.is_packed else None)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            kill_point("export:gguf", writer.flush)
            writer.write_tensors_to_file(progress=progress)
        finally:
            writer.close()
    return path
