"""Architecture adapters: per-architecture knowledge behind one interface, looked up by HF ``model_type``.

To add an architecture, write ``turboboa/arch/<name>.py`` with an ``ArchAdapter`` subclass that sets
``MODEL_TYPES`` (it registers itself) and import it below.
"""

from __future__ import annotations

from torch import nn

from turboboa.arch import llama as _llama  # noqa: F401  (registers Llama, Mistral, Qwen2)
from turboboa.arch.base import (
    ArchAdapter,
    AttentionShape,
    Record,
    registered_adapters,
    unsupported_model_error,
)

__all__ = ["ArchAdapter", "AttentionShape", "Record", "get_adapter", "supported_model_types"]


def supported_model_types() -> list[str]:
    """The HF ``config.model_type`` values with a registered adapter, sorted."""
    return sorted(registered_adapters())


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for ``model`` (keyed by ``model.config.model_type``); UserError if none is registered."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    adapter_cls = registered_adapters().get(model_type) if isinstance(model_type, str) else None
    if adapter_cls is None:
        raise unsupported_model_error(model, model_type)
    return adapter_cls()
