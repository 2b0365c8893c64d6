"""The integer type of each quantization point of the whole-graph static scheme (``--act-scope graph``).

At 8 bits the inputs (``<point>.a8``) and outputs of the block's weight layers are ``uint8``; the operands of
the activation products (q and k after RoPE, v, the attention probabilities) are symmetric ``int16``; every
other point (embedding, constants, head, logits) is ``uint16``.
"""

from __future__ import annotations

from turboboa.arch import LINEAR_ROLES, role_of

SYMMETRIC_POINTS = ("q_rope", "k_rope", "v", "probs")  # inside the attention's scope
A8, A16 = ".a8", ".a16"
GRAPH_SCHEME = "static-graph"


def point_dtype(point: str, bits: int) -> str:
    """The integer type of ``point`` at ``bits`` (module docstring): at 8 bits ``uint8`` for the inputs
    (``<point>.a8``) and outputs (the layer's name, ``<name>.matmul`` before a bias) of the block's weight
    layers; ``int16`` for the operands of the activation products (:data:`SYMMETRIC_POINTS`); ``uint16`` for
    the rest (the embedding, constants, head and logits included)."""
    if bits == 8 and (point.endswith((A8, ".matmul")) or role_of(point) in LINEAR_ROLES):
        return "uint8"
    if point.rpartition(".")[2] in SYMMETRIC_POINTS:
        return "int16"
    return "uint16"


def dtype_range(dtype: str) -> tuple[int, int]:
    """``(qmin, qmax)`` of ``uint8``, ``uint16`` or ``int16``."""
    return {"uint8": (0, 255), "uint16": (0, 65535), "int16": (-32768, 32767)}[dtype]
