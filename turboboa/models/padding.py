"""``--pad-to M``: widen a Llama-family model so every linear layer's input width is a multiple of ``M``,
computing exactly the same function (so ggml's 256-column k-quants fit every tensor).

With ``r = d / d'`` (old over new hidden size):

* residual stream: ``d' - d`` zero channels appended. Embedding and head get zero columns, layers writing to
  the stream (o_proj, down_proj) zero rows, layers reading it (q/k/v, gate/up) zero columns.
* RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * w``. The mean over ``d'`` channels is ``r`` times the mean over
  the ``d`` real ones, so with ``eps' = r eps`` and ``w' = w / sqrt(r)`` on the real channels (0 on the padding)
  every norm output is unchanged: ``x / sqrt(r (mean_d(x^2) + eps)) * w / sqrt(r)``... scaled back exactly.
* attention: query heads are added (zero q rows, zero o_proj columns) until ``n_heads' * head_dim`` is a
  multiple of ``M`` and of the KV-group size. They are placed so grouped-query attention keeps its mapping:
  query head ``h`` reads KV head ``h // (n_heads / n_kv)``, so each KV head's group gets its new heads at its
  end. A zero query row gives uniform attention, but its o_proj columns are zero, so it adds nothing.
* MLP: ``I' - I`` zero gate/up rows and zero down_proj columns (``silu(0) * 0 = 0``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from turboboa.errors import UserError


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def padded_heads(n_heads: int, n_kv: int, head_dim: int, multiple: int) -> int:
    """The smallest ``n' >= n_heads``, a multiple of ``n_kv``, with ``n' * head_dim`` a multiple of ``multiple``."""
    n = n_heads
    while n % n_kv or (n * head_dim) % multiple:
        n += 1
        if n > 64 * n_heads:
            raise UserError(f"cannot pad {n_heads} heads of {head_dim} to a multiple of {multiple} columns")
    return n


def head_positions(n_heads: int, n_kv: int, new_heads: int) -> list[int]:
    """New index of each original query head: group ``g`` of ``n_heads / n_kv`` heads starts at
    ``g * new_heads / n_kv``, so every head keeps its KV head."""
    per, new_per = n_heads // n_kv, new_heads // n_kv
    return [(h // per) * new_per + h % per for h in range(n_heads)]


def _place(t: torch.Tensor, dim: int, size: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """``t`` widened to ``size`` along ``dim`` with zeros; original slices at ``index`` (default: the start)."""
    shape = list(t.shape)
    shape[dim] = size
    out = t.new_zeros(shape)
    if index is None:
        index = torch.arange(t.shape[dim])
    return out.index_copy(dim, index.to(t.device), t)


def _set_linear(module: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    module.weight = nn.Parameter(weight, requires_grad=False)
    module.in_features, module.out_features = weight.shape[1], weight.shape[0]
    if module.bias is not None:
        module.bias = nn.Parameter(bias if bias is not None else module.bias, requires_grad=False)


def pad_model(model: Any, multiple: int) -> dict[str, int]:
    """Pad ``model`` (a transformers Llama/Mistral/Qwen2 causal LM, in place) so every linear input width is a
    multiple of ``multiple``; returns what changed (old and new sizes). The function is unchanged."""
    cfg = model.config
    if cfg.model_type not in ("llama", "mistral", "qwen2"):
        raise UserError(f"--pad-to supports llama, mistral and qwen2 models, not {cfg.model_type}")
    d, n_h, n_kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // n_h
    inter = cfg.intermediate_size
    d2, inter2 = _round_up(d, multiple), _round_up(inter, multiple)
    n_h2 = padded_heads(n_h, n_kv, hd, multiple)
    report = {"hidden": d, "hidden_padded": d2, "heads": n_h, "heads_padded": n_h2,
              "intermediate": inter, "intermediate_padded": inter2}
    if (d2, n_h2, inter2) == (d, n_h, inter):
        return report
    r = d / d2
    rows_q = torch.cat([torch.arange(p * hd, (p + 1) * hd) for p in head_positions(n_h, n_kv, n_h2)])
    norm_scale = math.sqrt(r)
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight = nn.Parameter(_place(emb.weight.data, 1, d2), requires_grad=False)
        emb.embedding_dim = d2
        norms = [model.model.norm] + [m for layer in model.model.layers
                                      for m in (layer.input_layernorm, layer.post_attention_layernorm)]
        for norm in norms:
            norm.weight = nn.Parameter(_place(norm.weight.data * norm_scale, 0, d2), requires_grad=False)
            eps_name = "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps"
            setattr(norm, eps_name, getattr(norm, eps_name) * r)
        for layer in model.model.layers:
            att, mlp = layer.self_attn, layer.mlp
            q = att.q_proj
            _set_linear(q, _place(_place(q.weight.data, 1, d2), 0, n_h2 * hd, rows_q),
                        None if q.bias is None else _place(q.bias.data, 0, n_h2 * hd, rows_q))
            for lin in (att.k_proj, att.v_proj):
                _set_linear(lin, _place(lin.weight.data, 1, d2), None)
            o = att.o_proj
            _set_linear(o, _place(_place(o.weight.data, 1, n_h2 * hd, rows_q), 0, d2),
                        None if o.bias is None else _place(o.bias.data, 0, d2))
            for lin in (mlp.gate_proj, mlp.up_proj):
                _set_linear(lin, _place(_place(lin.weight.data, 1, d2), 0, inter2), None)
            _set_linear(mlp.down_proj, _place(_place(mlp.down_proj.weight.data, 1, inter2), 0, d2), None)
            att.head_dim = hd
            if hasattr(att, "num_heads"):
                att.num_heads = n_h2
            if hasattr(att, "num_key_value_groups"):
                att.num_key_value_groups = n_h2 // n_kv
        head = model.get_output_embeddings()
        if head is not None and head.weight is not emb.weight:
            head.weight = nn.Parameter(_place(head.weight.data, 1, d2), requires_grad=False)
            head.in_features = d2
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = d2, n_h2, inter2
    cfg.head_dim = hd
    cfg.rms_norm_eps = cfg.rms_norm_eps * r
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return report
