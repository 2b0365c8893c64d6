"""Model loading: float causal LMs from an alias, a .gguf file, a local folder or a hub id."""

from turboboa.models.loader import (
    DEFAULT_MODEL,
    LoadedModel,
    alias_gguf_path,
    load_float_model,
    model_id_for_config,
)

__all__ = ["DEFAULT_MODEL", "LoadedModel", "alias_gguf_path", "load_float_model", "model_id_for_config"]
