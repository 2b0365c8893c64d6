"""File types like llama-quantize's: ``--preset Q4_0|Q2_K|Q3_K_S|Q3_K_M|Q4_K_M`` picks a ggml type per tensor.

The rules follow llama.cpp's ``llama_tensor_get_type`` for these file types (dense Llama-family models):

========  =======  =====================================  ========================================  ========  ==========
preset    default  attn_v (v_proj)                        ffn_down (down_proj)                      attn_out  output/emb
========  =======  =====================================  ========================================  ========  ==========
Q4_0      q4_0     q4_0                                   q4_0                                      q4_0      q6_k
Q2_K      q2_k     q4_k if n_head/n_kv >= 4, else q3_k    q3_k                                      q3_k      q6_k
Q3_K_S    q3_k     q3_k                                   q3_k                                      q3_k      q6_k
Q3_K_M    q3_k     q5_k for the first 2 layers, else q4_k  q5_k if i < n/16, else q4_k               q4_k      q6_k
Q4_K_M    q4_k     q6_k where use_more_bits(i, n)         q6_k where use_more_bits(i, n)            q4_k      q6_k
========  =======  =====================================  ========================================  ========  ==========

``use_more_bits(i, n) = i < n/8 or i >= 7n/8 or (i - n/8) % 3 == 2``. "output/emb" is the head, or the token
embedding when the head is tied to it (llama.cpp then uses the embedding as the output matrix); an untied
embedding gets the default type. Every choice then goes through the width fallbacks of
:mod:`turboboa.formats.choice` (for SmolLM2's 576-wide layers: q2_k/q3_k -> q4_0, q4_k -> q5_0,
q5_k -> q5_1, q6_k -> q8_0), as in llama.cpp, unless the model is padded with ``--pad-to 256``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from turboboa.errors import UserError

PRESETS = ("Q4_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")
DEFAULT_TYPE = {"Q4_0": "q4_0", "Q2_K": "q2_k", "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q4_K_M": "q4_k"}
EMBEDDING = "model.embed_tokens"
HEAD = "lm_head"
_LAYER = re.compile(r"\.layers\.(\d+)\.")


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


def table_format(default: str, name: str, shape: ModelShape) -> str:
    """The type llama-quantize gives the embedding or head ``name`` in a file whose layers default to
    ``default``: :func:`output_type` for the head or a tied embedding, ``default`` for an untied embedding."""
    return output_type(default) if name == HEAD or (name == EMBEDDING and shape.tied) else default


def preset_format(preset: str, name: str, shape: ModelShape) -> str:
    """The ggml type ``preset`` gives the layer (or embedding/head) called ``name`` (HF module name)."""
    preset = check_preset(preset)
    default = DEFAULT_TYPE[preset]
    if name in (HEAD, EMBEDDING):
        return table_format(default, name, shape)
    match = _LAYER.search(name)
    if match is None:
        return default
    i, n = int(match.group(1)), shape.n_layers
    if name.endswith("v_proj"):
        if preset == "Q2_K":
            return "q4_k" if shape.n_gqa >= 4 else "q3_k"
        if preset == "Q3_K_M":
            return "q5_k" if i < 2 else "q4_k"
        if preset == "Q4_K_M" and use_more_bits(i, n):
            return "q6_k"
    elif name.endswith("down_proj"):
        if preset == "Q2_K":
            return "q3_k"
        if preset == "Q3_K_M":
            return "q5_k" if i < n // 16 else "q4_k"
        if preset == "Q4_K_M" and use_more_bits(i, n):
            return "q6_k"
    elif name.endswith("o_proj"):
        if preset == "Q2_K":
            return "q3_k"
        if preset == "Q3_K_M":
            return "q4_k"
    return default
