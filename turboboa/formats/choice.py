"""Which storage format each layer gets: the requested one, a per-tensor override, or a documented fallback.

ggml's k-quants store 256-column super-blocks, so a layer whose input width is not a multiple of 256 (576 in
SmolLM2-135M) cannot hold them. As llama-quantize does (llama.cpp as vendored in llama-cpp-python 0.3.36,
``llama-quant.cpp``), such a layer falls back to a 32-column type chosen before quantization, so the solver
still quantizes onto the grid that is written:

======  ========
asked   fallback
======  ========
q2_k    q4_0
q3_k    q4_0
q4_k    q5_0
q5_k    q5_1
q6_k    q8_0
======  ========

The i-quants (256-column blocks too) fall back to ``iq4_nl`` as in llama.cpp (``tensor_type_fallback``),
but only where a preset chose them: an i-quant asked for explicitly (``--format``, ``--tensor-format``,
``--embed-format``) on a layer it cannot hold is an error naming the layer and ``--pad-to 256``.

``--pad-to 256`` (padding the model's widths) is the alternative that keeps k-quants everywhere.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from turboboa.errors import UserError
from turboboa.formats.iquant import I_QUANTS
from turboboa.formats.lpbq import FAMILY, LPBQ_BLOCKS, is_lpbq, lpbq_name
from turboboa.formats.registry import all_format_names, get_format

FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0",
            **{name: "iq4_nl" for name in I_QUANTS}}
DEFAULT_GROUP_SIZE = 128  # the uniform grid's group when --group-size is not given


def resolve_group(fmt: str, group_size: int | None) -> tuple[str, int]:
    """``(format, group size)`` of a run: ``--group-size`` defaults to 128, except under LPBQ where it is the
    block size: ``lpbq4`` takes 16, 32 (default), 64 or 128 and names the variant (``lpbq4 --group-size 64``
    is ``lpbq4_g64``); an explicit variant fixes its own block. Other formats ignore the group size."""
    if not is_lpbq(fmt):
        return fmt, DEFAULT_GROUP_SIZE if group_size is None else group_size
    block = get_format(fmt).block_size
    if fmt == FAMILY and group_size is not None:
        if group_size not in LPBQ_BLOCKS:
            sizes = ", ".join(map(str, LPBQ_BLOCKS))
            raise UserError(f"--format {FAMILY} takes --group-size {sizes} (its block size; default "
                            f"{block}), not {group_size}")
        return lpbq_name(group_size), group_size
    if group_size is not None and group_size != block:
        raise UserError(f"--format {fmt} has blocks of {block} columns; drop --group-size {group_size} or "
                        f"pass --group-size {block}")
    return fmt, block


def parse_overrides(items: tuple[str, ...] | list[str]) -> tuple[tuple[str, str], ...]:
    """``NAME_PATTERN=TYPE`` strings -> ((pattern, type), ...), checked; the last matching pattern wins."""
    out = []
    for item in items:
        pattern, sep, fmt = item.partition("=")
        if not sep or not pattern or fmt.lower() not in all_format_names():
            raise UserError(f"--tensor-format {item!r} must be NAME_PATTERN=TYPE with TYPE one of "
                            f"{', '.join(all_format_names())} (e.g. '*.down_proj=q6_k')")
        out.append((pattern, fmt.lower()))
    return tuple(out)


def requested_format(default: str, name: str, overrides: tuple[tuple[str, str], ...]) -> str:
    """The format asked for layer ``name``: the last override whose pattern matches it, else ``default``."""
    fmt = default
    for pattern, value in overrides:
        if fnmatchcase(name, pattern):
            fmt = value
    return fmt


def layer_format(default: str, name: str, columns: int, overrides: tuple[tuple[str, str], ...] = (),
                 from_preset: bool = False) -> str:
    """The format layer ``name`` (``columns`` inputs) is quantized onto, after overrides and fallbacks.

    ``from_preset``: ``default`` is a preset's choice (an i-quant then falls back like a k-quant); otherwise
    an i-quant the layer cannot hold raises :class:`UserError`."""
    fmt = requested_format(default, name, overrides)
    if not get_format(fmt).supports_width(columns) and fmt in FALLBACK:
        explicit = not from_preset or any(fnmatchcase(name, pattern) for pattern, _ in overrides)
        if fmt in I_QUANTS and explicit:
            raise UserError(f"{name}: {fmt} stores 256-column blocks but this layer has {columns} input "
                            f"columns; add --pad-to 256, or give it a 32-column type with "
                            f"--tensor-format '{name}=iq4_nl'")
        fmt = FALLBACK[fmt]
    get_format(fmt).check_width(columns)
    return fmt
