"""Where a model family keeps its modules: Hugging Face module names by role.

The rest of the package names a decoder's parts by role, never by a family's module name:

* linear roles of a block (:data:`LINEAR_ROLES`): ``q``, ``k``, ``v`` (the attention's query, key and value
  projections), ``o`` (its output projection), ``gate`` and ``up`` (the MLP's input projections; ``gate`` is
  absent in an ungated MLP), ``down`` (the MLP's output projection);
* the block's norms: ``attention_norm`` (read by q, k, v) and ``mlp_norm`` (read by gate and up); where the
  family has them, ``q_norm`` and ``k_norm``: per-head RMSNorms of the queries and keys inside the attention
  (over the head size ``d``, after the projections, before RoPE), which no rotation of the residual touches;
  ``attention_post_norm`` / ``mlp_post_norm``: norms of the attention's / MLP's output before the residual
  add (Gemma), where the family has them;
* model-level modules: ``embedding`` (token table), ``positions`` (a learned position table, where the family
  has one), ``final_norm`` and ``head`` (the output projection to the vocabulary).

A :class:`Layout` maps the roles to one family's names; :meth:`Layout.locate` maps a full module name back to
its block and role. Block ``i`` is the module ``f"{blocks}.{i}"``; block-level names are relative to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
NORM_ROLES = ("attention_norm", "mlp_norm")
HEAD_NORM_ROLES = ("q_norm", "k_norm")
POST_NORM_ROLES = ("attention_post_norm", "mlp_post_norm")
MODEL_ROLES = ("embedding", "positions", "final_norm", "head")
ATTENTION_INPUT_ROLES = ("q", "k", "v")
MLP_INPUT_ROLES = ("gate", "up")


@dataclass(frozen=True)
class Roles:
    """Block-relative module names of a decoder block's linear layers, by role (module docstring).

    ``gate`` is None for an ungated MLP, ``y -> down(act(up(y)))``; with a gate the MLP computes
    ``y -> down(act(gate(y)) * up(y))``.
    """

    q: str
    k: str
    v: str
    o: str
    up: str
    down: str
    gate: str | None = None

    def present(self) -> tuple[str, ...]:
        """The roles this family has, in :data:`LINEAR_ROLES` order."""
        return tuple(role for role in LINEAR_ROLES if getattr(self, role) is not None)

    def name(self, role: str) -> str:
        """The block-relative module name of linear ``role``; a KeyError for a role the family lacks."""
        name = getattr(self, role, None) if role in LINEAR_ROLES else None
        if name is None:
            raise KeyError(f"no linear layer with role {role!r} in this family (roles: {self.present()})")
        return name

    def groups(self) -> list[list[str]]:
        """Block-relative names in dependency order, one list per group of layers reading the same input:
        q/k/v (the attention norm's output), o, gate/up (the MLP norm's output), down."""
        mlp_in = [self.name(r) for r in MLP_INPUT_ROLES if getattr(self, r) is not None]
        return [[self.q, self.k, self.v], [self.o], mlp_in, [self.down]]

    def role_of(self, relative: str) -> str | None:
        """The role of a block-relative module name, None if it is no linear layer of the block."""
        for role in self.present():
            if getattr(self, role) == relative:
                return role
        return None


@dataclass(frozen=True)
class Layout:
    """One family's module names: full names of the model-level modules, block-relative names of the block's.

    ``blocks``: the ``ModuleList`` of decoder blocks; ``attention``: the block's self-attention module (it
    holds q, k, v and o); ``positions``: the learned position table, None where positions are rotary;
    ``q_norm`` / ``k_norm``: the per-head query / key norms, None where the family has none.
    """

    blocks: str
    embedding: str
    final_norm: str
    head: str
    roles: Roles
    attention: str
    attention_norm: str
    mlp_norm: str
    positions: str | None = None
    q_norm: str | None = None
    k_norm: str | None = None
    attention_post_norm: str | None = None
    mlp_post_norm: str | None = None

    def block(self, i: int) -> str:
        """Full name of decoder block ``i``."""
        return f"{self.blocks}.{i}"

    def linear(self, i: int, role: str) -> str:
        """Full name of block ``i``'s linear layer of ``role``."""
        return f"{self.block(i)}.{self.roles.name(role)}"

    def norm(self, i: int, role: str) -> str:
        """Full name of block ``i``'s norm of ``role`` (``attention_norm`` or ``mlp_norm``)."""
        return f"{self.block(i)}.{self.block_module(role)}"

    def block_module(self, role: str) -> str:
        """Block-relative name of the module of ``role``: a linear role or a norm role (a per-head norm the
        family lacks is a KeyError)."""
        if role in NORM_ROLES:
            return getattr(self, role)
        if role in HEAD_NORM_ROLES + POST_NORM_ROLES:
            name = getattr(self, role)
            if name is None:
                raise KeyError(f"no {role} in this family")
            return name
        return self.roles.name(role)

    def head_norms(self) -> tuple[str, ...]:
        """The per-head and post norm roles this family has (``q_norm``, ``k_norm``, ``attention_post_norm``,
        ``mlp_post_norm``), in that order."""
        return tuple(role for role in HEAD_NORM_ROLES + POST_NORM_ROLES if getattr(self, role) is not None)

    def norm_readers(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Each block norm's role with the linear roles that read its output: ``attention_norm`` -> q, k, v;
        ``mlp_norm`` -> gate, up (those present). The final norm is read by the head alone."""
        present = self.roles.present()
        return (("attention_norm", ATTENTION_INPUT_ROLES),
                ("mlp_norm", tuple(r for r in MLP_INPUT_ROLES if r in present)))

    def normed_outputs(self) -> dict[str, tuple[str, bool]]:
        """The linear roles whose output an RMSNorm reads before anything else, with that norm's role and
        whether it normalizes each head (over the head size) or the whole output: the query and key projections
        under per-head ``q_norm`` / ``k_norm``, the output and down projections under the attention's and the
        MLP's post-norms (Gemma)."""
        norms = {"q": ("q_norm", True), "k": ("k_norm", True), "o": ("attention_post_norm", False),
                 "down": ("mlp_post_norm", False)}
        return {role: (norm, per_head) for role, (norm, per_head) in norms.items() if getattr(self, norm) is not None}

    def model_modules(self) -> dict[str, str]:
        """Full names of the model-level modules by role (``positions`` only where the family has it)."""
        names = {"embedding": self.embedding, "positions": self.positions, "final_norm": self.final_norm,
                 "head": self.head}
        return {role: name for role, name in names.items() if name is not None}

    @property
    def attention_scope(self) -> str:
        """The block-relative scope the attention's internal values are named under (graph nodes, points)."""
        return self.attention

    @property
    def mlp_scope(self) -> str:
        """The block-relative scope of the MLP's internal values: the module holding the down projection, or
        ``mlp`` when the family keeps the MLP's layers in the block itself."""
        return self.roles.down.rpartition(".")[0] or "mlp"

    def locate(self, name: str) -> tuple[int | None, str | None]:
        """``(block index, role)`` of the full module name ``name``: a model-level module's role with block
        None, a block module's linear or norm role with its block, ``(i, None)`` for another name inside block
        ``i`` and ``(None, None)`` for a name outside this layout."""
        for role, full in self.model_modules().items():
            if name == full:
                return None, role
        match = re.fullmatch(rf"{re.escape(self.blocks)}\.(\d+)\.(.+)", name)
        if match is None:
            return None, None
        relative = match.group(2)
        role = self.roles.role_of(relative)
        if role is None:
            roles = NORM_ROLES + HEAD_NORM_ROLES + POST_NORM_ROLES
            role = next((r for r in roles if getattr(self, r) == relative), None)
        return int(match.group(1)), role
