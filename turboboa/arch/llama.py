"""Adapter for Llama-style decoders: Llama (1-3), Mistral and Qwen2.

Block: pre-norm RMSNorm -> q/k/v (optional bias) -> RoPE ("rotate_half" convention) -> GQA causal softmax
attention (optional sliding window) -> o_proj -> residual -> RMSNorm -> SwiGLU MLP -> residual.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from turboboa.arch.base import ArchAdapter, AttentionShape, Record
from turboboa.errors import UserError


def rotate_half(x: Tensor) -> Tensor:
    """J x with J = [[0, -I], [I, 0]] on the last dim: rotate_half([x1, x2]) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x~_t = R_t x_t = x_t * c_t + rotate_half(x_t) * s_t, with cos, sin broadcast over x's (..., L, d)."""
    return x * cos + rotate_half(x) * sin


def causal_mask(seqlen: int, device: torch.device, sliding_window: int | None = None) -> Tensor:
    """Boolean (L, L) mask, True where query i may NOT attend key j: j > i, or j <= i - window if windowed."""
    ones = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
    masked = torch.triu(ones, diagonal=1)
    if sliding_window is not None and sliding_window < seqlen:
        masked |= torch.tril(ones, diagonal=-sliding_window)
    return masked


def _decoder(model: nn.Module) -> nn.Module:
    """The base decoder (``model.model`` of a CausalLM), or ``model`` itself if it is the base decoder."""
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "layers"):
        return inner
    if hasattr(model, "layers"):
        return model
    raise UserError(
        f"{type(model).__name__} has no decoder layers at .model.layers; pass the *ForCausalLM model itself"
    )


class LlamaAdapter(ArchAdapter):
    """Llama, Mistral and Qwen2 share module names and block structure; they differ in q/k/v bias and windows."""

    MODEL_TYPES = ("llama", "mistral", "qwen2")
    LINEAR_GROUPS = [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """``model.model.layers``."""
        return _decoder(model).layers

    def embed_tokens(self, model: nn.Module) -> nn.Module:
        """``model.model.embed_tokens``."""
        return _decoder(model).embed_tokens

    def final_norm(self, model: nn.Module) -> nn.Module:
        """``model.model.norm``."""
        return _decoder(model).norm

    def lm_head(self, model: nn.Module) -> nn.Module:
        """``model.lm_head``."""
        head = getattr(model, "lm_head", None)
        if head is None:
            raise UserError(f"{type(model).__name__} has no lm_head; load the model with AutoModelForCausalLM")
        return head

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
        """cos, sin (seqlen, d) from the model's own ``rotary_emb`` at positions 0..seqlen-1 (float32 inside).

        Rope-scaling variants (llama3, yarn, linear, ...) and their attention factor come from the HF module.
        """
        if seqlen < 1:
            raise UserError(f"seqlen must be a positive number of tokens, got {seqlen}; pass seqlen >= 1")
        rotary = _decoder(model).rotary_emb
        head_dim = self.attention_shape(model).head_dim
        probe = torch.zeros(1, seqlen, head_dim, device=device, dtype=torch.float32)
        positions = torch.arange(seqlen, device=device).unsqueeze(0)
        cos, sin = rotary(probe, positions)
        return cos[0].to(dtype), sin[0].to(dtype)

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

    def block_forward(
        self, block: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor, record: Record | None = None
    ) -> Tensor:
        """One decoder block from its own submodules.

        x = norm1(h); q, k, v = Wq x, Wk x, Wv x (per head); q~, k~ = RoPE(q), RoPE(k);
        A_h = softmax(scale * q~_h k~_{g(h)}^T + causal mask) (float32); o_h = A_h v_{g(h)};
        h' = h + Wo [o_1..o_H]; out = h' + W_down(act(W_gate y) * W_up y) with y = norm2(h').
        """
        attn, mlp = block.self_attn, block.mlp
        batch, seqlen, _ = hidden.shape
        head_dim = int(attn.head_dim)
        n_heads = attn.q_proj.out_features // head_dim
        n_kv = attn.k_proj.out_features // head_dim
        group = n_heads // n_kv
        if cos.shape[-2] < seqlen:
            raise UserError(
                f"RoPE tables cover {cos.shape[-2]} positions but the input has {seqlen} tokens; "
                f"compute cos/sin with rotary_cos_sin(model, seqlen={seqlen}, ...)"
            )
        cos = cos[..., :seqlen, :].to(device=hidden.device, dtype=torch.float32).unsqueeze(-3)
        sin = sin[..., :seqlen, :].to(device=hidden.device, dtype=torch.float32).unsqueeze(-3)

        x = block.input_layernorm(hidden)
        q = attn.q_proj(x).view(batch, seqlen, n_heads, head_dim).transpose(1, 2).float()
        k = attn.k_proj(x).view(batch, seqlen, n_kv, head_dim).transpose(1, 2).float()
        v = attn.v_proj(x).view(batch, seqlen, n_kv, head_dim).transpose(1, 2).float()
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        # GQA without materialising repeated KV: query heads of group g are rows (B, G, r, L, d).
        scale = float(getattr(attn, "scaling", head_dim**-0.5))
        q_grouped = q.view(batch, n_kv, group, seqlen, head_dim)
        scores = torch.matmul(q_grouped, k.unsqueeze(2).transpose(-1, -2)) * scale
        mask = causal_mask(seqlen, hidden.device, self.sliding_window(block))
        probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
        out = torch.matmul(probs, v.unsqueeze(2)).view(batch, n_heads, seqlen, head_dim)
        if record is not None:
            record("attn_input", x)
            record("q_rope", q)
            record("k_rope", k)
            record("attn_probs", probs.view(batch, n_heads, seqlen, seqlen))

        out = out.transpose(1, 2).reshape(batch, seqlen, n_heads * head_dim).to(hidden.dtype)
        hidden = hidden + attn.o_proj(out)
        y = block.post_attention_layernorm(hidden)
        return hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(y)) * mlp.up_proj(y))
