"""The safetensors file format, read and written a tensor at a time.

A file is ``N`` (8 bytes, little-endian), a JSON header of ``N`` bytes (padded with spaces to a multiple of 8)
naming each tensor's ``dtype``, ``shape`` and ``data_offsets`` ``[begin, end)`` in the data that follows, and
the data: every tensor's bytes, C order, little-endian, without holes. The ``safetensors`` package reads and
writes whole dictionaries in memory (its writer serializes each tensor to a second copy first); a model's
tables or a whole QDIR's layers do not need to be in memory at once to be read (:func:`read_header`) or written
(:func:`save_by_parts`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

# the header's dtype names and their torch dtypes
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

Parts = Callable[[], Iterable[dict[str, torch.Tensor]]]


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset its data starts at."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        try:
            return json.loads(fh.read(n)), 8 + n
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a safetensors file ({e}); pass a Hugging Face folder saved with "
                            f"safetensors") from None


def save_by_parts(path: Path, parts: Parts, metadata: dict[str, str] | None = None) -> None:
    """Write the tensors of every dictionary ``parts()`` yields into the safetensors file ``path``, holding one
    part at a time.

    ``parts`` is called once for the header (names, dtypes, shapes) and once per element size present, so it
    must yield the same tensors each time. The data is laid out by decreasing element size, in the order the
    parts give them within a size, so every tensor starts at a multiple of its element size (the data starts at
    a multiple of 8), as the ``safetensors`` readers need to view the bytes in place.
    """
    specs: dict[str, tuple[torch.dtype, list[int], int]] = {}
    for part in parts():
        for name, t in part.items():
            if name in specs:
                raise ValueError(f"tensor {name} is given twice")
            specs[name] = (t.dtype, list(t.shape), t.numel() * t.element_size())
    sizes = sorted({dtype.itemsize for dtype, _, _ in specs.values()}, reverse=True)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for size in sizes:
        for name, (dtype, shape, nbytes) in specs.items():
            if dtype.itemsize == size:
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for size in sizes:
            for part in parts():
                for name, t in part.items():
                    if t.element_size() != size:
                        continue
                    if specs[name][:2] != (t.dtype, list(t.shape)):
                        raise ValueError(f"tensor {name} changed between the passes over the parts")
                    fh.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        if fh.tell() != 8 + len(raw) + offset:
            raise ValueError(f"{path}: the parts yielded {fh.tell() - 8 - len(raw)} bytes, the header {offset}")
