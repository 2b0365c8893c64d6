"""``--pad-to M``: widen an RMSNorm decoder so every linear layer's input width is a multiple of ``M``,
computing exactly the same function (so ggml's 256-column k-quants fit every tensor). Layers are named by
role (:mod:`turboboa.arch.layout`); a family whose norm is not preserved by zero channels (OPT's LayerNorm)
is refused in one line with its adapter's reason.

With ``r = d / d'`` (old over new hidden size):

* residual stream: ``d' - d`` zero channels appended. Embedding and head get zero columns, layers writing to
  the stream (o, down) zero rows, layers reading it (q/k/v, gate/up) zero columns.
* RMSNorm: ``y = x / sqrt(mean(x^2) + eps) * w``. The mean over ``d'`` channels is ``r`` times the mean over
  the ``d`` real ones, so with ``eps' = r eps`` and ``w' = w / sqrt(r)`` on the real channels (0 on the padding)
  every norm output is unchanged: ``x / sqrt(r (mean_d(x^2) + eps)) * w / sqrt(r)``... scaled back exactly.
* attention: query heads are added (zero q rows, zero o columns) until ``n_heads' * head_dim`` is a
  multiple of ``M`` and of the KV-group size. They are placed so grouped-query attention keeps its mapping:
  query head ``h`` reads KV head ``h // (n_heads / n_kv)``, so each KV head's group gets its new heads at its
  end. A zero query row gives uniform attention, but its o columns are zero, so it adds nothing.
* MLP: ``I' - I`` zero gate/up rows and zero down columns (``silu(0) * 0 = 0``).

Where the zero channels of the residual stream go (``hidden_index``: the padded position of every real
channel) does not change the function, but it matters to llama.cpp. Its k-quant kernels quantize the input of
every matmul to 8 bits per 256-column block with one scale (``q8_K``: ``x_hat = round(127 x / a) a / 127``,
``a = max |x|`` over the block), so every element of a block is rounded on the grid of the block's largest
value. :func:`residual_placement` puts the ``t`` channels with the largest calibration activations in the block
that holds the zero channels (zeros cost nothing), so they no longer coarsen the grid of 255 ordinary
channels. But the placement also moves the weights' k-quant groups, which cost more than the finer activation
grid gains on the default model (docs/CHANGELOG.md has the measurements), so ``natural`` is the default and
``activation`` an option.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from turboboa.arch import ArchAdapter, get_adapter
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


def residual_placement(peaks: torch.Tensor, padded: int, multiple: int) -> torch.Tensor:
    """Padded position of each of the ``d`` real residual channels, given their activation ``peaks`` (``(d,)``).

    With ``n_z = padded - d`` zero channels and ``t = (multiple - n_z mod multiple) mod multiple``, the stream is
    ``[the t largest channels][n_z zeros][the other channels]``, each real run in its original order: the
    largest channels share their ``multiple``-column block with the zeros only, and every other channel keeps
    its neighbours (so the weights' quantization groups move as little as possible).
    """
    d = peaks.numel()
    n_zero = padded - d
    t = (multiple - n_zero % multiple) % multiple
    top = torch.zeros(d, dtype=torch.bool)
    top[torch.argsort(peaks, descending=True, stable=True)[:t]] = True
    index = torch.empty(d, dtype=torch.long)
    index[top] = torch.arange(t)
    index[~top] = torch.arange(t + n_zero, padded)
    return index


def stream_norms(model: Any, adapter: ArchAdapter) -> list[nn.Module]:
    """The norms that read the residual stream: the final norm, then each block's attention and MLP norms."""
    return [adapter.final_norm(model)] + [adapter.norm(block, role) for block in adapter.blocks(model)
                                          for role in ("attention_norm", "mlp_norm")]


@torch.no_grad()
def residual_peaks(model: Any, calib: torch.Tensor, batch: int = 4) -> torch.Tensor:
    """Per residual channel, ``sum over norms of max over calibration tokens |RMSNorm(h)_c|``: the activation
    peaks of the inputs of every layer that reads the stream (q/k/v, gate/up, head)."""
    norms = stream_norms(model, get_adapter(model))
    device = next(model.parameters()).device
    peaks = torch.zeros(model.config.hidden_size, dtype=torch.float32, device=device)

    def observe(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        peaks.add_(out.detach().abs().reshape(-1, out.shape[-1]).amax(0).float())

    hooks = [n.register_forward_hook(observe) for n in norms]
    try:
        for i in range(0, calib.shape[0], batch):
            model(input_ids=calib[i : i + batch].to(device))
    finally:
        for h in hooks:
            h.remove()
    return peaks.cpu()


def pad_model(model: Any, multiple: int, hidden_index: torch.Tensor | None = None) -> dict[str, Any]:
    """Pad ``model`` (a transformers causal LM with RMSNorms, in place) so every linear input width is a
    multiple of ``multiple``; returns what changed (old and new sizes). The function is unchanged.

    ``hidden_index``: padded position of every real residual channel (default: the first ``d`` positions;
    see :func:`residual_placement`)."""
    cfg = model.config
    adapter = get_adapter(model)
    if adapter.PADDING_REFUSAL is not None:
        raise UserError(f"--pad-to {multiple} cannot apply: {adapter.PADDING_REFUSAL}")
    d, n_h, n_kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or d // n_h
    inter = cfg.intermediate_size
    d2, inter2 = _round_up(d, multiple), _round_up(inter, multiple)
    n_h2 = padded_heads(n_h, n_kv, hd, multiple)
    report: dict[str, Any] = {"hidden": d, "hidden_padded": d2, "heads": n_h, "heads_padded": n_h2,
                              "intermediate": inter, "intermediate_padded": inter2}
    if (d2, n_h2, inter2) == (d, n_h, inter):
        return report
    if hidden_index is not None:
        hidden_index = hidden_index.to(torch.long).cpu()
        if hidden_index.numel() != d or hidden_index.unique().numel() != d or int(hidden_index.max()) >= d2:
            raise ValueError(f"hidden_index must place {d} channels at distinct positions below {d2}")
        if not torch.equal(hidden_index, torch.arange(d)):
            report["hidden_index"] = hidden_index.tolist()
    hi = hidden_index
    r = d / d2
    rows_q = torch.cat([torch.arange(p * hd, (p + 1) * hd) for p in head_positions(n_h, n_kv, n_h2)])
    norm_scale = math.sqrt(r)
    with torch.no_grad():
        emb = model.get_input_embeddings()
        emb.weight = nn.Parameter(_place(emb.weight.data, 1, d2, hi), requires_grad=False)
        emb.embedding_dim = d2
        for norm in stream_norms(model, adapter):
            norm.weight = nn.Parameter(_place(norm.weight.data * norm_scale, 0, d2, hi), requires_grad=False)
            eps_name = "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps"
            setattr(norm, eps_name, getattr(norm, eps_name) * r)
        mlp_in = [role for role in ("gate", "up") if role in adapter.LAYOUT.roles.present()]
        for block in adapter.blocks(model):
            att = adapter.attention(block)
            q = adapter.linear(block, "q")
            _set_linear(q, _place(_place(q.weight.data, 1, d2, hi), 0, n_h2 * hd, rows_q),
                        None if q.bias is None else _place(q.bias.data, 0, n_h2 * hd, rows_q))
            for lin in (adapter.linear(block, "k"), adapter.linear(block, "v")):
                _set_linear(lin, _place(lin.weight.data, 1, d2, hi), None)
            o = adapter.linear(block, "o")
            _set_linear(o, _place(_place(o.weight.data, 1, n_h2 * hd, rows_q), 0, d2, hi),
                        None if o.bias is None else _place(o.bias.data, 0, d2, hi))
            for lin in (adapter.linear(block, role) for role in mlp_in):
                _set_linear(lin, _place(_place(lin.weight.data, 1, d2, hi), 0, inter2), None)
            down = adapter.linear(block, "down")
            _set_linear(down, _place(_place(down.weight.data, 1, inter2), 0, d2, hi), None)
            att.head_dim = hd
            if hasattr(att, "num_heads"):
                att.num_heads = n_h2
            if hasattr(att, "num_key_value_groups"):
                att.num_key_value_groups = n_h2 // n_kv
        head = model.get_output_embeddings()
        if head is not None and head.weight is not emb.weight:
            head.weight = nn.Parameter(_place(head.weight.data, 1, d2, hi), requires_grad=False)
            head.in_features = d2
    cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size = d2, n_h2, inter2
    cfg.head_dim = hd
    cfg.rms_norm_eps = cfg.rms_norm_eps * r
    if getattr(cfg, "tie_word_embeddings", False):
        model.tie_weights()
    return report
