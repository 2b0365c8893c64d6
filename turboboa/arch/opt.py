"""Adapter for OPT (Hugging Face ``OPTForCausalLM``, ``model_type == "opt"``), pre-norm variants.

Positions enter once, as a learned table added to the token embedding; there is no RoPE:
``h_0[t] = E[id_t] + P[p_t]`` with ``p_t = t + 2`` (OPT's offset: the table has two rows more than the
model's positions, and an unpadded sequence never reads the first two).

Block, with ``LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * w + b`` (``eps = 1e-5``) and biases everywhere:
``x = LN_a(h)``; ``q, k, v = x W_q^T + b_q, ...`` split into H heads of size d (no grouped-query attention);
``A_h = softmax(q_h k_h^T / sqrt(d) + M)`` with the causal mask M; ``h' = h + concat_h(A_h v_h) W_o^T + b_o``;
``out = h' + relu(LN_m(h') W_1^T + b_1) W_2^T + b_2``. The final ``LN_f`` feeds the head, tied to ``E``.

Refused in one line: the post-norm layout (``do_layer_norm_before=False``) and the ``project_in`` /
``project_out`` projections (``word_embed_proj_dim != hidden_size``), both of facebook/opt-350m.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from turboboa.arch.attention import causal_mask, grouped_attention
from turboboa.arch.base import ArchAdapter, AttentionShape, Record
from turboboa.arch.decoder import DecoderSpec
from turboboa.arch.layout import Layout, Roles
from turboboa.errors import UserError

POSITION_OFFSET = 2  # p_t = t + 2
LAYER_NORM_EPS = 1e-5  # OPT's nn.LayerNorm default


class OPTAdapter(ArchAdapter):
    """OPT: LayerNorm with bias, learned positions, multi-head attention, ReLU MLP ``fc1``/``fc2``."""

    MODEL_TYPES = ("opt",)
    NAME = "OPT"
    LAYOUT = Layout(
        blocks="model.decoder.layers",
        embedding="model.decoder.embed_tokens",
        positions="model.decoder.embed_positions",
        final_norm="model.decoder.final_layer_norm",
        head="lm_head",
        roles=Roles(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj",
                    up="fc1", down="fc2"),
        attention="self_attn",
        attention_norm="self_attn_layer_norm",
        mlp_norm="final_layer_norm",
    )
    ROTATION_REFUSAL = ("OPT's LayerNorm subtracts the mean and adds a bias, so it does not commute with a "
                        "rotation of the residual stream (QuaRot folds RMSNorms only); use --rotate none "
                        "for OPT")
    PADDING_REFUSAL = ("OPT's LayerNorm takes its mean and variance over every channel, so zero channels "
                       "would change its output; drop --pad-to for OPT")
    GGUF = "llama.cpp has no OPT architecture (learned positions, LayerNorm with bias, ReLU MLP)"

    def check_config(self, hf_config: Any) -> None:
        """Refuse what the adapter does not compute: post-norm blocks, project_in/project_out, LayerNorms
        without weight and bias, a checkpoint without final LayerNorm."""
        reasons = []
        if not getattr(hf_config, "do_layer_norm_before", True):
            reasons.append("post-norm blocks (do_layer_norm_before=False)")
        proj = getattr(hf_config, "word_embed_proj_dim", None)
        if proj is not None and proj != hf_config.hidden_size:
            reasons.append(f"project_in/project_out (word_embed_proj_dim {proj} != hidden_size "
                           f"{hf_config.hidden_size})")
        if not getattr(hf_config, "layer_norm_elementwise_affine", True):
            reasons.append("LayerNorms without weight and bias")
        if getattr(hf_config, "_remove_final_layer_norm", False):
            reasons.append("no final LayerNorm")
        if reasons:
            raise UserError(f"this OPT model has {' and '.join(reasons)}, as facebook/opt-350m does, which turboboa "
                            f"does not compute; use a pre-norm OPT (opt-125m, opt-1.3b and larger)")

    def attention_shape(self, model: nn.Module) -> AttentionShape:
        """H heads of size d = D / H, one KV head per query head, no RoPE."""
        cfg = model.config
        n_heads = int(cfg.num_attention_heads)
        return AttentionShape(n_heads, n_heads, int(cfg.hidden_size) // n_heads, int(cfg.hidden_size), rope=False)

    def rotary_cos_sin(
        self, model: nn.Module, seqlen: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[None, None]:
        """No RoPE: ``(None, None)`` (the rotation R_t is the identity)."""
        if seqlen < 1:
            raise UserError(f"seqlen must be a positive number of tokens, got {seqlen}; pass seqlen >= 1")
        return None, None

    def embed(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """``h_0[t] = E[id_t] + P[t + 2]``, (B, L, D), for an unpadded batch of token ids (B, L)."""
        emb = self.embed_tokens(model)
        table = self._module(model, self.LAYOUT.positions)
        ids = input_ids.to(emb.weight.device)
        positions = torch.arange(ids.shape[1], device=ids.device) + POSITION_OFFSET
        return emb(ids) + table.weight[positions].to(emb.weight.device)

    def block_forward(
        self, block: nn.Module, hidden: Tensor, cos: Tensor | None = None, sin: Tensor | None = None,
        record: Record | None = None,
    ) -> Tensor:
        """One pre-norm OPT block from its own submodules (module docstring); ``cos``/``sin`` are unused.

        Attention in float32; the recorded queries are ``x W_q^T + b_q`` before the ``1 / sqrt(d)`` scale.
        """
        attn = block.self_attn
        batch, seqlen, _ = hidden.shape
        n_heads = int(attn.num_heads)
        head_dim = int(attn.head_dim)

        x = block.self_attn_layer_norm(hidden)
        q = attn.q_proj(x).view(batch, seqlen, n_heads, head_dim).transpose(1, 2).float()
        k = attn.k_proj(x).view(batch, seqlen, n_heads, head_dim).transpose(1, 2).float()
        v = attn.v_proj(x).view(batch, seqlen, n_heads, head_dim).transpose(1, 2).float()
        out, probs = grouped_attention(q, k, v, float(attn.scaling), causal_mask(seqlen, hidden.device))
        if record is not None:
            record("attn_input", x)
            record("q_rope", q)
            record("k_rope", k)
            record("attn_probs", probs.view(batch, n_heads, seqlen, seqlen))

        out = out.transpose(1, 2).reshape(batch, seqlen, n_heads * head_dim).to(hidden.dtype)
        hidden = hidden + attn.out_proj(out)
        y = block.final_layer_norm(hidden)
        return hidden + block.fc2(block.activation_fn(block.fc1(y)))

    def decoder_spec(self, hf_config: Any) -> DecoderSpec:
        """LayerNorm blocks, a ReLU MLP, learned positions at ``t + 2``; another activation is refused."""
        act = getattr(hf_config, "activation_function", "relu")
        if act != "relu":
            raise UserError(f"ONNX export computes OPT's ReLU MLP, but this model uses {act!r}")
        heads = int(hf_config.num_attention_heads)
        hidden = int(hf_config.hidden_size)
        return DecoderSpec(model_type=hf_config.model_type, layout=self.LAYOUT, hidden=hidden, heads=heads,
                           kv_heads=heads, head_dim=hidden // heads, intermediate=int(hf_config.ffn_dim),
                           vocab=int(hf_config.vocab_size), layers=int(hf_config.num_hidden_layers),
                           eps=LAYER_NORM_EPS, tied=bool(getattr(hf_config, "tie_word_embeddings", True)),
                           max_positions=int(hf_config.max_position_embeddings), norm="layer",
                           activation="relu", gated=False, rope=False, position_offset=POSITION_OFFSET)
