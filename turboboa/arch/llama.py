"""Adapters for Llama-style decoders: Llama (1-3), Mistral and Qwen2.

Block: pre-norm RMSNorm -> q/k/v (optional bias) -> RoPE ("rotate_half" convention) -> GQA causal softmax
attention (optional sliding window) -> o_proj -> residual -> RMSNorm -> SwiGLU MLP -> residual.
The three share module names and block structure; they differ in q/k/v biases (found in the weights), in
their sliding windows and in the llama.cpp architecture they export to.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from turboboa.arch.attention import causal_mask, grouped_attention
from turboboa.arch.base import ArchAdapter, AttentionShape, GgufArch, Record
from turboboa.arch.decoder import DecoderSpec
from turboboa.arch.layout import Layout, Roles
from turboboa.errors import UserError

__all__ = ["LlamaAdapter", "MistralAdapter", "Qwen2Adapter", "apply_rope", "causal_mask", "rotate_half"]

ROTARY = "model.rotary_emb"  # the model's rotary embedding module (its class computes every rope type)


def rotate_half(x: Tensor) -> Tensor:
    """J x with J = [[0, -I], [I, 0]] on the last dim: rotate_half([x1, x2]) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x~_t = R_t x_t = x_t * c_t + rotate_half(x_t) * s_t, with cos, sin broadcast over x's (..., L, d)."""
    return x * cos + rotate_half(x) * sin


def rotary_module(hf_config: Any) -> nn.Module:
    """A CPU instance of the model's rotary embedding class, built from ``hf_config`` (the model itself is
    only instantiated on the meta device to find the class)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    cls = type(model.get_submodule(ROTARY))
    try:
        return cls(config=hf_config)
    except TypeError:
        return cls(hf_config)


class LlamaAdapter(ArchAdapter):
    """Llama: the block of the module docstring, no sliding window; exports to llama.cpp's ``llama``."""

    MODEL_TYPES = ("llama",)
    NAME = "Llama"
    LAYOUT = Layout(
        blocks="model.layers",
        embedding="model.embed_tokens",
        final_norm="model.norm",
        head="lm_head",
        roles=Roles(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
                    gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj"),
        attention="self_attn",
        attention_norm="input_layernorm",
        mlp_norm="post_attention_layernorm",
    )
    GGUF = GgufArch("llama", permute_qk=True, qkv_bias=False)

    def attention_shape(self, model: nn.Module) -> AttentionShape:
        """Read H, G, d, D from the HF config; d defaults to D / H and G to H when absent."""
        cfg = model.config
        n_heads = int(cfg.num_attention_heads)
        n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
        return AttentionShape(n_heads, n_kv, head_dim, int(cfg.hidden_size))

    def rotary_cos_sin(
        self, model: nn.Module, seqlen: int, device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, Tensor]:
        """cos, sin (seqlen, d) from the model's own rotary module at positions 0..seqlen-1 (float32 inside).

        Rope-scaling variants (llama3, yarn, linear, ...) and their attention factor come from the HF module.
        """
        cos, sin = self.rotary_tables(model, seqlen, device)
        return cos.to(dtype), sin.to(dtype)

    def rotary_tables(self, model: nn.Module, seqlen: int, device: torch.device | str,
                      *layer_type: str) -> tuple[Tensor, Tensor]:
        """float32 cos, sin (seqlen, d) of the model's rotary module at positions 0..seqlen-1 (``layer_type``:
        the module's argument choosing a layer type's base, for families that have several)."""
        if seqlen < 1:
            raise UserError(f"seqlen must be a positive number of tokens, got {seqlen}; pass seqlen >= 1")
        rotary = self._module(model, ROTARY)
        head_dim = self.attention_shape(model).head_dim
        probe = torch.zeros(1, seqlen, head_dim, device=device, dtype=torch.float32)
        positions = torch.arange(seqlen, device=device).unsqueeze(0)
        cos, sin = rotary(probe, positions, *layer_type)
        return cos[0], sin[0]

    def rope_tables(self, hf_config: Any, positions: int, table: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(cos, sin)``, each float32 ``(positions, head_dim)``, for positions ``0 .. positions - 1``, from
        the rotary module built from ``hf_config`` (the one the fake-quant torch model uses, so every
        ``rope_type`` and its attention factor come out as transformers computes them:
        ``cos[t] = cos(t * inv_freq) * attention_scaling`` over the doubled frequencies, likewise ``sin``).
        The angle of position ``t`` is one float32 product, so a table sliced to ``T`` rows equals what the
        torch model computes for a window of ``T`` tokens. Llama has the one table 0."""
        return self._rope_tables(hf_config, positions)

    @staticmethod
    def _rope_tables(hf_config: Any, positions: int, *layer_type: str) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rope_tables` of the rotary module's table for ``layer_type`` (its default without one)."""
        head_dim = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads)
        rotary = rotary_module(hf_config)
        probe = torch.zeros(1, positions, head_dim, dtype=torch.float32)
        ids = torch.arange(positions).unsqueeze(0)
        with torch.no_grad():
            cos, sin = rotary(probe, ids, *layer_type)
        return (np.ascontiguousarray(cos[0].float().numpy()), np.ascontiguousarray(sin[0].float().numpy()))

    def embed(self, model: nn.Module, input_ids: Tensor) -> Tensor:
        """h_0 = E[input_ids], (B, L, D)."""
        emb = self.embed_tokens(model)
        return emb(input_ids.to(emb.weight.device))

    @staticmethod
    def sliding_window(block: nn.Module) -> int | None:
        """Attention window of this block: Qwen2 sets it per layer, Mistral in its config, Llama has none."""
        attn = block.self_attn
        if hasattr(attn, "sliding_window"):
            return attn.sliding_window
        return getattr(getattr(attn, "config", None), "sliding_window", None)

    @staticmethod
    def config_window(hf_config: Any) -> int | None:
        """The sliding window a config applies to some layer (Qwen2: ``use_sliding_window`` or a
        ``sliding_attention`` layer type), None for full causal attention everywhere."""
        window = getattr(hf_config, "sliding_window", None)
        sliding = "sliding_attention" in (getattr(hf_config, "layer_types", None) or ())
        return window if window and (sliding or getattr(hf_config, "use_sliding_window", False)) else None

    def layer_windows(self, hf_config: Any) -> tuple[int | None, ...]:
        """The sliding window of each layer (None: full causal attention): the config's window on its
        ``sliding_attention`` layers, or on every layer when it names no layer types."""
        window = self.config_window(hf_config)
        n_layers = int(hf_config.num_hidden_layers)
        if not window:
            return (None,) * n_layers
        types = getattr(hf_config, "layer_types", None)
        if not types:
            return (int(window),) * n_layers
        return tuple(int(window) if t == "sliding_attention" else None for t in types)

    def decoder_spec(self, hf_config: Any) -> DecoderSpec:
        """The decoder of the module docstring, with the config's per-layer sliding windows; a UserError for
        what the graph does not compute (another activation, an odd head size)."""
        act = getattr(hf_config, "hidden_act", "silu")
        if act != "silu":
            raise UserError(f"ONNX export computes a SiLU-gated MLP, but this model uses {act!r}")
        heads = int(hf_config.num_attention_heads)
        kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
        hidden = int(hf_config.hidden_size)
        head_dim = int(getattr(hf_config, "head_dim", None) or hidden // heads)
        if heads % kv_heads or head_dim % 2:
            raise UserError(f"{heads} query heads over {kv_heads} KV heads of size {head_dim} is not a valid "
                            f"grouped-query layout for RoPE")
        return DecoderSpec(model_type=hf_config.model_type, layout=self.LAYOUT, hidden=hidden, heads=heads,
                           kv_heads=kv_heads, head_dim=head_dim, intermediate=int(hf_config.intermediate_size),
                           vocab=int(hf_config.vocab_size), layers=int(hf_config.num_hidden_layers),
                           eps=float(hf_config.rms_norm_eps),
                           tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
                           max_positions=int(getattr(hf_config, "max_position_embeddings", 2048)),
                           windows=self.layer_windows(hf_config))

    @staticmethod
    def normalize_heads(attn: nn.Module, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """The queries and keys (B, L, heads, d) as the attention reads them before RoPE: Llama's as projected."""
        return q, k

    @staticmethod
    def head_gains(attn: nn.Module) -> tuple[Tensor | None, Tensor | None]:
        """The gains ``(gamma_q, gamma_k)`` (d,) of per-head q/k norms, recorded for the row Hessians
        (:mod:`turboboa.hessians.attention`); Llama has no such norms."""
        return None, None

    def block_forward(
        self, block: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, record: Record | None = None
    ) -> Tensor:
        """One decoder block from its own submodules.

        x = norm1(h); q, k, v = Wq x, Wk x, Wv x (per head, q and k through :meth:`normalize_heads`);
        q~, k~ = RoPE(q), RoPE(k);
        A_h = softmax(scale * q~_h k~_{g(h)}^T + causal mask) (float32); o_h = A_h v_{g(h)};
        h' = h + Wo [o_1..o_H]; out = h' + W_down(act(W_gate y) * W_up y) with y = norm2(h').
        """
        attn, mlp = block.self_attn, block.mlp
        batch, seqlen, _ = hidden.shape
        head_dim = int(attn.head_dim)
        n_heads = attn.q_proj.out_features // head_dim
        n_kv = attn.k_proj.out_features // head_dim
        if cos.shape[-2] < seqlen:
            raise UserError(
                f"RoPE tables cover {cos.shape[-2]} positions but the input has {seqlen} tokens; "
                f"compute cos/sin with rotary_cos_sin(model, seqlen={seqlen}, ...)"
            )
        cos = cos[..., :seqlen, :].to(device=hidden.device, dtype=torch.float32).unsqueeze(-3)
        sin = sin[..., :seqlen, :].to(device=hidden.device, dtype=torch.float32).unsqueeze(-3)

        x = block.input_layernorm(hidden)
        q, k = self.normalize_heads(attn, attn.q_proj(x).view(batch, seqlen, n_heads, head_dim),
                                    attn.k_proj(x).view(batch, seqlen, n_kv, head_dim))
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()
        v = attn.v_proj(x).view(batch, seqlen, n_kv, head_dim).transpose(1, 2).float()
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        scale = float(getattr(attn, "scaling", head_dim**-0.5))
        mask = causal_mask(seqlen, hidden.device, self.sliding_window(block))
        out, probs = grouped_attention(q, k, v, scale, mask)
        if record is not None:
            record("attn_input", x)
            record("q_rope", q)
            record("k_rope", k)
            record("attn_probs", probs.view(batch, n_heads, seqlen, seqlen))
            for name, gain in zip(("q_gain", "k_gain"), self.head_gains(attn), strict=True):
                if gain is not None:
                    record(name, gain)

        out = out.transpose(1, 2).reshape(batch, seqlen, n_heads * head_dim).to(hidden.dtype)
        hidden = hidden + attn.o_proj(out)
        y = block.post_attention_layernorm(hidden)
        return hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(y)) * mlp.up_proj(y))


class MistralAdapter(LlamaAdapter):
    """Mistral: Llama's block with the config's sliding window on every layer."""

    MODEL_TYPES = ("mistral",)
    NAME = "Mistral"

    @staticmethod
    def config_window(hf_config: Any) -> int | None:
        """Mistral's ``sliding_window`` applies to every layer when it is set."""
        return getattr(hf_config, "sliding_window", None) or None


class Qwen2Adapter(LlamaAdapter):
    """Qwen2: Llama's block with q/k/v biases and optional per-layer windows; llama.cpp's ``qwen2``."""

    MODEL_TYPES = ("qwen2",)
    NAME = "Qwen2"
    GGUF = GgufArch("qwen2", permute_qk=False, qkv_bias=True)
