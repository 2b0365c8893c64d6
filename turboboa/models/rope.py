"""RoPE tables from the Hugging Face rotary embedding module built from the QDIR's config.

The module is the one the fake-quant torch model uses (same class, same config), so every ``rope_type``
(default, linear, llama3, yarn, ...) and its attention factor come out as transformers computes them:
``cos[t] = cos(t * inv_freq) * attention_scaling`` over the doubled frequencies, likewise ``sin``. The angle
of position ``t`` is one float32 product, so rows do not depend on how many positions are computed, and a
table sliced to ``T`` rows equals what the torch model computes for a window of ``T`` tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def rotary_module(hf_config: Any) -> torch.nn.Module:
    """A CPU instance of the model's rotary embedding class, built from ``hf_config`` (the model itself is
    only instantiated on the meta device to find the class)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    cls = type(model.model.rotary_emb)
    try:
        return cls(config=hf_config)
    except TypeError:
        return cls(hf_config)


def rope_tables(hf_config: Any, positions: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)``, each float32 ``(positions, head_dim)``, for positions ``0 .. positions - 1``."""
    rotary = rotary_module(hf_config)
    probe = torch.zeros(1, positions, head_dim, dtype=torch.float32)
    ids = torch.arange(positions).unsqueeze(0)
    with torch.no_grad():
        cos, sin = rotary(probe, ids)
    return (np.ascontiguousarray(cos[0].float().numpy()), np.ascontiguousarray(sin[0].float().numpy()))
