"""The ``tokenizer.*`` keys of a GGUF file: copied from a source GGUF, or built from an HF tokenizer folder.

Building follows the GGUF reference (section 5): ``tokenizer.model`` -> SentencePiece (``llama``), a byte-fallback
BPE ``tokenizer.json`` -> ``llama`` through ``LlamaHfVocab``, any other BPE -> ``gpt2`` with merges. Special ids,
merges and the chat template come from ``gguf.vocab.SpecialVocab``; whether BOS/EOS are added is read off the HF
tokenizer's own behaviour.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFWriter, Keys, TokenType
from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab, SpecialVocab

from .source import KeyValue


def copy_tokenizer(writer: GGUFWriter, source_kv: list[KeyValue]) -> int:
    """Copy every ``tokenizer.*`` key of ``source_kv`` (a source GGUF's fields, :func:`.source.read_kv`) into
    ``writer`` with its value types; return the number of tokens."""
    n_tokens = 0
    for kv in source_kv:
        if not kv.key.startswith("tokenizer."):
            continue
        kv.add_to(writer)
        if kv.key == Keys.Tokenizer.LIST:
            n_tokens = len(kv.value)
    return n_tokens


def _pre_steps(tokenizer_json: dict[str, Any]) -> list[dict[str, Any]]:
    """The pre-tokenizer steps of a ``tokenizer.json`` as a flat list (a Sequence is unrolled)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def detect_bpe_pre(tokenizer_json: dict[str, Any]) -> str | None:
    """The llama.cpp ``tokenizer.ggml.pre`` name matching a byte-level BPE ``tokenizer.json``, or None.

    Recognised by the structure of the pre-tokenizer, not by a hash table:

    * ``ByteLevel`` with its built-in (GPT-2) regex -> ``gpt-2``;
    * ``Digits(individual_digits)`` then ``ByteLevel`` with the GPT-2 regex -> ``smollm`` (SmolLM/StarCoder);
    * ``Split(regex)`` then ``ByteLevel`` without regex, where the regex takes digits in runs of up to three
      (``\\p{N}{1,3}``) -> ``llama-bpe`` (Llama 3), or one at a time (``\\p{N}`` after Qwen's letter rule)
      -> ``qwen2``.
    """
    steps = _pre_steps(tokenizer_json)
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex", "")
        if r"\p{N}{1,3}" in pattern:
            return "llama-bpe"
        if r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" in pattern:
            return "qwen2"
    return None


@contextmanager
def _tokenizer_folder(tokenizer_or_dir: Any) -> Iterator[tuple[Path, Any]]:
    """Yield (folder holding the tokenizer files, HF tokenizer object) for a folder path or a tokenizer."""
    if isinstance(tokenizer_or_dir, (str, Path)):
        from transformers import AutoTokenizer

        folder = Path(tokenizer_or_dir)
        yield folder, AutoTokenizer.from_pretrained(folder, local_files_only=True)
        return
    with tempfile.TemporaryDirectory(prefix="turboboa-tokenizer-") as tmp:
        tokenizer_or_dir.save_pretrained(tmp)
        yield Path(tmp), tokenizer_or_dir


def _special_additions(tokenizer: Any) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): what the HF tokenizer puts around a text with ``add_special_tokens=True``."""
    plain = tokenizer("a", add_special_tokens=False).input_ids
    full = tokenizer("a", add_special_tokens=True).input_ids
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    adds_bos = len(full) > len(plain) and bos is not None and full[0] == bos
    adds_eos = len(full) > len(plain) and eos is not None and full[-1] == eos
    return adds_bos, adds_eos


def _load_vocab(folder: Path) -> BpeVocab | LlamaHfVocab | SentencePieceVocab:
    """The gguf vocab reader for the tokenizer files in ``folder`` (SentencePiece, byte-fallback BPE or BPE)."""
    if (folder / "tokenizer.model").is_file():
        return SentencePieceVocab(folder)
    try:
        return LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError):
        return BpeVocab(folder)


def _bpe_types(folder: Path, types: np.ndarray) -> None:
    """Mark a BPE vocabulary's added tokens in place: special ones CONTROL, the others USER_DEFINED."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return
    for item in json.loads(path.read_text(encoding="utf-8")).get("added_tokens", []):
        if item["id"] < len(types):
            types[item["id"]] = TokenType.CONTROL if item.get("special") else TokenType.USER_DEFINED


def add_hf_tokenizer(writer: GGUFWriter, tokenizer_or_dir: Any, n_vocab: int) -> int:
    """Write the ``tokenizer.*`` keys built from an HF tokenizer (a folder or a tokenizer object).

    Tokens beyond the tokenizer's own, up to the model's ``n_vocab`` embedding rows, are written as unused
    ``[PAD<i>]`` entries. Returns the number of tokens written.
    """
    with _tokenizer_folder(tokenizer_or_dir) as (folder, hf_tokenizer):
        vocab = _load_vocab(folder)
        texts, scores, kinds = zip(*vocab.all_tokens(), strict=True)
        tokens = list(texts)
        score_arr = np.asarray(scores, dtype=np.float32)
        types = np.asarray([int(k) for k in kinds], dtype=np.int32)
        model = vocab.tokenizer_model
        if model == "gpt2":
            _bpe_types(folder, types)
        if len(tokens) < n_vocab:
            extra = n_vocab - len(tokens)
            tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
            score_arr = np.concatenate([score_arr, np.full(extra, -1000.0, np.float32)])
            types = np.concatenate([types, np.full(extra, int(TokenType.UNUSED), np.int32)])
        pre = "default"
        if model == "gpt2":
            tokenizer_json = folder / "tokenizer.json"
            detected = detect_bpe_pre(json.loads(tokenizer_json.read_text(encoding="utf-8"))) \
                if tokenizer_json.is_file() else None
            if detected is None:
                print(f"warning: unknown pre-tokenizer in {folder}; writing tokenizer.ggml.pre = 'default', so "
                      f"llama.cpp may split text differently from the HF tokenizer", file=sys.stderr)
            pre = detected or "default"
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        if model == "llama":
            writer.add_token_scores(score_arr.tolist())
        writer.add_token_types(types.tolist())
        special = SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))
        special.add_special_token["bos"], special.add_special_token["eos"] = _special_additions(hf_tokenizer)
        special.add_to_gguf(writer, quiet=True)
    return len(tokens)
