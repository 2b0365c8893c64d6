"""Adapter for Gemma 3 text decoders (Hugging Face ``Gemma3ForCausalLM``, ``model_type == "gemma3_text"``).

Norms: ``RMSNorm(x) = x / sqrt(mean(x^2) + eps) * (1 + w)`` in float32. Embedding: ``h_0 = E[ids] * sqrt(D)``
(the scale rounded to the weights' dtype, as the HF embedding module computes it). Block:

``x = N_in(h)``; ``q, k, v = x W_q^T, x W_k^T, x W_v^T`` per head; ``q^ = N_q(q)``, ``k^ = N_k(k)`` per head (over
``d``); ``q~ = R_t q^``, ``k~ = R_t k^`` with the RoPE base of the layer's type (``rope_parameters``: a local base
for ``sliding_attention`` layers, a global one for ``full_attention``); ``A = softmax(q~ k~^T s + M)`` with
``s = query_pre_attn_scalar^-1/2`` and ``M`` causal, limited to the last ``sliding_window`` keys on sliding
layers; ``h' = h + N_post_a(concat_h(A v) W_o^T)``; ``h'' = h' + N_post_m(W_down(gelu_tanh(W_gate y) * W_up y))``
with ``y = N_pre_m(h')``. Final ``N_f`` and a head tied to ``E``.

The post-norms sit on the residual stream's writers: ``N_post_a(o Q)`` is not ``N_post_a(o) Q``, so a rotation
of the residual stream cannot be folded; padding is refused for the same reason (the post-norms' RMS would
normalize the writers' outputs over every channel, padded ones included). llama.cpp
computes the block as its ``gemma3`` architecture, whose norms store ``1 + w``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from turboboa.arch.attention import causal_mask, grouped_attention
from turboboa.arch.base import GgufArch, Record
from turboboa.arch.decoder import DecoderSpec
from turboboa.arch.llama import LlamaAdapter, apply_rope
from turboboa.errors import UserError

LAYER_TYPES = ("full_attention", "sliding_attention")  # index of each type's RoPE table in rotary_cos_sin


class Gemma3Adapter(LlamaAdapter):
    """Gemma 3: four norms per block, per-head q/k norms, GeGLU MLP, local/global RoPE; llama.cpp's ``gemma3``."""

    MODEL_TYPES = ("gemma3_text",)
    NAME = "Gemma 3"
    LAYOUT = dataclasses.replace(
        LlamaAdapter.LAYOUT, mlp_norm="pre_feedforward_layernorm", q_norm="self_attn.q_norm",
        k_norm="self_attn.k_norm", attention_post_norm="post_attention_layernorm",
        mlp_post_norm="post_feedforward_layernorm")
    # kernel_tol: on gemma-3-270m (TurboBoA q4_0, 8 windows of 512) the fake-quant weights as an F32 file score
    # +0.0099% from the torch model (KL 4.9e-6) and the q4_0 file of the same weights +1.05% (KL 0.0082), every
    # weight exact (bench/results/gemma-3-270m-run.md): the rounding of llama.cpp's 8-bit activation blocks,
    # above the default model's largest gap (+0.84%); the limit leaves twice the measured gap
    GGUF = GgufArch("gemma3", permute_qk=False, qkv_bias=False, norm_offset=1.0, sliding_window=True,
                    kernel_tol=0.02)
    ROTATION_REFUSAL = ("Gemma 3 normalizes the attention's and the MLP's outputs (post-norms) before they join "
                        "the residual stream, so a rotation of the stream cannot be folded into the weights; "
                        "use --rotate none for Gemma 3")
    PADDING_REFUSAL = ("Gemma 3's post-norms and its (1 + w) norm gains act on every residual channel, so "
                       "padded channels would not stay zero; drop --pad-to for Gemma 3")
    def check_config(self, hf_config: Any) -> None:
        """Refuse attention or final logit soft-capping (Gemma 2's), which the adapter does not compute."""
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(hf_config, key, None):
                raise UserError(f"this Gemma 3 model sets {key}, which turboboa does not compute; use a Gemma 3 "
                                f"without logit soft-capping")

    def check_gguf_config(self, hf_config: Any) -> None:
        """llama.cpp's gemma3 fixes what the config may vary: every 6th layer global (the others sliding), the
        local RoPE base 10000 and the score scale ``head_dim^-1/2``; another config is refused in one line."""
        n_layers = int(hf_config.num_hidden_layers)
        pattern = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
        local = dict((getattr(hf_config, "rope_parameters", None) or {}).get("sliding_attention") or {})
        head_dim = int(hf_config.head_dim)
        reasons = []
        if list(getattr(hf_config, "layer_types", pattern)) != pattern:
            reasons.append("layer types other than 5 sliding : 1 global")
        if float(local.get("rope_theta", 10000.0)) != 10000.0 or local.get("rope_type", "default") != "default":
            reasons.append(f"a local RoPE other than base 10000 ({local})")
        if int(getattr(hf_config, "query_pre_attn_scalar", head_dim)) != head_dim:
            reasons.append(f"query_pre_attn_scalar {hf_config.query_pre_attn_scalar} != head_dim {head_dim}")
        if reasons:
            raise UserError(f"llama.cpp's gemma3 does not compute this Gemma 3 ({'; '.join(reasons)}); "
                            f"export it with another backend")

    def rotary_cos_sin(
        self, model: nn.Module, seqlen: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """cos, sin (2, seqlen, d): the RoPE tables of ``full_attention`` (row 0) and ``sliding_attention``
        (row 1) layers, each from the model's rotary module with that layer type's base."""
        tables = [self.rotary_tables(model, seqlen, device, layer_type) for layer_type in LAYER_TYPES]
        cos = torch.stack([c for c, _ in tables]).to(dtype)
        sin = torch.stack([s for _, s in tables]).to(dtype)
        return cos, sin

    @staticmethod
    def head_gains(attn: nn.Module) -> tuple[Tensor | None, Tensor | None]:
        """``(1 + w_q, 1 + w_k)``: Gemma's RMSNorm gain."""
        return 1.0 + attn.q_norm.weight.float(), 1.0 + attn.k_norm.weight.float()

    @staticmethod
    def normalize_heads(attn: nn.Module, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """``(N_q(q), N_k(k))`` per head over the last dim, with the model's own norms."""
        return attn.q_norm(q), attn.k_norm(k)

    def block_forward(
        self, block: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, record: Record | None = None
    ) -> Tensor:
        """One Gemma 3 block (module docstring) from its own submodules; ``cos``/``sin`` (2, L', d) from
        :meth:`rotary_cos_sin`, the block taking its layer type's row. Records as Llama's, plus the gains of the
        q/k norms and the RoPE tables the block used (``rope_cos``, ``rope_sin``, (L, d))."""
        attn, mlp = block.self_attn, block.mlp
        batch, seqlen, _ = hidden.shape
        head_dim = int(attn.head_dim)
        n_heads = attn.q_proj.out_features // head_dim
        n_kv = attn.k_proj.out_features // head_dim
        if cos.dim() != 3 or cos.shape[-2] < seqlen:
            raise UserError(f"Gemma 3 blocks take RoPE tables (2, L, d) for L >= {seqlen} tokens; compute them "
                            f"with rotary_cos_sin(model, seqlen={seqlen}, ...)")
        sliding = bool(getattr(attn, "is_sliding", False))
        cos_t = cos[int(sliding), :seqlen].to(device=hidden.device, dtype=torch.float32)
        sin_t = sin[int(sliding), :seqlen].to(device=hidden.device, dtype=torch.float32)

        x = block.input_layernorm(hidden)
        q, k = self.normalize_heads(attn, attn.q_proj(x).view(batch, seqlen, n_heads, head_dim),
                                    attn.k_proj(x).view(batch, seqlen, n_kv, head_dim))
        q = apply_rope(q.transpose(1, 2).float(), cos_t[None], sin_t[None])
        k = apply_rope(k.transpose(1, 2).float(), cos_t[None], sin_t[None])
        v = attn.v_proj(x).view(batch, seqlen, n_kv, head_dim).transpose(1, 2).float()
        mask = causal_mask(seqlen, hidden.device, attn.sliding_window if sliding else None)
        out, probs = grouped_attention(q, k, v, float(attn.scaling), mask)
        if record is not None:
            record("attn_input", x)
            record("q_rope", q)
            record("k_rope", k)
            record("attn_probs", probs.view(batch, n_heads, seqlen, seqlen))
            gain_q, gain_k = self.head_gains(attn)
            record("q_gain", gain_q)
            record("k_gain", gain_k)
            record("rope_cos", cos_t)
            record("rope_sin", sin_t)

        out = out.transpose(1, 2).reshape(batch, seqlen, n_heads * head_dim).to(hidden.dtype)
        hidden = hidden + block.post_attention_layernorm(attn.o_proj(out))
        y = block.pre_feedforward_layernorm(hidden)
        return hidden + block.post_feedforward_layernorm(mlp.down_proj(mlp.act_fn(mlp.gate_proj(y)) * mlp.up_proj(y)))

    def rope_tables(self, hf_config: Any, positions: int, table: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(cos, sin)`` float32 ``(positions, d)`` of the layer type ``LAYER_TYPES[table]``: 0 the global
        (``full_attention``) base, 1 the local (``sliding_attention``) one, as the model's rotary module
        computes them."""
        return self._rope_tables(hf_config, positions, LAYER_TYPES[table])

    def decoder_spec(self, hf_config: Any) -> DecoderSpec:
        """The Gemma 3 decoder (module docstring): (1 + w) RMSNorms, per-head q/k norms and post-norms (from
        the layout), a GeGLU MLP with tanh GELU, ``E[ids] * sqrt(D)``, the score scale
        ``query_pre_attn_scalar^-1/2`` and, per layer, its type's RoPE table and window."""
        act = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
        if act != "gelu_pytorch_tanh":
            raise UserError(f"ONNX export computes Gemma 3's tanh-GELU MLP, but this model uses {act!r}")
        self.check_config(hf_config)
        n_layers = int(hf_config.num_hidden_layers)
        types = list(getattr(hf_config, "layer_types", None) or ["full_attention"] * n_layers)
        unknown = sorted(set(types) - set(LAYER_TYPES))
        if unknown:
            raise UserError(f"this Gemma 3 model has layer types {unknown}; turboboa computes {list(LAYER_TYPES)}")
        window = int(hf_config.sliding_window)
        hidden = int(hf_config.hidden_size)
        return DecoderSpec(
            model_type=hf_config.model_type, layout=self.LAYOUT, hidden=hidden,
            heads=int(hf_config.num_attention_heads), kv_heads=int(hf_config.num_key_value_heads),
            head_dim=int(hf_config.head_dim), intermediate=int(hf_config.intermediate_size),
            vocab=int(hf_config.vocab_size), layers=n_layers, eps=float(hf_config.rms_norm_eps),
            tied=bool(getattr(hf_config, "tie_word_embeddings", True)),
            max_positions=int(hf_config.max_position_embeddings), activation="gelu_tanh", norm_offset=1.0,
            embed_scale=float(np.float32(hidden**0.5)),
            attention_scale=float(hf_config.query_pre_attn_scalar) ** -0.5,
            windows=tuple(window if t == "sliding_attention" else None for t in types),
            rope_table=tuple(LAYER_TYPES.index(t) for t in types))
