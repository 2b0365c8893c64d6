"""SHA-256 checksums of files: :func:`sha256_file` (read in 1 MiB chunks) and a folder's sealed ``SHA256SUMS``.

A sealed ``SHA256SUMS`` lists ``<sha256>  <path relative to the folder>`` per file, sorted by path (the
``sha256sum`` format, so ``sha256sum -c SHA256SUMS`` in the folder verifies the files), and ends with one
comment line that seals the list itself::

    # sha256 of the lines above: <sha256 of every byte before this line>

One changed byte anywhere in ``SHA256SUMS`` breaks either the seal or the form of a line, so a damaged list is
told apart from a damaged file it lists. The format does not depend on what the folder holds: a reader checks
the files before it reads any of them.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import UserError

SUMS_FILE = "SHA256SUMS"
SEAL_PREFIX = "# sha256 of the lines above: "
CHUNK_BYTES = 1 << 20
_LINE = re.compile(r"([0-9a-f]{64})  (\S[^\n]*)")


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of the file ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def sums_text(digests: Mapping[str, str]) -> str:
    """``<sha256>  <name>`` per entry of ``digests`` (name -> hex digest), sorted by name, one per line."""
    return "".join(f"{digests[name]}  {name}\n" for name in sorted(digests))


def folder_files(folder: Path, skip: Iterable[str] = ()) -> list[str]:
    """Every file under ``folder`` as a POSIX path relative to it (sub-folders included), sorted, except the
    names in ``skip``."""
    skipped = set(skip)
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in skipped)


def write_sealed_sums(folder: Path, known: Mapping[str, str] | None = None) -> Path:
    """Write ``folder/SHA256SUMS`` covering every other file under ``folder``, sealed (see the module
    docstring). ``known``: digests already computed for some of those files (taken as they are, not read
    again). The caller writes ``folder`` as a temporary folder and renames it when complete."""
    known = known or {}
    digests = {name: known.get(name) or sha256_file(folder / name) for name in folder_files(folder, [SUMS_FILE])}
    body = sums_text(digests).encode("utf-8")
    seal = f"{SEAL_PREFIX}{hashlib.sha256(body).hexdigest()}\n".encode()
    path = folder / SUMS_FILE
    path.write_bytes(body + seal)
    return path


def read_sealed_sums(folder: Path, fix: str) -> dict[str, str]:
    """The digests ``folder/SHA256SUMS`` lists (name -> hex digest), after checking its seal; a missing or
    damaged list is a one-line :class:`UserError` naming it and ending with ``fix``."""
    path = folder / SUMS_FILE
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror or e}); {fix}") from None
    body, _, last = data.rstrip(b"\n").rpartition(b"\n")
    body += b"\n"
    expected = f"{SEAL_PREFIX}{hashlib.sha256(body).hexdigest()}".encode()
    damaged = UserError(f"{path} is damaged (its last line, the SHA-256 of the lines above, does not match "
                        f"them); {fix}")
    if last != expected:
        raise damaged
    digests = {}
    for line in body.decode("utf-8", errors="replace").splitlines():
        match = _LINE.fullmatch(line)
        if match is None:
            raise damaged
        digests[match.group(2)] = match.group(1)
    return digests


def verify_sums(folder: Path, digests: Mapping[str, str], fix: str) -> None:
    """Check every file ``digests`` lists under ``folder`` (in name order): a missing file or one whose
    SHA-256 differs is a one-line :class:`UserError` naming it and ending with ``fix``."""
    for name in sorted(digests):
        path = folder / name
        if not path.is_file():
            raise UserError(f"{path} is missing (listed in {folder / SUMS_FILE}); {fix}")
        if sha256_file(path) != digests[name]:
            raise UserError(f"{path} is damaged: its SHA-256 differs from the one {folder / SUMS_FILE} "
                            f"recorded when it was written; {fix}")
