"""Key-value fields of an existing GGUF file, read with their value types so they can be written back as is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from turboboa.errors import UserError


@dataclass(frozen=True)
class KeyValue:
    """One GGUF metadata field: key, value, value type and, for arrays, the element type.

    Strings are kept as raw UTF-8 ``bytes`` (also inside arrays), numbers as Python scalars or lists, so writing
    them back reproduces the original bytes.
    """

    key: str
    value: Any
    vtype: GGUFValueType
    sub_type: GGUFValueType | None = None

    def add_to(self, writer: GGUFWriter) -> None:
        """Append this field to ``writer``'s metadata with its original types."""
        writer.add_key_value(self.key, self.value, self.vtype, self.sub_type)


def _field_value(field: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    """(value, type, element type) of a ``GGUFReader`` field, strings as bytes."""
    vtype = GGUFValueType(field.types[0])
    if vtype == GGUFValueType.ARRAY:
        sub_type = GGUFValueType(field.types[-1])
        if len(field.types) != 2:
            raise ValueError(f"nested arrays are not supported ({field.name})")
        parts = [field.parts[i] for i in field.data]
        if sub_type == GGUFValueType.STRING:
            return [p.tobytes() for p in parts], vtype, sub_type
        values = np.concatenate(parts) if parts else np.zeros(0)
        return values.tolist(), vtype, sub_type
    part = field.parts[field.data[0]]
    if vtype == GGUFValueType.STRING:
        return part.tobytes(), vtype, None
    return part[0].item(), vtype, None


def read_kv(path: Path, prefixes: tuple[str, ...]) -> list[KeyValue]:
    """Every metadata field of the GGUF file ``path`` whose key starts with one of ``prefixes``, in file order."""
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as a GGUF file ({e}); pass the model's .gguf file") from None
    out = []
    for key, field in reader.fields.items():
        if key.startswith(prefixes):
            value, vtype, sub_type = _field_value(field)
            out.append(KeyValue(key, value, vtype, sub_type))
    return out
