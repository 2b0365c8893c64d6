"""Rotations fused into the weights of an RMSNorm decoder (QuaRot): the function is unchanged, the
architecture stays the plain model, and the activations lose their outlier channels.

Row-vector convention: a linear layer computes ``y = x W^T + b``. Layers are named by role (the family's
adapter maps them to modules, :mod:`turboboa.arch.layout`): q, k, v, o in the attention, gate, up, down in the
MLP; every block norm is read by the roles its layout pairs it with.

1. **Fold the RMSNorms.** ``RMSNorm(x) = x / rms(x) * diag(w)``: every layer reading a norm's output takes
   ``W <- W diag(w)`` and the norm's weight becomes ones (q/k/v read the attention norm, gate/up the MLP norm,
   the head the final norm). A head tied to the embedding is untied when the final norm's weight is not ones.
2. **Rotate the residual stream** by an orthogonal ``Q`` (``h -> h Q``). ``rms(x Q) = rms(x)``, so a weight-free
   norm commutes with ``Q``. The embedding takes ``E <- E Q``; layers reading the stream (q/k/v, gate/up,
   head) ``W <- W Q``; layers writing to it (o, down) ``W <- Q^T W``, ``b <- Q^T b``.
3. **Rotate each attention head's values** by ``H_d`` (Hadamard of the head size, orthogonal): the values
   of KV head ``g`` become ``v_g H_d`` (``W_v,g <- H_d^T W_v,g``, ``b_v,g <- H_d^T b_v,g``) and every query
   head ``h`` of that group reads them back (``W_o[:, h] <- W_o[:, h] H_d``): attention mixes tokens, not the
   head's channels, so ``softmax(.) (v H_d) H_d^T W_o^T = softmax(.) v W_o^T``.
4. **Online rotation of the down projection's input** (weight-activation quantization only, ``online_down``):
   ``W_down <- W_down H_I``; the model must then compute ``x -> x H_I`` before it
   (:mod:`turboboa.rotation.online`), which no plain runtime does.

A family whose norm does not commute with a rotation (OPT's LayerNorm subtracts the mean and adds a bias)
is refused in one line with its adapter's reason.

Every product is computed in float64 and stored in the model's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from turboboa.arch import ArchAdapter, get_adapter
from turboboa.errors import UserError

from .hadamard import HadamardTransform, factorization, residual_rotation

ROTATIONS = ("none", "hadamard", "random")


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def rotation_unties_head(model: Any) -> bool:
    """Whether folding the norms unties the head: it is tied to the embedding and the final norm's weight is
    not all ones (the head then takes ``W_head diag(g)``, the embedding stays ``E``)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and (head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr())
    return tied and not bool((get_adapter(model).final_norm(model).weight == 1).all())


def fold_norms(model: Any, adapter: ArchAdapter) -> bool:
    """Fold every RMSNorm weight into the layers that read it (step 1); returns whether the head was untied."""
    untied = False
    with torch.no_grad():
        for block in adapter.blocks(model):
            for norm_role, readers in adapter.LAYOUT.norm_readers():
                norm = adapter.norm(block, norm_role)
                w = norm.weight.double()
                for role in readers:
                    lin = adapter.linear(block, role)
                    _set(lin.weight, lin.weight.double() * w[None, :])
                _set(norm.weight, torch.ones_like(w))
        head = model.get_output_embeddings()
        final = adapter.final_norm(model)
        w = final.weight.double()
        if not bool((w == 1).all()):
            if rotation_unties_head(model):
                head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=False)
                model.config.tie_word_embeddings = False
                untied = True
            _set(head.weight, head.weight.double() * w[None, :])
            _set(final.weight, torch.ones_like(w))
    return untied


def rotate_residual(model: Any, adapter: ArchAdapter, Q: torch.Tensor) -> None:
    """Step 2 on a model whose norms are folded: ``h -> h Q`` everywhere (``Q`` orthogonal, float64)."""
    readers = [role for _, roles in adapter.LAYOUT.norm_readers() for role in roles]
    with torch.no_grad():
        emb = model.get_input_embeddings()
        _set(emb.weight, emb.weight.double() @ Q)
        for block in adapter.blocks(model):
            for role in readers:
                lin = adapter.linear(block, role)
                _set(lin.weight, lin.weight.double() @ Q)
            for role in ("o", "down"):
                lin = adapter.linear(block, role)
                _set(lin.weight, Q.T @ lin.weight.double())
                if lin.bias is not None:
                    _set(lin.bias, lin.bias.double() @ Q)
        head = model.get_output_embeddings()
        if head.weight.data_ptr() != emb.weight.data_ptr():
            _set(head.weight, head.weight.double() @ Q)


def rotate_values(model: Any, adapter: ArchAdapter) -> None:
    """Step 3: each KV head's values by ``H_d`` (fused into the value projection), read back by o."""
    d = adapter.attention_shape(model).head_dim
    Hd = HadamardTransform(d).matrix()
    with torch.no_grad():
        for block in adapter.blocks(model):
            v_lin, o_lin = adapter.linear(block, "v"), adapter.linear(block, "o")
            n_kv = v_lin.out_features // d
            n_heads = o_lin.in_features // d
            Wv = v_lin.weight.double().reshape(n_kv, d, -1)
            _set(v_lin.weight, torch.matmul(Hd.T, Wv).reshape(n_kv * d, -1))
            if v_lin.bias is not None:
                _set(v_lin.bias, (v_lin.bias.double().reshape(n_kv, d) @ Hd).reshape(-1))
            Wo = o_lin.weight.double().reshape(-1, n_heads, d)
            _set(o_lin.weight, torch.matmul(Wo, Hd).reshape(-1, n_heads * d))


def rotate_down_inputs(model: Any, adapter: ArchAdapter) -> None:
    """Step 4: ``W_down <- W_down H_I`` (the input must then be rotated online by ``H_I``)."""
    with torch.no_grad():
        for block in adapter.blocks(model):
            down = adapter.linear(block, "down")
            H = HadamardTransform(down.in_features).matrix()
            _set(down.weight, down.weight.double() @ H)


def rotate_model(model: Any, kind: str, seed: int = 0, online_down: bool = False) -> dict[str, Any]:
    """Fold the norms and fuse the rotations of ``kind`` ("hadamard": randomized Hadamard, "random": Haar
    orthogonal) into ``model`` in place (module docstring); returns the report stored in the QDIR."""
    if kind not in ROTATIONS or kind == "none":
        raise UserError(f"unknown --rotate {kind!r}; choose none, hadamard or random")
    adapter = get_adapter(model)
    if adapter.ROTATION_REFUSAL is not None:
        raise UserError(f"--rotate {kind} cannot apply: {adapter.ROTATION_REFUSAL}")
    shape = adapter.attention_shape(model)
    n, d = shape.hidden_size, shape.head_dim
    Q = residual_rotation(kind, n, seed)  # checked first: an impossible order fails before any change
    intermediate = adapter.linear(adapter.blocks(model)[0], "down").in_features
    for width in (d, intermediate) if online_down else (d,):
        factorization(width)
    untied = fold_norms(model, adapter)
    rotate_residual(model, adapter, Q)
    rotate_values(model, adapter)
    if online_down:
        rotate_down_inputs(model, adapter)
    return {"kind": kind, "seed": seed, "residual": n, "head_dim": d, "norms_folded": True,
            "untied_head": untied, "online_down": online_down,
            **({"intermediate": intermediate} if online_down else {})}
