"""File types like llama-quantize's: ``--preset`` picks a ggml type per tensor.

The rules follow llama.cpp's ``llama_tensor_get_type`` (llama.cpp as vendored in llama-cpp-python 0.3.36,
``llama-quant.cpp``; reference ``iquants.md`` §7) for dense models. ``n_gqa`` is query heads per KV head;
"first n/8" are the layers ``i < n_layers / 8``:

========  =======  ===============================  =============================  ========  =====  ======  =====
preset    default  attn_v (v)                       ffn_down (down)                attn_out  q, k   output  emb
========  =======  ===============================  =============================  ========  =====  ======  =====
Q4_0      q4_0     q4_0                             q4_0                           q4_0      q4_0   q6_k    q4_0
Q2_K      q2_k     q4_k if n_gqa >= 4, else q3_k    q3_k                           q3_k      q2_k   q6_k    q2_k
Q3_K_S    q3_k     q3_k                             q3_k                           q3_k      q3_k   q6_k    q3_k
Q3_K_M    q3_k     q5_k in layers 0-1, else q4_k    q5_k if i < n/16, else q4_k    q4_k      q3_k   q6_k    q3_k
Q4_K_M    q4_k     q6_k where use_more_bits(i, n)   q6_k where use_more_bits(i, n)  q4_k      q4_k   q6_k    q4_k
IQ1_S     iq1_s    q4_k if n_gqa >= 4, else q2_k    q2_k for the first n/8         iq2_xxs   iq1_s  q5_k    q2_k
IQ1_M     iq1_m    q4_k if n_gqa >= 4, else q2_k    q2_k for the first n/8         iq2_xxs   iq1_m  q5_k    q2_k
IQ2_XXS   iq2_xxs  q4_k if n_gqa >= 4, else q2_k    q2_k for the first n/8         iq2_xxs   iq2_xxs q5_k   q2_k
IQ2_XS    iq2_xs   q4_k if n_gqa >= 4, else q2_k    q2_k for the first n/8         iq2_xs    iq2_xs q5_k    q2_k
IQ2_S     iq2_xs   q4_k if n_gqa >= 4, else iq3_s   iq3_s for the first n/8        iq3_s     iq2_xs q5_k    iq3_s
IQ2_M     iq2_s    q4_k if n_gqa >= 4, else iq3_s   iq3_s for the first n/8        iq3_s     iq2_s  q5_k    iq3_s
IQ3_XXS   iq3_xxs  q4_k if n_gqa >= 4, else iq3_xxs  iq3_xxs                       iq3_s     iq2_s  q5_k    iq3_s
IQ3_S     iq3_s    q4_k if n_gqa >= 4, else iq3_s   iq3_s                          iq3_s     iq3_s  q6_k    iq3_s
IQ3_M     iq3_s    q4_k                             q4_k for the first n/8         q4_k      iq3_s  q6_k    iq3_s
IQ4_XS    iq4_xs   q5_k if n_gqa >= 4, else iq4_xs  iq4_xs                         iq4_xs    iq4_xs q6_k    iq4_xs
========  =======  ===============================  =============================  ========  =====  ======  =====

Tensors are known by role (:mod:`turboboa.arch.layout`): attn_v is the value projection ``v``, ffn_down the
MLP's output projection ``down``, attn_out the attention's output projection ``o``, q and k the query and key
projections, output the ``head``, emb the ``embedding``. ``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or
(i - n/8) % 3 == 2``. "output" is the head, or the token
embedding when the head is tied to it (llama.cpp then uses the embedding as the output matrix; with a width
that is not a multiple of 256 it takes q8_0); "emb" an untied embedding (the default type in the k-quant
files). The i-quant file types are those made with an importance matrix (ours: the layer Hessians), as the
IQ1/IQ2/IQ3_XXS types require. Every choice then goes through the width fallbacks of
:mod:`turboboa.formats.choice` (k-quants to 32-column types, i-quants to iq4_nl), as in llama.cpp, unless the
model is padded with ``--pad-to 256``.
"""

from __future__ import annotations

from dataclasses import dataclass

from turboboa.arch import locate
from turboboa.errors import UserError

K_PRESETS = ("Q4_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")
I_PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_S", "IQ3_M", "IQ4_XS")
PRESETS = K_PRESETS + I_PRESETS
DEFAULT_TYPE = {"Q4_0": "q4_0", "Q2_K": "q2_k", "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q4_K_M": "q4_k",
                "IQ1_S": "iq1_s", "IQ1_M": "iq1_m", "IQ2_XXS": "iq2_xxs", "IQ2_XS": "iq2_xs", "IQ2_S": "iq2_xs",
                "IQ2_M": "iq2_s", "IQ3_XXS": "iq3_xxs", "IQ3_S": "iq3_s", "IQ3_M": "iq3_s", "IQ4_XS": "iq4_xs"}
# The i-quant file types' tables: (output / tied embedding, untied embedding), and their per-tensor rules.
I_TABLES = {"IQ1_S": ("q5_k", "q2_k"), "IQ1_M": ("q5_k", "q2_k"), "IQ2_XXS": ("q5_k", "q2_k"),
            "IQ2_XS": ("q5_k", "q2_k"), "IQ2_S": ("q5_k", "iq3_s"), "IQ2_M": ("q5_k", "iq3_s"),
            "IQ3_XXS": ("q5_k", "iq3_s"), "IQ3_S": ("q6_k", "iq3_s"), "IQ3_M": ("q6_k", "iq3_s"),
            "IQ4_XS": ("q6_k", "iq4_xs")}


@dataclass(frozen=True)
class ModelShape:
    """What the rules depend on: the number of layers, query heads per KV head, and a tied head."""

    n_layers: int
    n_gqa: int
    tied: bool


def check_preset(preset: str) -> str:
    """The preset's canonical name; a :class:`UserError` naming the known ones."""
    name = preset.upper()
    if name not in PRESETS:
        raise UserError(f"unknown --preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return name


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def output_type(default: str) -> str:
    """llama-quantize's type of ``output.weight`` (and of a tied ``token_embd``, which llama.cpp then uses as
    the output matrix) in a file whose layers default to ``default``: q6_k, or q8_0 in a q8_0 file. The width
    fallbacks then apply (q6_k -> q8_0 for a width that is not a multiple of 256, as in llama.cpp)."""
    return "q8_0" if default == "q8_0" else "q6_k"


def table_format(default: str, role: str, shape: ModelShape) -> str:
    """The type llama-quantize gives the table of ``role`` ("embedding" or "head") in a file whose layers
    default to ``default``: :func:`output_type` for the head or a tied embedding, ``default`` for an untied
    embedding."""
    return output_type(default) if role == "head" or (role == "embedding" and shape.tied) else default


def preset_format(preset: str, name: str, shape: ModelShape, role: str | None = None) -> str:
    """The ggml type ``preset`` gives the layer (or embedding/head) called ``name`` (a full module name; its
    block index and, unless ``role`` is given, its role come from the registered families' layouts,
    :func:`turboboa.arch.locate`)."""
    block, found = locate(name)
    return preset_type(preset, role or found, block, shape)


def preset_type(preset: str, role: str | None, block: int | None, shape: ModelShape) -> str:
    """The ggml type ``preset`` gives the tensor of ``role`` (a linear role of block ``block``, or
    "embedding" / "head"); the preset's default type for any other tensor."""
    preset = check_preset(preset)
    default = DEFAULT_TYPE[preset]
    if preset in I_TABLES:
        output, embedding = I_TABLES[preset]
        if role == "head" or (role == "embedding" and shape.tied):
            return output
        if role == "embedding":
            return embedding
    elif role in ("head", "embedding"):
        return table_format(default, role, shape)
    if block is None or role is None:
        return default
    if preset in I_TABLES:
        return _i_quant_rule(preset, role, block, shape.n_layers, shape.n_gqa) or default
    return _k_quant_rule(preset, role, block, shape.n_layers, shape.n_gqa) or default


def _k_quant_rule(preset: str, role: str, i: int, n: int, n_gqa: int) -> str | None:
    """The k-quant file types' exceptions to their default type (None: the default)."""
    if role == "v":
        if preset == "Q2_K":
            return "q4_k" if n_gqa >= 4 else "q3_k"
        if preset == "Q3_K_M":
            return "q5_k" if i < 2 else "q4_k"
        if preset == "Q4_K_M" and use_more_bits(i, n):
            return "q6_k"
    elif role == "down":
        if preset == "Q2_K":
            return "q3_k"
        if preset == "Q3_K_M":
            return "q5_k" if i < n // 16 else "q4_k"
        if preset == "Q4_K_M" and use_more_bits(i, n):
            return "q6_k"
    elif role == "o":
        if preset == "Q2_K":
            return "q3_k"
        if preset == "Q3_K_M":
            return "q4_k"
    return None


def _i_quant_rule(preset: str, role: str, i: int, n: int, n_gqa: int) -> str | None:
    """The i-quant file types' exceptions to their default type (None: the default)."""
    low = preset in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS")
    mid = preset in ("IQ2_S", "IQ2_M")
    if role == "v":
        if preset == "IQ4_XS":
            return "q5_k" if n_gqa >= 4 else None
        if preset == "IQ3_M" or n_gqa >= 4:
            return "q4_k"
        return "q2_k" if low else "iq3_s" if mid else None
    if role == "down" and i < n // 8:
        return "q2_k" if low else "iq3_s" if mid else "q4_k" if preset == "IQ3_M" else None
    if role == "o":
        if preset in ("IQ1_S", "IQ1_M"):
            return "iq2_xxs"
        if mid or preset == "IQ3_XXS":
            return "iq3_s"
        if preset == "IQ3_M":
            return "q4_k"
    if role in ("q", "k") and preset == "IQ3_XXS":
        return "iq2_s"
    return None
