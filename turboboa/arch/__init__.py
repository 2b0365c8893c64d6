"""Architecture adapters: per-family knowledge behind one interface, looked up by HF ``model_type``.

This registry is the one list of supported families. To add a family, write ``turboboa/arch/<name>.py`` with
an ``ArchAdapter`` subclass that sets ``MODEL_TYPES`` and ``LAYOUT`` (it registers itself) and import it below.
Code outside this package names modules by role (:mod:`turboboa.arch.layout`): an adapter's ``LAYOUT`` for
a model in hand, :func:`locate` / :func:`role_of` for a module name alone (a QDIR's layer names).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from turboboa.arch import gemma3 as _gemma3  # noqa: F401  (registers Gemma 3)
from turboboa.arch import llama as _llama  # noqa: F401  (registers Llama, Mistral, Qwen2)
from turboboa.arch import opt as _opt  # noqa: F401  (registers OPT)
from turboboa.arch import qwen3 as _qwen3  # noqa: F401  (registers Qwen3)
from turboboa.arch.base import (
    ArchAdapter,
    AttentionShape,
    GgufArch,
    Record,
    adapter_class,
    registered_adapters,
)
from turboboa.arch.decoder import DecoderSpec
from turboboa.arch.layout import LINEAR_ROLES, Layout, Roles

__all__ = ["LINEAR_ROLES", "ArchAdapter", "AttentionShape", "DecoderSpec", "GgufArch", "Layout", "Record", "Roles",
           "adapter_for_config", "decoder_spec", "get_adapter", "locate", "role_of", "supported_model_types"]


def supported_model_types() -> list[str]:
    """The HF ``config.model_type`` values with a registered adapter, sorted."""
    return sorted(registered_adapters())


def adapter_for_config(hf_config: Any, owner: object = None) -> ArchAdapter:
    """The adapter for an HF config (by ``model_type``), after its check of the config; a one-line UserError
    for an unsupported family or variant (``owner``: the model the config belongs to, named in the error)."""
    cls = adapter_class(getattr(hf_config, "model_type", None), hf_config if owner is None else owner)
    adapter = cls()
    adapter.check_config(hf_config)
    return adapter


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model`` (keyed by ``model.config.model_type``); UserError if none is registered."""
    return adapter_for_config(getattr(model, "config", None), owner=model)


def decoder_spec(hf_config: Any) -> DecoderSpec:
    """The decoder the exported graphs compute for ``hf_config`` (its family's
    :meth:`~turboboa.arch.base.ArchAdapter.decoder_spec`)."""
    return adapter_for_config(hf_config).decoder_spec(hf_config)


def locate(name: str) -> tuple[int | None, str | None]:
    """``(block index, role)`` of the full module name ``name`` in the registered families' layouts
    (:meth:`Layout.locate`); ``(i, None)`` for another name inside block ``i``, ``(None, None)`` when no
    family has it. The families agree on every linear layer they share (a linear name with two roles is a
    ValueError); a norm name two families use differently (Llama's ``post_attention_layernorm`` is its MLP
    norm, Gemma's the attention's post-norm) has no family-independent role: ``(i, None)``."""
    layouts = {id(cls.LAYOUT): cls.LAYOUT for cls in registered_adapters().values()}
    found = {layout.locate(name) for layout in layouts.values()}
    roles = {hit for hit in found if hit[1] is not None}
    if len(roles) > 1 and all(role not in LINEAR_ROLES for _, role in roles):
        blocks = {block for block, _ in roles}
        return (blocks.pop(), None) if len(blocks) == 1 else (None, None)
    if len(roles) > 1:
        raise ValueError(f"module {name!r} has different roles in the registered families: {sorted(map(str, roles))}")
    if roles:
        return roles.pop()
    blocks = {hit for hit in found if hit[0] is not None}
    return blocks.pop() if len(blocks) == 1 else (None, None)


def role_of(name: str) -> str | None:
    """The role of the full module name ``name`` (:func:`locate`), None if it has none."""
    return locate(name)[1]
