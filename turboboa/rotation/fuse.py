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

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from turboboa.arch import ArchAdapter, get_adapter
from turboboa.errors import UserError
from turboboa.models.stream import StreamedModel

from .hadamard import HadamardTransform, factorization, residual_rotation

ROTATIONS = ("none", "hadamard", "random")


TABLE_ROWS = 8192  # rows of an embedding or head rotated at a time (float64 temporaries of this many rows)


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype).contiguous()


def rotation_unties_head(model: Any) -> bool:
    """Whether folding the norms unties the head: it is tied to the embedding and the final norm's weight is
    not all ones (the head then takes ``W_head diag(g)``, the embedding stays ``E``)."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and (head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr())
    return tied and not bool((get_adapter(model).final_norm(model).weight == 1).all())


@dataclass
class Rotation:
    """The rotations of one run: the residual stream's ``Q`` (float64), each head's ``H_d`` and, with
    ``online_down``, the down projection's ``H_I``; applied block by block (:meth:`fuse_block`) and to the
    tables (:meth:`rotate_table`, :meth:`fuse_head`), so a whole model and a streamed one
    (:mod:`turboboa.models.stream`) get the same tensors."""

    kind: str
    seed: int
    Q: torch.Tensor
    Hd: torch.Tensor
    online_down: bool
    intermediate: int

    @classmethod
    def plan(cls, model: Any, kind: str, seed: int = 0, online_down: bool = False) -> Rotation:
        """The rotations of ``kind`` for ``model`` (its shapes only), checked before any weight changes: a
        family that cannot be rotated or a width without a Hadamard order is a one-line UserError."""
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
        return cls(kind, seed, Q, HadamardTransform(d).matrix(), online_down, intermediate)

    def report(self, untied: bool) -> dict[str, Any]:
        """The QDIR's ``rotation`` entry."""
        return {"kind": self.kind, "seed": self.seed, "residual": self.Q.shape[0], "head_dim": self.Hd.shape[0],
                "norms_folded": True, "untied_head": untied, "online_down": self.online_down,
                **({"intermediate": self.intermediate} if self.online_down else {})}

    def fuse_block(self, block: nn.Module, adapter: ArchAdapter) -> None:
        """Steps 1 to 4 on one block: fold its norms, rotate the residual stream's readers and writers, each
        KV head's values, and (``online_down``) the down projection's input."""
        with torch.no_grad():
            readers = []
            for norm_role, roles in adapter.LAYOUT.norm_readers():
                norm = adapter.norm(block, norm_role)
                w = norm.weight.double()
                for role in roles:
                    lin = adapter.linear(block, role)
                    _set(lin.weight, lin.weight.double() * w[None, :])
                _set(norm.weight, torch.ones_like(w))
                readers += roles
            for role in readers:
                lin = adapter.linear(block, role)
                _set(lin.weight, lin.weight.double() @ self.Q)
            for role in ("o", "down"):
                lin = adapter.linear(block, role)
                _set(lin.weight, self.Q.T @ lin.weight.double())
                if lin.bias is not None:
                    _set(lin.bias, lin.bias.double() @ self.Q)
            self._rotate_values(adapter.linear(block, "v"), adapter.linear(block, "o"))
            if self.online_down:
                down = adapter.linear(block, "down")
                _set(down.weight, down.weight.double() @ HadamardTransform(down.in_features).matrix())

    def _rotate_values(self, v_lin: nn.Module, o_lin: nn.Module) -> None:
        """Step 3: each KV head's values by ``H_d`` (fused into the value projection), read back by o."""
        Hd = self.Hd
        d = Hd.shape[0]
        n_kv, n_heads = v_lin.out_features // d, o_lin.in_features // d
        Wv = v_lin.weight.double().reshape(n_kv, d, -1)
        _set(v_lin.weight, torch.matmul(Hd.T, Wv).reshape(n_kv * d, -1))
        if v_lin.bias is not None:
            _set(v_lin.bias, (v_lin.bias.double().reshape(n_kv, d) @ Hd).reshape(-1))
        Wo = o_lin.weight.double().reshape(-1, n_heads, d)
        _set(o_lin.weight, torch.matmul(Wo, Hd).reshape(-1, n_heads * d))

    def rotate_table(self, weight: torch.Tensor, gain: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """``W diag(gain) Q`` of an embedding (``gain`` None) or a head (the final norm's weight ``gain``
        folded first, stored in ``weight``'s dtype in between), :data:`TABLE_ROWS` rows at a time, into ``out``
        (``weight`` itself rotates it in place; default a new tensor)."""
        out = torch.empty_like(weight) if out is None else out
        for r0 in range(0, weight.shape[0], TABLE_ROWS):
            rows = weight[r0 : r0 + TABLE_ROWS].double()
            if gain is not None:
                rows = (rows * gain[None, :]).to(weight.dtype).double()
            out[r0 : r0 + TABLE_ROWS] = (rows @ self.Q).to(weight.dtype)
        return out

    def fuse_tables(self, model: Any, adapter: ArchAdapter) -> bool:
        """The head (the final norm folded, untied from the embedding when that changes it) and the embedding
        rotated; the final norm's weight becomes ones. Returns whether the head was untied."""
        with torch.no_grad():
            head, emb, final = model.get_output_embeddings(), model.get_input_embeddings(), adapter.final_norm(model)
            w = final.weight.double()
            gain = None if bool((w == 1).all()) else w
            untied = gain is not None and rotation_unties_head(model)
            if untied:
                head.weight = nn.Parameter(head.weight.data.clone(), requires_grad=False)
                model.config.tie_word_embeddings = False
            if head.weight.data_ptr() != emb.weight.data_ptr():
                _set(head.weight, self.rotate_table(head.weight.data, gain))
            _set(emb.weight, self.rotate_table(emb.weight.data))
            _set(final.weight, torch.ones_like(w))
        return untied


def rotate_model(model: Any, kind: str, seed: int = 0, online_down: bool = False) -> dict[str, Any]:
    """Fold the norms and fuse the rotations of ``kind`` ("hadamard": randomized Hadamard, "random": Haar
    orthogonal) into ``model`` in place (module docstring); returns the report stored in the QDIR."""
    rotation = Rotation.plan(model, kind, seed, online_down)
    adapter = get_adapter(model)
    for block in adapter.blocks(model):
        rotation.fuse_block(block, adapter)
    return rotation.report(rotation.fuse_tables(model, adapter))


def rotate_streamed(streamed: StreamedModel, kind: str, seed: int = 0, online_down: bool = False) -> dict[str, Any]:
    """:func:`rotate_model` on a streamed model: the embedding and the final norm now, each block as it is
    read (a transform of ``streamed``), the head when it is read; the same tensors as the whole model's."""
    model, adapter = streamed.model, streamed.adapter
    rotation = Rotation.plan(model, kind, seed, online_down)
    streamed.transforms.append(lambda block: rotation.fuse_block(block, adapter))
    with torch.no_grad():
        head, emb, final = model.get_output_embeddings(), model.get_input_embeddings(), adapter.final_norm(model)
        w = final.weight.double()
        gain = None if bool((w == 1).all()) else w
        untied = gain is not None and streamed.head_is_tied()
        if untied:  # the head becomes its own matrix: read from the embedding's tensor, before its rotation
            head.weight = nn.Parameter(torch.empty_like(emb.weight, device="meta"), requires_grad=False)
            streamed.head_source = streamed.table_name(emb)
            model.config.tie_word_embeddings = False
        # the streamed tables are read into memory of their own: rotated in place
        if not streamed.head_is_tied():
            streamed.head_transform = lambda weight: rotation.rotate_table(weight, gain, out=weight)
        streamed.embedding_transform = lambda weight: rotation.rotate_table(weight, out=weight)
        rotation.rotate_table(emb.weight.data, out=emb.weight.data)
        _set(final.weight, torch.ones_like(w))
    return rotation.report(untied)
