"""Text data for calibration and evaluation: named datasets, local files, tokenization and its cache.

A dataset ``spec`` is either a name (``wikitext2``) or a path to a ``.txt`` file (the whole text) or a
``.jsonl`` file with a ``text`` field per row. Texts are rows joined with ``"\\n\\n"``, the usual
perplexity protocol for WikiText-2.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from turboboa.errors import UserError

Purpose = Literal["calib", "eval"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATASETS = PROJECT_ROOT.parent / "shared" / "datasets"
ROW_SEPARATOR = "\n\n"
TOKEN_CACHE_VERSION = 1


@dataclass(frozen=True)
class NamedSplit:
    """One split of a named dataset: a local file name and the Hugging Face dataset it mirrors."""

    folder: str
    filename: str
    hf_path: str
    hf_config: str
    hf_split: str


NAMED_DATASETS: dict[str, dict[str, NamedSplit]] = {
    "wikitext2": {
        "calib": NamedSplit("wikitext-2", "wikitext-2-v1.validation.jsonl", "wikitext", "wikitext-2-v1", "validation"),
        "eval": NamedSplit("wikitext-2", "wikitext-2-raw-v1.test.jsonl", "wikitext", "wikitext-2-raw-v1", "test"),
    },
}


def cache_root() -> Path:
    """Return the turboboa cache folder: ``$TURBOBOA_CACHE`` or ``~/.cache/turboboa``."""
    env = os.environ.get("TURBOBOA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "turboboa"


def dataset_dirs() -> list[Path]:
    """Return the folders searched for named datasets, in order: ``$TURBOBOA_DATASETS``, ``../shared/datasets``."""
    dirs = []
    env = os.environ.get("TURBOBOA_DATASETS")
    if env:
        dirs.append(Path(env).expanduser())
    dirs.append(SHARED_DATASETS)
    return dirs


def read_jsonl_rows(path: Path) -> list[str]:
    """Return the ``text`` field of every row of a JSONL file, in file order (blank lines skipped)."""
    rows: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno} is not valid JSON ({e.msg}); each line must be an object "
                                f'like {{"text": "..."}}') from None
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise UserError(f'{path}:{lineno} has no string "text" field; each line must be an object '
                                f'like {{"text": "..."}}')
            rows.append(obj["text"])
    return rows


def _rows_from_path(spec: str) -> tuple[list[str], str]:
    """Return the rows of a ``.txt`` (one row: the whole file) or ``.jsonl`` file and a description."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"dataset file not found: {spec}; pass an existing .txt or .jsonl file or the name "
                        f"{' / '.join(NAMED_DATASETS)}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8")], f"{path} (text file)"
    if suffix == ".jsonl":
        rows = read_jsonl_rows(path)
        if not rows:
            raise UserError(f"{path} holds no rows; pass a .jsonl file with one {{\"text\": ...}} object per line")
        return rows, f"{path} ({len(rows)} rows)"
    raise UserError(f"dataset file {path} has an unsupported extension; use a .txt file or a .jsonl file "
                    f'with a "text" field')


def _rows_from_hf(split: NamedSplit) -> list[str] | None:
    """Return the rows of ``split`` from the Hugging Face ``datasets`` library, or None if unavailable."""
    try:
        from datasets import load_dataset  # type: ignore[import-not-found]
    except ImportError:
        return None
    try:
        ds = load_dataset(split.hf_path, split.hf_config, split=split.hf_split)
    except Exception:  # offline, hub unreachable, not cached: fall through to the user error
        return None
    return list(ds["text"])


def _rows_from_name(name: str, purpose: Purpose) -> tuple[list[str], str]:
    """Return the rows of a named dataset's split for ``purpose`` and a description of where they came from."""
    split = NAMED_DATASETS[name][purpose]
    label = f"{name} {purpose} ({split.hf_config} {split.hf_split})"
    searched = []
    for folder in dataset_dirs():
        path = folder / split.folder / split.filename
        searched.append(str(path))
        if path.is_file():
            rows = read_jsonl_rows(path)
            return rows, f"{label}, {len(rows)} rows from {path}"
    rows = _rows_from_hf(split)
    if rows is not None:
        return rows, f"{label}, {len(rows)} rows from Hugging Face datasets"
    raise UserError(f"cannot find dataset {name!r} (looked for {', '.join(searched)}; Hugging Face datasets "
                    f"unavailable or offline); set TURBOBOA_DATASETS to a folder holding "
                    f"{split.folder}/{split.filename} or pass a path to a .txt or .jsonl file")


def resolve_rows(spec: str, purpose: Purpose) -> tuple[list[str], str]:
    """Return the rows named by ``spec`` (a dataset name or a file path) for ``purpose`` and a description."""
    if purpose not in ("calib", "eval"):
        raise ValueError(f"purpose must be 'calib' or 'eval', not {purpose!r}")
    if spec in NAMED_DATASETS:
        return _rows_from_name(spec, purpose)
    looks_like_path = os.sep in spec or "/" in spec or Path(spec).suffix.lower() in (".txt", ".jsonl")
    if not looks_like_path and not Path(spec).exists():
        raise UserError(f"unknown dataset {spec!r}; use one of {', '.join(NAMED_DATASETS)} or a path to a "
                        f".txt or .jsonl file")
    return _rows_from_path(spec)


def resolve_text(spec: str, purpose: Purpose) -> tuple[str, str]:
    """Return (text, description): the rows named by ``spec`` for ``purpose`` joined with ``"\\n\\n"``."""
    rows, description = resolve_rows(spec, purpose)
    return ROW_SEPARATOR.join(rows), description


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Return a sha256 hex digest identifying how ``tokenizer`` maps text to ids.

    Uses the serialized fast-tokenizer pipeline (normalizer, pre-tokenizer, model, post-processor with its
    BOS/EOS handling) when available, else the class name, vocabulary and special-token settings.
    """
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    for attr in ("add_bos_token", "add_eos_token", "bos_token", "eos_token"):
        h.update(f"{attr}={getattr(tokenizer, attr, None)!r};".encode())
    return h.hexdigest()


def tokenize_cached(tokenizer: Any, text: str) -> torch.Tensor:
    """Return ``tokenizer(text, return_tensors="pt").input_ids[0]`` (1-D LongTensor), cached on disk.

    The cache lives under ``$TURBOBOA_CACHE/tokens/`` keyed by the text's hash and the tokenizer's
    fingerprint; files are written under a temporary name and renamed into place.
    """
    key = hashlib.sha256()
    key.update(f"v{TOKEN_CACHE_VERSION}\0".encode())
    key.update(hashlib.sha256(text.encode("utf-8")).digest())
    key.update(tokenizer_fingerprint(tokenizer).encode())
    folder = cache_root() / "tokens"
    path = folder / f"{key.hexdigest()}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True).long()
        except Exception:  # corrupt or foreign file: re-tokenize and overwrite it
            pass
    ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids[0].long()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
        os.close(fd)
        try:
            small = ids.to(torch.int32) if ids.numel() == 0 or int(ids.max()) < 2**31 else ids
            torch.save(small, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:  # read-only or full cache: tokenization still succeeded
        pass
    return ids


def eval_tokens(tokenizer: Any, spec: str) -> torch.Tensor:
    """Return the evaluation text named by ``spec`` tokenized once, as a 1-D LongTensor."""
    text, _ = resolve_text(spec, "eval")
    return tokenize_cached(tokenizer, text)


def calibration_batch(tokenizer: Any, spec: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Return ``nsamples`` random windows of ``seqlen`` calibration tokens, a LongTensor (nsamples, seqlen).

    The calibration text is tokenized once; window starts are drawn uniformly from
    ``[0, T - seqlen - 1]`` with ``torch.Generator().manual_seed(seed)`` (GPTQ-style), so the batch is
    deterministic for a given seed.
    """
    if nsamples < 1:
        raise UserError(f"--nsamples must be at least 1, not {nsamples}")
    if seqlen < 1:
        raise UserError(f"--seqlen must be at least 1, not {seqlen}")
    text, description = resolve_text(spec, "calib")
    ids = tokenize_cached(tokenizer, text)
    total = ids.numel()
    if total < seqlen + 1:
        raise UserError(f"calibration text {description} has {total} tokens, fewer than seqlen+1 = {seqlen + 1}; "
                        f"use a smaller --seqlen or a longer calibration text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
