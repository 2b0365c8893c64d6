"""Run a GGUF file in llama.cpp (through ``llama-cpp-python``) on the same token windows as the torch backend.

:func:`gguf_logits_fn` returns a ``logits_fn`` for :func:`turboboa.eval.perplexity.perplexity`: each window's
ids (from the HF tokenizer) are fed to llama.cpp as they are, on an empty KV cache, and the logits of every
position are returned. :func:`gguf_tokenizer_mismatch` measures how far llama.cpp's own tokenizer would have
split the evaluation text differently.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from turboboa.errors import UserError

INSTALL_HINT = "install the llamacpp extra: pip install 'turboboa[llamacpp]'"
GGUF_MAGIC = b"GGUF"
OURS_KEY = "turboboa.method"  # every GGUF turboboa writes carries the turboboa.* keys (exporters.gguf.export)


def validate_gguf(path: str | os.PathLike[str], require_ours: bool = False) -> dict[str, Any]:
    """Check that ``path`` is a complete GGUF file (and, with ``require_ours``, one turboboa wrote) before any
    runtime opens it; returns its ``turboboa.*`` keys (empty for a foreign file).

    Refused in one line (:class:`UserError`): a missing file, wrong magic bytes (random data, another
    format), a header or key/value section gguf cannot parse, tensor data past the end of the file
    (truncated), and, with ``require_ours``, a file without turboboa's keys (not exported from a QDIR).
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); export one "
                        f"with turboboa export --to gguf")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError, IndexError, ... on damaged headers
        raise UserError(f"{path} is a corrupt or truncated GGUF file ({' '.join(str(e).split())[:200]}); "
                        f"export it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise UserError(f"{path} is truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} of a "
                            f"{size}-byte file; export it again")
    ours = {}
    for name, field in reader.fields.items():
        if name.startswith("turboboa."):
            try:
                ours[name] = field.contents()
            except Exception:  # noqa: BLE001 - an unreadable value: keep the key, not the value
                ours[name] = None
    if require_ours and OURS_KEY not in ours:
        raise UserError(f"{path} is a GGUF file that turboboa did not write (no {OURS_KEY} key); export the "
                        f"QDIR with turboboa export --to gguf and pass that file")
    return ours


def import_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` module, or a UserError naming the extra to install."""
    try:
        import llama_cpp
    except ImportError as e:
        raise UserError(f"llama.cpp is not available ({e}); {INSTALL_HINT}") from None
    return llama_cpp


def _open(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """``llama_cpp.Llama`` on the GGUF file ``path`` without log output; a load failure is a UserError."""
    llama_cpp = import_llama_cpp()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"GGUF file not found: {path}")
    try:
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kwargs)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"llama.cpp cannot load {path} ({e}); the file is not a valid GGUF model") from None


class LlamaCppLogits:
    """A ``logits_fn``: input ids (1, L) -> llama.cpp's float32 logits (1, L, V) of every position.

    Every call starts from an empty KV cache, so windows are scored independently, as by the torch backend.
    The KV cache is F16, llama.cpp's default (what a user runs); ``kv_cache_f32`` keeps it in F32, which
    brings an F32 model's logits to float32 agreement with torch (see tests/test_gguf_writer.py).
    """

    def __init__(self, path: str | os.PathLike[str], n_ctx: int, threads: int | None = None,
                 n_batch: int = 512, kv_cache_f32: bool = False) -> None:
        llama_cpp = import_llama_cpp()
        threads = threads or max(1, os.cpu_count() or 1)
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if kv_cache_f32 else {}
        self.n_ctx = n_ctx
        self._llama_cpp = llama_cpp
        self.llm = _open(path, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=threads,
                         n_threads_batch=threads, logits_all=True, **kv)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the logits (1, L, V) llama.cpp computes for ``input_ids`` (1, L) on an empty cache."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids must have shape (1, L), got {tuple(input_ids.shape)}")
        length = int(input_ids.shape[1])
        if length > self.n_ctx:
            raise ValueError(f"a window of {length} tokens does not fit n_ctx={self.n_ctx}")
        self.llm.reset()  # the Python side: no tokens evaluated
        self._llama_cpp.llama_memory_clear(self._llama_cpp.llama_get_memory(self.llm.ctx), True)  # the KV cache
        self.llm.eval(input_ids[0].tolist())
        return torch.from_numpy(np.array(self.llm.scores[:length], dtype=np.float32))[None]

    def close(self) -> None:
        """Free the llama.cpp model and context."""
        self.llm.close()

    def __enter__(self) -> LlamaCppLogits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gguf_logits_fn(path: str | os.PathLike[str], n_ctx: int, threads: int | None = None, *,
                   kv_cache_f32: bool = False) -> LlamaCppLogits:
    """A logits function running the GGUF file ``path`` in llama.cpp with a context of ``n_ctx`` tokens on
    ``threads`` CPU threads (default: all cores); call ``.close()`` (or use ``with``) to free it."""
    return LlamaCppLogits(path, n_ctx, threads, kv_cache_f32=kv_cache_f32)


@dataclass(frozen=True)
class TokenizerMismatch:
    """How llama.cpp's tokenizer splits a text compared with the HF tokenizer's ids.

    ``differing``: HF tokens for which llama.cpp's tokenization has no token with the same id at the same
    byte offset of the text (aligned by byte offset, so one different split does not shift every later
    position). ``first_mismatch``: first index where the id sequences differ (None if identical).
    """

    hf_tokens: int
    gguf_tokens: int
    differing: int
    first_mismatch: int | None

    @property
    def share(self) -> float:
        """``differing`` as a share of the HF tokens."""
        return self.differing / max(1, self.hf_tokens)


def _token_byte_lengths(llm: Any) -> np.ndarray:
    """Byte length of every vocabulary entry as llama.cpp detokenizes it (special tokens included)."""
    return np.array([len(llm.detokenize([i], special=True)) for i in range(llm.n_vocab())], dtype=np.int64)


def _placed(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """One int64 per token of ``ids`` naming (its byte offset in the text, its id): ``offset * V + id``."""
    starts = np.cumsum(lengths[ids]) - lengths[ids]
    return starts * lengths.size + ids


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration (llama.cpp logs from C, past Python's sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def gguf_tokenizer_mismatch(path: str | os.PathLike[str], text: str, hf_ids: Any) -> TokenizerMismatch:
    """Tokenize ``text`` with the GGUF file's own tokenizer and compare with ``hf_ids`` (the HF tokenizer's).

    llama.cpp adds BOS exactly when the file says so (as the HF tokenizer does with its special tokens). Both
    id sequences are placed on the text's bytes with llama.cpp's per-token byte lengths, and HF tokens that
    llama.cpp does not produce at the same offset are counted (see :class:`TokenizerMismatch`).
    """
    with _stderr_silenced():  # a vocab-only context warns that n_ctx exceeds its (absent) training context
        llm = _open(path, vocab_only=True, n_ctx=16)
    try:
        gguf_ids = np.asarray(llm.tokenize(text.encode("utf-8"), add_bos=True, special=False), dtype=np.int64)
        lengths = _token_byte_lengths(llm)
    finally:
        llm.close()
    hf = torch.as_tensor(hf_ids).reshape(-1).to(torch.int64).numpy()
    if hf.size and int(hf.max()) >= lengths.size:
        raise UserError(f"the HF ids reach {int(hf.max())} but {path} has {lengths.size} tokens; "
                        f"the GGUF file was written for another tokenizer")
    differing = int(np.count_nonzero(~np.isin(_placed(hf, lengths), _placed(gguf_ids, lengths))))
    common = min(hf.size, gguf_ids.size)
    unequal = np.flatnonzero(hf[:common] != gguf_ids[:common])
    if unequal.size:
        first: int | None = int(unequal[0])
    else:
        first = None if hf.size == gguf_ids.size else common
    return TokenizerMismatch(int(hf.size), int(gguf_ids.size), differing, first)
