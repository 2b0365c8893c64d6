"""The decoder the exported graphs (and the fully quantized simulation) compute, read from the QDIR's
Hugging Face config: sizes, epsilon, tensor names.

Llama and Qwen2 share the block (pre-norm RMSNorm, q/k/v with optional bias, rotate-half RoPE, grouped-query
causal softmax attention, o_proj, SiLU-gated MLP) and the tensor names; Qwen2 has q/k/v biases, found in the
checkpoint's float tensors. Any other architecture, or a feature the graph does not compute (sliding-window
attention, another activation), is a one-line :class:`UserError`. This module is the only place in the exporters
that knows the families' module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from turboboa.errors import UserError

SUPPORTED = ("llama", "qwen2")
EMBEDDING = "model.embed_tokens"
FINAL_NORM = "model.norm"
HEAD = "lm_head"
ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class DecoderSpec:
    """Hyperparameters of a Llama-family decoder (``hidden`` D, ``heads`` H, ``kv_heads`` G, ``head_dim`` d,
    ``vocab`` V, ``layers``, RMSNorm ``eps``, tied head, ``max_positions`` of the RoPE table)."""

    model_type: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    eps: float
    tied: bool
    max_positions: int

    @staticmethod
    def block(i: int) -> str:
        """Module name prefix of decoder block ``i``."""
        return f"model.layers.{i}"

    def linear_names(self) -> list[str]:
        """Every linear layer of the blocks, in graph order."""
        return [f"{self.block(i)}.{n}" for i in range(self.layers) for n in (*ATTENTION, *MLP)]


def decoder_spec(hf_config: Any) -> DecoderSpec:
    """The :class:`DecoderSpec` of ``hf_config``; a UserError for what the graph cannot compute."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UserError(f"ONNX export supports {' and '.join(SUPPORTED)} models, not model_type={model_type!r}")
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"ONNX export computes a SiLU-gated MLP, but this model uses {act!r}")
    window = getattr(hf_config, "sliding_window", None)
    sliding = "sliding_attention" in (getattr(hf_config, "layer_types", None) or ())
    if window and (sliding or getattr(hf_config, "use_sliding_window", False)):
        raise UserError(f"ONNX export computes full causal attention, but this model uses a sliding window of "
                        f"{window} tokens")
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    hidden = int(hf_config.hidden_size)
    head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
    if heads % kv_heads or head_dim % 2:
        raise UserError(f"{heads} query heads over {kv_heads} KV heads of size {head_dim} is not a valid "
                        f"grouped-query layout for RoPE")
    return DecoderSpec(model_type=model_type, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                       intermediate=int(hf_config.intermediate_size), vocab=int(hf_config.vocab_size),
                       layers=int(hf_config.num_hidden_layers), eps=float(hf_config.rms_norm_eps),
                       tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
                       max_positions=int(getattr(hf_config, "max_position_embeddings", 2048)))
