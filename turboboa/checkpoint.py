"""The quantized checkpoint (QDIR): integer codes, scales and zero points plus every float tensor.

Layout of a QDIR folder:

* ``quant_config.json``: format version, the :class:`QuantConfig`, calibration, source model, package
  versions, timings, and one entry per quantized layer (shape, bits, group size).
* ``quantized.safetensors``: per quantized linear layer ``<name>.codes`` (uint8), ``<name>.scale`` and
  ``<name>.zero`` (float32, ``(d_out, n_groups)``); for a ggml format also its stored block fields
  ``<name>.d`` / ``.dmin`` (float32 holding fp16 values) and ``.sc`` / ``.m`` (int32).
* ``float.safetensors``: every other tensor of the model (embeddings, norms, head) in float32.
* ``config.json`` and the tokenizer files, so the QDIR loads without the source model.
* optional ``activations.safetensors`` (``turboboa quantize --act-bits`` or ``turboboa calibrate``): static
  activation encodings, per quantized layer ``<name>.scale`` (0-d float32), ``.zero_point`` (0-d int32) and
  the observed ``.min``/``.max``, described by the ``activations`` entry of ``quant_config.json`` (scheme,
  bits, granularity, observer, calibration). A QDIR without it has float activations.
* ``SHA256SUMS``, written last: the SHA-256 of every other file, sealed by the SHA-256 of the list itself
  (:mod:`turboboa.checksums`; ``sha256sum -c SHA256SUMS`` verifies the files too). :func:`load_qdir` checks
  every listed file before it reads any, so one changed byte in any file of a QDIR (the list included) is a
  one-line :class:`UserError` naming that file; ``export``, ``eval``, ``check`` and ``calibrate`` all load
  through it. A QDIR of version 1 (written before the list) is refused by its version.

:func:`load_fakequant_model` rebuilds the torch model with :meth:`QuantizedLinear.dequantize`, the one
dequantizer every consumer uses, and simulates the activation encodings when the QDIR has them.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize

from .activations.dynamic import DynamicSpec, install_dynamic
from .activations.encodings import ActivationEncodings, install_input_quantization
from .activations.points import GRAPH_SCHEME
from .activations.simulate import QuantizedGraphModel
from .checksums import SUMS_FILE, read_sealed_sums, verify_sums, write_sealed_sums
from .config import QuantConfig
from .errors import UserError
from .formats.base import GgmlGrid
from .formats.uniform import UNIFORM
from .numerics import check_quantized_finite, check_state_finite
from .output_files import (
    kill_point,
    prepare_output,
    remove_stale_temporaries,
    replace_folder,
    write_errors_as_user_errors,
)
from .quantized import QuantizedLinear
from .safetensors_file import save_by_parts

QDIR_FORMAT = "turboboa-qdir"
QDIR_VERSION = 2  # 2: SHA256SUMS
CONFIG_FILE = "quant_config.json"
QUANT_FILE = "quantized.safetensors"
FLOAT_FILE = "float.safetensors"
ACT_FILE = "activations.safetensors"
ACT_KEY = "activations"
GRID_INT_FIELDS = ("sc", "m")
QDIR_FIX = "quantize again, or restore the QDIR from a copy"  # ends the message of a damaged QDIR


@dataclass
class QuantizedCheckpoint:
    """A QDIR in memory: quantized layers by full module name, float tensors, and its metadata; ``digests``:
    the SHA-256 of its files, checked when it was loaded (by name relative to ``path``)."""

    layers: dict[str, QuantizedLinear]
    float_tensors: dict[str, torch.Tensor]
    config: QuantConfig
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    activations: ActivationEncodings | None = None
    digests: dict[str, str] = field(default_factory=dict)


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Versions of the packages that decide the numbers in a checkpoint, then of the installed ones among
    ``extra`` (distribution names, e.g. ``llama_cpp_python``); packages not installed are left out."""
    import importlib.metadata as md

    out = {}
    for name in ("turboboa", "torch", "transformers", "numpy", "safetensors", "gguf", "onnx", "onnxruntime", *extra):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def source_parameters(ckpt: QuantizedCheckpoint) -> int:
    """Parameters of the source model before padding or rotation (a tied head counted once), the denominator
    of bits per weight; recorded at quantization, else counted from the checkpoint's tensors."""
    recorded = ckpt.meta.get("parameters")
    if recorded:
        return int(recorded)
    return sum(q.codes.numel() for q in ckpt.layers.values()) + sum(t.numel() for t in ckpt.float_tensors.values())


def float_state(model: torch.nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of ``model`` except quantized layers' weights; a tied head is stored once (as the embedding),
    or not at all when the embedding is quantized."""
    state = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=False).items():
        key = t.data_ptr()
        if key in seen and t.numel() > 0:
            continue  # tied weight (the head is the embedding): stored once, or quantized
        seen.add(key)
        if name.endswith(".weight") and name[: -len(".weight")] in quantized:
            continue
        state[name] = t.detach().to(torch.float32).contiguous().cpu()
    return state


@dataclass
class DeferredLayers:
    """Quantized layers kept on disk until the QDIR is written (a streamed run's blocks, in its resume
    folder): their names, their bytes, how to read them (``read()`` yields them a block at a time, and is
    called again for every pass of :func:`~turboboa.safetensors_file.save_by_parts`), and what to give back
    once the float tensors are written (the streamed model's tables), so the two never share memory."""

    names: list[str]
    nbytes: int
    read: Callable[[], Iterable[dict[str, QuantizedLinear]]]
    after_floats: Callable[[], None] = lambda: None


def save_qdir(
    path: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    layers: dict[str, QuantizedLinear],
    config: QuantConfig,
    meta: dict[str, Any],
    activations: ActivationEncodings | None = None,
    deferred: DeferredLayers | None = None,
) -> Path:
    """Write the QDIR (with the activation encodings, when given) into a temporary folder beside ``path`` and
    rename it into place when complete. ``deferred``: layers read only after the float tensors are written,
    listed before ``layers``.

    Before anything is written: every solved tensor and float tensor is checked finite (a NaN/Inf is a
    one-line :class:`~turboboa.numerics.NonFiniteError` naming it), the location writable and the free space
    enough (:func:`~turboboa.output_files.prepare_output`); a full disk or a refused write during it is a UserError."""
    path = Path(path)
    for name, q in layers.items():
        check_quantized_finite(name, {"codes": q.codes, "scales": q.scale, "zero points": q.zero,
                                      **({} if q.grid is None else vars(q.grid))})
    deferred = deferred or DeferredLayers([], 0, list)
    floats = [float_state(model, set(layers) | set(deferred.names))]
    check_state_finite(floats[0].items(), "the quantized model")
    prepare_output(path, estimate_qdir_bytes(layers=layers, floats=floats[0]) + deferred.nbytes, "the QDIR")
    with write_errors_as_user_errors(path):
        remove_stale_temporaries(path)
        return _write_qdir(path, model, tokenizer, layers, floats, config, meta, activations, deferred)


def _write_qdir(path: Path, model: torch.nn.Module, tokenizer: Any, layers: dict[str, QuantizedLinear],
                floats: list[dict[str, torch.Tensor]], config: QuantConfig, meta: dict[str, Any],
                activations: ActivationEncodings | None, deferred: DeferredLayers) -> Path:
    """The writing part of :func:`save_qdir`: a temporary folder beside ``path``, sealed by its SHA256SUMS,
    renamed into place. The float tensors (``floats``, a one-item list it empties) are written and let go
    before the deferred layers are read; those are written a block at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_by_parts(tmp / FLOAT_FILE, lambda: floats, {"format": QDIR_FORMAT})
        floats.clear()
        deferred.after_floats()
        entries: dict[str, dict[str, Any]] = {}

        def parts() -> Iterator[dict[str, torch.Tensor]]:
            for chunk in itertools.chain(deferred.read(), [layers]):
                tensors, chunk_entries = layer_tensors(chunk)
                entries.update(chunk_entries)
                yield tensors

        save_by_parts(tmp / QUANT_FILE, parts, {"format": QDIR_FORMAT})
        kill_point("qdir-write")
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        doc = {
            "format": QDIR_FORMAT,
            "version": QDIR_VERSION,
            "method": config.method,
            "bits": config.bits,
            "group_size": config.group_size,
            "quant_format": config.format,
            "quant_config": config.to_dict(),
            "versions": package_versions(),
            **meta,
            "layers": entries,
        }
        if activations is not None:
            doc[ACT_KEY] = _write_activations(tmp, activations)
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        write_sealed_sums(tmp)
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def layer_tensors(layers: dict[str, QuantizedLinear]) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """The safetensors payload of quantized layers (``<name>.codes``/``.scale``/``.zero`` and the stored grid
    fields) and their ``layers`` entries of ``quant_config.json``, in the order of ``layers``."""
    tensors: dict[str, torch.Tensor] = {}
    entries = {}
    for name, q in layers.items():
        tensors[f"{name}.codes"] = q.codes.to(torch.uint8).contiguous().cpu()
        tensors[f"{name}.scale"] = q.scale.float().clone().contiguous().cpu()  # clones: safetensors refuses
        tensors[f"{name}.zero"] = q.zero.float().clone().contiguous().cpu()  # tensors that share memory
        entries[name] = {"shape": list(q.shape), "bits": q.bits, "group_size": q.group_size, "sym": q.sym,
                         "format": q.fmt}
        if q.grid is not None:
            for key, value in vars(q.grid).items():
                if value is not None:
                    dtype = torch.int32 if key in GRID_INT_FIELDS else torch.float32
                    tensors[f"{name}.{key}"] = value.to(dtype).clone().contiguous().cpu()
    return tensors, entries


def layers_from_tensors(entries: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> dict[str, QuantizedLinear]:
    """The inverse of :func:`layer_tensors`: the quantized layers, exactly as they were saved."""
    layers = {}
    for name, e in entries.items():
        fmt = e.get("format", UNIFORM)
        grid = None  # the stored fields, saved where the layer has them (storage formats; not the uniform grid)
        if f"{name}.d" in tensors:
            grid = GgmlGrid(**{k: tensors.get(f"{name}.{k}") for k in ("d", "dmin", "sc", "m")})
        layers[name] = QuantizedLinear(
            codes=tensors[f"{name}.codes"], scale=tensors[f"{name}.scale"], zero=tensors[f"{name}.zero"],
            bits=e["bits"], group_size=e["group_size"], sym=e["sym"], fmt=fmt, grid=grid,
        )
    return layers


def estimate_qdir_bytes(model: torch.nn.Module | None = None, layers: dict[str, QuantizedLinear] | None = None,
                        floats: dict[str, torch.Tensor] | None = None) -> int:
    """Bytes a QDIR takes, about: one byte per quantized weight (uint8 codes) plus its scales and zeros and
    four bytes per float value. Before quantization (only ``model``) every tensor of ``model`` counts four
    bytes, an upper bound."""
    total = 2**20  # config, tokenizer
    if layers is None:
        assert model is not None
        return total + sum(t.numel() * 4 for t in model.state_dict().values())
    total += sum(q.codes.numel() + 8 * q.scale.numel() for q in layers.values())
    return total + sum(t.numel() * 4 for t in (floats or {}).values())


def _write_activations(folder: Path, activations: ActivationEncodings) -> dict[str, Any]:
    """Write ``activations.safetensors`` into ``folder``; returns the ``activations`` entry of the config."""
    tensors, metadata = activations.to_tensors()
    save_file(tensors, str(folder / ACT_FILE), metadata={"format": QDIR_FORMAT, **metadata})
    return {"file": ACT_FILE, **activations.summary()}


def save_activations(path: str | os.PathLike, activations: ActivationEncodings) -> Path:
    """Add or replace the activation encodings of the QDIR ``path``, atomically: a new folder beside it holds
    hard links to the unchanged files (copies where links fail), the new ``activations.safetensors``,
    ``quant_config.json`` and ``SHA256SUMS``; it takes the QDIR's name by renames, and the old folder is
    removed last. The unchanged files keep the digests the old ``SHA256SUMS`` recorded (the caller loaded,
    and so verified, the QDIR); only the two new files are hashed."""
    path = Path(path)
    doc = read_meta(path)
    known = read_sealed_sums(path, QDIR_FIX)
    tensors, _ = activations.to_tensors()
    prepare_output(path, sum(t.numel() * t.element_size() for t in tensors.values()) + 2**20,
                   "the activation encodings")
    with write_errors_as_user_errors(path):
        remove_stale_temporaries(path)
        return _replace_activations(path, doc, known, activations)


def _replace_activations(path: Path, doc: dict[str, Any], known: dict[str, str],
                         activations: ActivationEncodings) -> Path:
    """The writing part of :func:`save_activations` (``known``: the old QDIR's digests by file name)."""
    rewritten = (CONFIG_FILE, ACT_FILE, SUMS_FILE)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    old = None
    try:
        for src in path.iterdir():
            if src.name in rewritten:
                continue  # rewritten below; never write through a hard link into the old QDIR
            if src.is_dir():
                shutil.copytree(src, tmp / src.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(src, tmp / src.name)
        doc[ACT_KEY] = _write_activations(tmp, activations)
        (tmp / CONFIG_FILE).write_text(json.dumps(doc, indent=2) + "\n")
        write_sealed_sums(tmp, {name: digest for name, digest in known.items() if name not in rewritten})
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists() and (old / path.name).exists():
            os.replace(old / path.name, path)  # put the untouched QDIR back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Hard-link ``src`` to ``dst``, or copy it where the file system refuses links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def is_qdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` looks like a QDIR (has ``quant_config.json``); :func:`load_qdir` checks the rest."""
    return (Path(path) / CONFIG_FILE).is_file()


def read_meta(path: Path) -> dict[str, Any]:
    """``quant_config.json`` of a QDIR, checked to be ours and of a version this package reads (its bytes are
    not checked against ``SHA256SUMS`` here: :func:`verify_qdir` does that)."""
    try:
        doc = json.loads((Path(path) / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable turboboa QDIR ({e}); quantize again with `turboboa quantize`") from None
    if not isinstance(doc, dict) or doc.get("format") != QDIR_FORMAT:
        raise UserError(f"{path} is not a turboboa QDIR (no '{QDIR_FORMAT}' marker in {CONFIG_FILE})")
    version = doc.get("version")
    if version != QDIR_VERSION:
        newer = isinstance(version, int) and version > QDIR_VERSION
        fix = ("upgrade turboboa (pip install -U turboboa) or quantize again with this version" if newer
               else "quantize again with this version")
        raise UserError(f"{path} is a QDIR of format version {version}, this turboboa "
                        f"({package_versions().get('turboboa', '?')}) reads version {QDIR_VERSION}; {fix}")
    return doc


def verify_qdir(path: str | os.PathLike) -> dict[str, str]:
    """Check every file of the QDIR ``path`` against its sealed ``SHA256SUMS`` (each read once, in 1 MiB
    chunks) and return the digests by file name. A missing or damaged file, the list included, is a one-line
    :class:`UserError` naming it. Without a list: a QDIR of an older version is refused by its version
    (:func:`read_meta`), any other folder as one that lacks ``SHA256SUMS``."""
    path = Path(path)
    if not (path / SUMS_FILE).is_file():
        read_meta(path)  # not a QDIR, or one of another version: said so first
        raise UserError(f"{path} lacks {SUMS_FILE}, the SHA-256 of its files written with it, so it cannot be "
                        f"checked; quantize again")
    digests = read_sealed_sums(path, QDIR_FIX)
    if CONFIG_FILE not in digests:
        raise UserError(f"{path / SUMS_FILE} does not list {CONFIG_FILE}; {QDIR_FIX}")
    verify_sums(path, digests, QDIR_FIX)
    return digests


def load_qdir(path: str | os.PathLike) -> QuantizedCheckpoint:
    """Read a QDIR back, after :func:`verify_qdir`: the exact codes, scales, zero points and float tensors
    that were saved."""
    path = Path(path)
    digests = verify_qdir(path)
    doc = read_meta(path)
    try:
        qt = load_file(str(path / QUANT_FILE))
        ft = load_file(str(path / FLOAT_FILE))
    except Exception as e:  # noqa: BLE001 - any read error is a corrupt QDIR
        raise UserError(f"{path} is a damaged QDIR ({e}); quantize again") from None
    try:
        layers = layers_from_tensors(doc["layers"], qt)
    except (KeyError, TypeError) as e:
        raise UserError(f"{path} is a damaged QDIR (missing {e}); quantize again") from None
    config = QuantConfig.from_dict(doc["quant_config"])
    return QuantizedCheckpoint(layers, ft, config, doc, path, load_activations(path, doc), digests)


def load_activations(path: Path, doc: dict[str, Any]) -> ActivationEncodings | None:
    """The activation encodings of the QDIR ``path`` (``doc``: its config), or None when it has none."""
    entry = doc.get(ACT_KEY)
    if not entry:
        return None
    try:
        tensors = load_file(str(path / entry.get("file", ACT_FILE)))
    except Exception as e:  # noqa: BLE001 - any read error is a damaged QDIR
        raise UserError(f"{path} has damaged activation encodings ({e}); run turboboa calibrate "
                        f"again") from None
    return ActivationEncodings.from_tensors(entry, tensors)


class CodesWeight(torch.nn.Module):
    """A parametrization of a linear layer's ``weight``: its fake-quant weight dequantized from the layer's
    codes (:meth:`QuantizedLinear.dequantize`) at every use and dropped after it, so the model holds one byte
    per weight (the codes) instead of four, at the cost of a dequantization per forward pass."""

    def __init__(self, q: QuantizedLinear) -> None:
        super().__init__()
        self.q = q

    def forward(self, placeholder: torch.Tensor) -> torch.Tensor:
        """``W_hat`` in the placeholder's dtype (the placeholder itself holds nothing)."""
        return self.q.dequantize().to(placeholder.dtype)


def lazy_layer_names(model: torch.nn.Module, layers: dict[str, QuantizedLinear]) -> list[str]:
    """The quantized layers of ``model`` that :class:`CodesWeight` can serve: ``nn.Linear`` modules whose
    weight is not shared with the token embedding (a tied head stays what the embedding is)."""
    emb = model.get_input_embeddings()
    tied = model.get_output_embeddings() if getattr(model.config, "tie_word_embeddings", False) else None
    names = []
    for name in layers:
        module = model.get_submodule(name)
        if isinstance(module, torch.nn.Linear) and module is not emb and module is not tied:
            names.append(name)
    return names


def attach_codes_weight(module: torch.nn.Module, q: QuantizedLinear, dtype: torch.dtype) -> None:
    """Give ``module`` (still without weight values) the weight :class:`CodesWeight` computes from ``q``."""
    module.weight = torch.nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    parametrize.register_parametrization(module, "weight", CodesWeight(q), unsafe=True)


def load_fakequant_model(ckpt: QuantizedCheckpoint, dtype: torch.dtype = torch.float32,
                         activations: bool = True, dynamic: DynamicSpec | None = None,
                         lazy: bool = False) -> torch.nn.Module:
    """The torch model whose quantized linear weights are ``scale * (codes - zero)``; needs only the QDIR.

    ``lazy``: the quantized linear layers (not the embedding, nor a head tied to it) keep only their codes
    and dequantize their weight at every forward pass (:class:`CodesWeight`): the same weights and outputs,
    a quarter of their memory, for a CPU model scored next to other models (``turboboa check``).

    When the QDIR has activation encodings (and ``activations``), every encoded layer's input is
    fake-quantized by a forward pre-hook (:func:`~turboboa.activations.encodings.fake_quant`); encodings of
    the whole graph (``--scope graph``) give the fully quantized decoder of
    :class:`~turboboa.activations.simulate.QuantizedGraphModel` instead. Per-token activation and KV
    quantization and the online rotations (``WxAyKVz``) are the QDIR's :class:`DynamicSpec`, or ``dynamic``
    (the same weights simulated under other activation widths; its online rotations must be the QDIR's)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    assert ckpt.path is not None
    if activations and ckpt.activations is not None and ckpt.activations.scheme == GRAPH_SCHEME:
        return QuantizedGraphModel(ckpt, ckpt.activations)
    hf_config = AutoConfig.from_pretrained(ckpt.path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    lazy_names = set(lazy_layer_names(model, ckpt.layers)) if lazy else set()
    state = dict(ckpt.float_tensors)
    for name, q in ckpt.layers.items():
        if name not in lazy_names:
            state[f"{name}.weight"] = q.dequantize()
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    del state
    if getattr(hf_config, "tie_word_embeddings", False):
        model.tie_weights()
    for name in sorted(lazy_names):
        attach_codes_weight(model.get_submodule(name), ckpt.layers[name], dtype)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    missing += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if missing:
        # non-persistent buffers (rotary inv_freq) are rebuilt by re-initialising those modules on CPU
        _materialize_buffers(model, hf_config)
        missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if missing:
            raise UserError(f"{ckpt.path} lacks tensors {missing[:3]}...; the QDIR is incomplete, quantize again")
    model.config.use_cache = False
    if activations and ckpt.activations is not None:
        install_input_quantization(model, ckpt.activations)
    spec = DynamicSpec.from_config(ckpt.config)
    if dynamic is not None:
        if (dynamic.online_down, dynamic.online_qk) != (spec.online_down, spec.online_qk):
            raise UserError(f"{ckpt.path} was quantized with online rotations {ckpt.config.online_rotate}; "
                            f"evaluate it with the same ones")
        spec = dynamic
    if activations or spec.online_down:  # the online rotation is part of the weights' function
        install_dynamic(model, spec if activations else DynamicSpec(online_down=spec.online_down))
    return model.eval()


def _materialize_buffers(model: torch.nn.Module, hf_config: Any) -> None:
    """Recreate modules that only hold meta buffers (e.g. the rotary embedding) on the CPU; a scaled embedding's
    ``embed_scale`` buffer (Gemma's ``E[ids] * sqrt(D)``) is rebuilt from its ``scalar_embed_scale``."""
    for name, module in list(model.named_modules()):
        bufs = [b for b in module.buffers(recurse=False) if b.device.type == "meta"]
        params = list(module.parameters(recurse=False))
        if bufs and hasattr(module, "scalar_embed_scale"):
            module.embed_scale = torch.tensor(float(module.scalar_embed_scale))
            continue
        if bufs and not params:
            cls = type(module)
            try:
                new = cls(config=hf_config)
            except TypeError:
                new = cls(hf_config)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
