"""Streaming a float model: a skeleton whose decoder blocks hold no weights, filled one block at a time.

A model source that is a folder of safetensors files (a local Hugging Face folder, or the float cache of a GGUF
file, :mod:`turboboa.models.loader`) is opened without reading its tensors: the model is built on the meta
device, its non-persistent buffers (RoPE frequencies, embedding scales) are computed on the CPU, and only the
tables outside the blocks (embedding, final norm) are read. :meth:`StreamedModel.load_block` reads block ``i``'s
tensors from the files (each tensor once, into float32, by ordinary reads) and :meth:`StreamedModel.release_block`
gives the memory of its linear weights back once they are quantized; the block's other tensors (norms,
biases) are small and stay. The output head is read when it is needed (:meth:`StreamedModel.load_head`).

Host memory then holds one block and the calibration streams, whatever the number of blocks: the embedding
is read to embed the calibration tokens, given back (:meth:`StreamedModel.release_embedding`) and read again
at the end (:meth:`StreamedModel.load_embedding`), rounded and given back before the head is read.
``transforms`` are applied to every block as it is read (the rotation's per-block fold,
:mod:`turboboa.rotation.fuse`), so a streamed model computes what the whole model would after the same
transforms, tensor for tensor.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from turboboa.errors import UserError
from turboboa.models.chunks import module_name
from turboboa.numerics import check_finite
from turboboa.safetensors_file import DTYPES, read_header

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

BlockTransform = Callable[[nn.Module], None]
DAMAGED = "the model file is damaged or was saved after a diverged run"


def safetensors_files(folder: Path) -> list[Path] | None:
    """The safetensors files of a Hugging Face folder (one file, or the shards its index names); None when
    the folder holds no safetensors weights."""
    if (folder / INDEX_FILE).is_file():
        index = json.loads((folder / INDEX_FILE).read_text())
        return [folder / name for name in sorted(set(index.get("weight_map", {}).values()))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    return None



@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset in the file
    nbytes: int


class TensorSource:
    """Tensors by name from safetensors files, each read on its own with ordinary file reads into fresh
    memory. (Memory-mapping the files would keep every page read so far resident in this process, so its
    resident set would grow with the model after all.)"""

    def __init__(self, files: list[Path]):
        self.files = files
        self._entries: dict[str, _Entry] = {}
        for f in files:
            header, data_start = read_header(f)
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                if e["dtype"] not in DTYPES:
                    raise UserError(f"{f}: tensor {name} has the dtype {e['dtype']}, which turboboa does not read; "
                                    f"convert the model to float32, float16 or bfloat16 safetensors")
                begin, end = e["data_offsets"]
                self._entries[name] = _Entry(f, DTYPES[e["dtype"]], tuple(e["shape"]), data_start + begin, end - begin)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` read from its file, as float32 when it is a floating tensor."""
        e = self._entries[name]
        t = torch.empty(e.shape, dtype=e.dtype)
        if e.nbytes:
            with open(e.file, "rb") as fh:
                fh.seek(e.start)
                if fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != e.nbytes:
                    raise UserError(f"{e.file} ends inside tensor {name}; the model file is truncated, convert or "
                                    f"download it again")
        return t.float() if t.is_floating_point() else t

    def identity(self) -> str:
        """SHA-256 over each file's path, size, modification time and header: what decides the tensors, read
        without reading them (the resume fingerprint of a streamed model)."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|".encode())
            header, _ = read_header(f)
            h.update(json.dumps(header, sort_keys=True).encode())
        return h.hexdigest()


def _read(source: TensorSource, name: str, dtype: torch.dtype, label: str) -> torch.Tensor:
    """Tensor ``name`` of ``source`` in ``dtype``, checked finite (a one-line error naming it and ``label``)."""
    value = source.get(name).to(dtype)
    check_finite(value, f"{label}: tensor {name}", DAMAGED)
    return value


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of ``module``'s parameter or buffer ``name`` (a parameter without gradient)."""
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[name] = value


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, device="meta")


@dataclass
class StreamedModel:
    """A model skeleton (blocks on the meta device) and the source its tensors are read from."""

    model: Any  # transformers.PreTrainedModel
    source: TensorSource
    adapter: Any  # turboboa.arch.ArchAdapter
    label: str = "the float model"
    transforms: list[BlockTransform] = field(default_factory=list)
    # the head's weight: read from ``head_source`` (its own name, or the embedding's once a rotation unties it)
    # and passed through ``head_transform`` (the final norm folded and the rotation applied)
    head_source: str | None = None
    head_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    # applied to the embedding whenever it is read again (the rotation's E Q)
    embedding_transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def _fill(self, module: nn.Module, prefix: str) -> None:
        """Read every persistent tensor of ``module`` (full names ``prefix + local``) that is still on the meta
        device from the source; non-persistent buffers are computed as transformers initializes them."""
        for local, t in list(module.state_dict(keep_vars=True).items()):
            if not t.is_meta:
                continue
            owner_name, _, leaf = local.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            _set_tensor(owner, leaf, _read(self.source, prefix + local, t.dtype, self.label))
        _compute_buffers(self.model, module)

    def load_block(self, i: int) -> nn.Module:
        """Block ``i`` with its float tensors read from the source and the transforms applied."""
        block = self.adapter.blocks(self.model)[i]
        prefix = module_name(self.model, block) + "."
        with torch.no_grad():
            self._fill(block, prefix)
            for transform in self.transforms:
                transform(block)
        return block

    def release_block(self, i: int) -> None:
        """Give back the memory of block ``i``'s linear weights (the quantized layers hold them now)."""
        block = self.adapter.blocks(self.model)[i]
        for name in self.adapter.linear_names():
            lin = block.get_submodule(name)
            lin._parameters["weight"] = nn.Parameter(_meta_like(lin.weight), requires_grad=False)
        trim_heap()

    def head_is_tied(self) -> bool:
        head, emb = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        return head is not None and head.weight is emb.weight

    def table_name(self, module: nn.Module) -> str:
        """The source's name of a table's weight (the embedding's or the head's)."""
        return module_name(self.model, module) + ".weight"

    def release_embedding(self) -> None:
        """Give back the embedding's memory while the blocks are quantized (the calibration tokens are
        embedded); :meth:`load_embedding` reads it again."""
        tied = self.head_is_tied()
        emb = self.model.get_input_embeddings()
        self.release_table(emb)
        if tied:
            self.model.get_output_embeddings().weight = emb.weight
        trim_heap()

    def load_embedding(self) -> None:
        """Read the embedding (through ``embedding_transform``) if it is not in memory."""
        emb = self.model.get_input_embeddings()
        if emb.weight.is_meta:
            tied = self.head_is_tied()
            value = _read(self.source, self.table_name(emb), emb.weight.dtype, self.label)
            with torch.no_grad():
                value = value if self.embedding_transform is None else self.embedding_transform(value)
            _set_tensor(emb, "weight", value)
            if tied:
                self.model.get_output_embeddings().weight = emb.weight

    def load_head(self) -> None:
        """Read the untied head's weight (``head_source``, through ``head_transform``) if it is not in memory."""
        head = self.model.get_output_embeddings()
        if head is None or not head.weight.is_meta:
            return
        value = _read(self.source, self.head_source or self.table_name(head), head.weight.dtype, self.label)
        with torch.no_grad():
            _set_tensor(head, "weight", value if self.head_transform is None else self.head_transform(value))

    def release_table(self, module: nn.Module) -> None:
        """Give back the memory of a table's weight (it has been written or quantized)."""
        module._parameters["weight"] = nn.Parameter(_meta_like(module.weight), requires_grad=False)


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc's ``malloc_trim``; nothing elsewhere). A block's
    tensors freed in an order unlike their allocation's leave the heap fragmented, and without this the
    resident set grows by a few megabytes with every block although nothing is kept."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _compute_buffers(model: Any, module: nn.Module, recurse: bool = True) -> None:
    """Allocate the meta buffers of ``module`` (and, with ``recurse``, of its submodules) on the CPU and
    initialize them the way transformers does (``_init_weights``: RoPE inverse frequencies, embedding
    scales). The module's parameters are meta stand-ins meanwhile, so the initializer leaves them alone."""
    for sub in module.modules() if recurse else [module]:
        meta = [name for name, b in sub._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        for name in meta:
            sub._buffers[name] = torch.empty_like(sub._buffers[name], device="cpu")
        params = dict(sub._parameters)
        sub._parameters.update({k: None if p is None else nn.Parameter(_meta_like(p), requires_grad=False)
                                for k, p in params.items()})
        try:
            model._init_weights(sub)
        finally:
            sub._parameters.update(params)


def open_streamed(folder: Path, adapter_of: Callable[[nn.Module], Any],
                  label: str = "the float model") -> StreamedModel | None:
    """The skeleton of the model in ``folder`` with its embedding and final norm read (every other table is
    read when asked); None when the folder cannot be streamed (no safetensors files, or the files do not name
    the model's tensors: such a model is loaded whole)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    files = safetensors_files(folder)
    if files is None:
        return None
    source = TensorSource(files)
    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    adapter = adapter_of(model)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    skip = {id(head)} if head is not None else set()
    names = [n for n, t in model.state_dict(keep_vars=True).items()
             if not (tied and head is not None and n == module_name(model, head) + ".weight")]
    if any(n not in source for n in names if not _is_buffer(model, n)):
        return None
    streamed = StreamedModel(model, source, adapter, label)
    block_modules = {id(m) for m in adapter.blocks(model).modules()}
    with torch.no_grad():
        for name, module in model.named_modules():
            if id(module) in block_modules or id(module) in skip:
                continue
            for leaf, t in list(module._parameters.items()) + list(module._buffers.items()):
                persistent = leaf not in module._non_persistent_buffers_set
                if t is not None and t.is_meta and persistent:
                    _set_tensor(module, leaf, _read(source, f"{name}.{leaf}" if name else leaf, t.dtype, label))
            _compute_buffers(model, module, recurse=False)
    if head is not None and tied:
        head.weight = emb.weight  # an untied head stays on the meta device until load_head
    model.eval()
    model.config.use_cache = False
    return streamed


def _is_buffer(model: nn.Module, name: str) -> bool:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return leaf in owner._buffers
