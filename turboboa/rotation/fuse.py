"""Rotations fused into the weights of a Llama-family model (QuaRot): the function is unchanged, the
architecture stays a plain Llama, and the activations lose their outlier channels.

Row-vector convention: a linear layer computes ``y = x W^T + b``.

1. **Fold the RMSNorms.** ``RMSNorm(x) = x / rms(x) * diag(w)``: every layer reading a norm's output takes
   ``W <- W diag(w)`` and the norm's weight becomes ones (q/k/v read the attention norm, gate/up the MLP norm,
   the head the final norm). A head tied to the embedding is untied when the final norm's weight is not ones.
2. **Rotate the residual stream** by an orthogonal ``Q`` (``h -> h Q``). ``rms(x Q) = rms(x)``, so a weight-free
   norm commutes with ``Q``. The embedding takes ``E <- E Q``; layers reading the stream (q/k/v, gate/up,
   head) ``W <- W Q``; layers writing to it (o_proj, down_proj) ``W <- Q^T W``, ``b <- Q^T b``.
3. **Rotate each attention head's values** by ``H_d`` (Hadamard of the head size, orthogonal): the values
   of KV head ``g`` become ``v_g H_d`` (``W_v,g <- H_d^T W_v,g``, ``b_v,g <- H_d^T b_v,g``) and every query
   head ``h`` of that group reads them back (``W_o[:, h] <- W_o[:, h] H_d``): attention mixes tokens, not the
   head's channels, so ``softmax(.) (v H_d) H_d^T W_o^T = softmax(.) v W_o^T``.
4. **Online rotation of the down_proj input** (weight-activation quantization only, ``online_down``):
   ``W_down <- W_down H_I``; the model must then compute ``x -> x H_I`` before down_proj
   (:mod:`turboboa.rotation.online`), which no plain Llama runtime does.

Every product is computed in float64 and stored in the model's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turboboa.errors import UserError

from .hadamard import HadamardTransform, factorization, residual_rotation

ROTATIONS = ("none", "hadamard", "random")
MODEL_TYPES = ("llama", "mistral", "qwen2")


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def rotation_unties_head(model: Any) -> bool:
    """Whether folding the norms unties the head: it is tied to the embedding and the final norm's weight is
    not all ones (the head then takes ``W_head diag(g)``, the embedding stays ``E``)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and (head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr())
    return tied and not bool((model.model.norm.weight == 1).all())


def fold_norms(model: Any) -> bool:
    """Fold every RMSNorm weight into the layers that read it (step 1); returns whether the head was untied."""
    untied = False
    decoder = model.model
    with torch.no_grad():
        for layer in decoder.layers:
            pairs = ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                     (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)))
            for norm, readers in pairs:
                w = norm.weight.double()
                for lin in readers:
                    _set(lin.weight, lin.weight.double() * w[None, :])
                _set(norm.weight, torch.ones_like(w))
        head = model.get_output_embeddings()
        w = decoder.norm.weight.double()
        if not bool((w == 1).all()):
            if rotation_unties_head(model):
                head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=False)
                model.config.tie_word_embeddings = False
                untied = True
            _set(head.weight, head.weight.double() * w[None, :])
            _set(decoder.norm.weight, torch.ones_like(w))
    return untied


def head_dim_of(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)


def rotate_residual(model: Any, Q: torch.Tensor) -> None:
    """Step 2 on a model whose norms are folded: ``h -> h Q`` everywhere (``Q`` orthogonal, float64)."""
    decoder = model.model
    with torch.no_grad():
        emb = model.get_input_embeddings()
        _set(emb.weight, emb.weight.double() @ Q)
        for layer in decoder.layers:
            att, mlp = layer.self_attn, layer.mlp
            for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                _set(lin.weight, lin.weight.double() @ Q)
            for lin in (att.o_proj, mlp.down_proj):
                _set(lin.weight, Q.T @ lin.weight.double())
                if lin.bias is not None:
                    _set(lin.bias, lin.bias.double() @ Q)
        head = model.get_output_embeddings()
        if head.weight.data_ptr() != emb.weight.data_ptr():
            _set(head.weight, head.weight.double() @ Q)


def rotate_values(model: Any) -> None:
    """Step 3: each KV head's values by ``H_d`` (fused into v_proj), read back by o_proj."""
    d = head_dim_of(model)
    Hd = HadamardTransform(d).matrix()
    with torch.no_grad():
        for layer in model.model.layers:
            att = layer.self_attn
            n_kv = att.v_proj.out_features // d
            n_heads = att.o_proj.in_features // d
            Wv = att.v_proj.weight.double().reshape(n_kv, d, -1)
            _set(att.v_proj.weight, torch.matmul(Hd.T, Wv).reshape(n_kv * d, -1))
            if att.v_proj.bias is not None:
                _set(att.v_proj.bias, (att.v_proj.bias.double().reshape(n_kv, d) @ Hd).reshape(-1))
            Wo = att.o_proj.weight.double().reshape(-1, n_heads, d)
            _set(att.o_proj.weight, torch.matmul(Wo, Hd).reshape(-1, n_heads * d))


def rotate_down_inputs(model: Any) -> None:
    """Step 4: ``W_down <- W_down H_I`` (the input must then be rotated online by ``H_I``)."""
    with torch.no_grad():
        for layer in model.model.layers:
            down = layer.mlp.down_proj
            H = HadamardTransform(down.in_features).matrix()
            _set(down.weight, down.weight.double() @ H)


def rotate_model(model: Any, kind: str, seed: int = 0, online_down: bool = False) -> dict[str, Any]:
    """Fold the norms and fuse the rotations of ``kind`` ("hadamard": randomized Hadamard, "random": Haar
    orthogonal) into ``model`` in place (module docstring); returns the report stored in the QDIR."""
    if kind not in ROTATIONS or kind == "none":
        raise UserError(f"unknown --rotate {kind!r}; choose none, hadamard or random")
    if model.config.model_type not in MODEL_TYPES:
        raise UserError(f"--rotate supports {', '.join(MODEL_TYPES)} models, not {model.config.model_type}")
    n = int(model.config.hidden_size)
    Q = residual_rotation(kind, n, seed)  # checked first: an impossible order fails before any change
    d = head_dim_of(model)
    for width in (d, int(model.config.intermediate_size)) if online_down else (d,):
        factorization(width)
    untied = fold_norms(model)
    rotate_residual(model, Q)
    rotate_values(model)
    if online_down:
        rotate_down_inputs(model)
    return {"kind": kind, "seed": seed, "residual": n, "head_dim": d, "norms_folded": True,
            "untied_head": untied, "online_down": online_down,
            **({"intermediate": int(model.config.intermediate_size)} if online_down else {})}
