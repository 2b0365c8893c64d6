"""Adapter for Qwen3 (Hugging Face ``Qwen3ForCausalLM``, ``model_type == "qwen3"``).

Llama's block (:mod:`turboboa.arch.llama`) without q/k/v biases, with one RMSNorm per head on the queries and
on the keys, over the head size ``d``, between the projections and RoPE:

``q_{h,t} = RMSNorm_q((x_t W_q^T)_h) = gamma_q * (x_t W_q^T)_h / rho_{h,t}``,
``rho_{h,t} = sqrt(mean((x_t W_q^T)_h^2) + eps)``, one weight ``gamma_q`` (d,) shared by the heads; likewise
``k`` with ``gamma_k``; then ``q~ = R_t q``, ``k~ = R_t k`` (rotate-half RoPE) and the causal softmax.

The norms act inside the attention on each head's channels, so a rotation of the residual stream (QuaRot)
folds as for Llama and leaves them alone; llama.cpp computes them as ``attn_q_norm`` / ``attn_k_norm`` of its
``qwen3`` architecture (NEOX rope, so the q/k rows keep HF's order), the ONNX graph as the layout's per-head norms.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor, nn

from turboboa.arch.base import GgufArch
from turboboa.arch.llama import LlamaAdapter
from turboboa.errors import UserError


class Qwen3Adapter(LlamaAdapter):
    """Qwen3: Llama's module names plus ``self_attn.q_norm`` / ``self_attn.k_norm``; llama.cpp's ``qwen3``."""

    MODEL_TYPES = ("qwen3",)
    NAME = "Qwen3"
    LAYOUT = dataclasses.replace(LlamaAdapter.LAYOUT, q_norm="self_attn.q_norm", k_norm="self_attn.k_norm")
    GGUF = GgufArch("qwen3", permute_qk=False, qkv_bias=False)
    def check_config(self, hf_config: Any) -> None:
        """Refuse q/k/v biases (``attention_bias``), which llama.cpp's ``qwen3`` does not read."""
        if getattr(hf_config, "attention_bias", False):
            raise UserError("this Qwen3 model has q/k/v biases (attention_bias=True), which turboboa's Qwen3 "
                            "adapter and llama.cpp's qwen3 do not compute; use a Qwen3 without attention_bias")

    @staticmethod
    def normalize_heads(attn: nn.Module, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(RMSNorm_q(q), RMSNorm_k(k))`` per head over the last dim d, with the model's own modules."""
        return attn.q_norm(q), attn.k_norm(k)

    @staticmethod
    def head_gains(attn: nn.Module) -> tuple[Tensor | None, Tensor | None]:
        """``(gamma_q, gamma_k)``: Qwen3's RMSNorm gain is its weight ``w``."""
        return attn.q_norm.weight, attn.k_norm.weight

