"""Model metadata of a GGUF file: the llama.cpp architecture of an HF config (its family's adapter says which,
or why there is none) and its hyperparameter keys.

Keys follow the GGUF reference (section 5): context, embedding and feed-forward lengths, block count, head
counts, rope base and dimension count, RMS-norm epsilon, vocabulary size, file type and quantization version.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
)

from turboboa.arch import Layout, adapter_for_config
from turboboa.errors import UserError

ARCH_BY_NAME = {name: arch for arch, name in MODEL_ARCH_NAMES.items()}


@dataclass(frozen=True)
class ArchSpec:
    """What the writer must know about a llama.cpp architecture (from the family's adapter).

    ``permute_qk``: llama.cpp applies adjacent-pair ("normal") rope, so q/k rows are permuted from HF's
    rotate-half order; ``qkv_bias``: the q/k/v biases are required tensors; ``layout``: the family's module
    names, by role; ``norm_offset``: added to every norm weight (llama.cpp's gemma3 stores ``1 + w``).
    """

    arch: MODEL_ARCH
    permute_qk: bool
    qkv_bias: bool
    layout: Layout
    norm_offset: float = 0.0

    @property
    def name(self) -> str:
        """The ``general.architecture`` string (``llama``, ``qwen2``)."""
        return MODEL_ARCH_NAMES[self.arch]


@dataclass(frozen=True)
class Hyperparameters:
    """The numbers of an HF decoder config that llama.cpp reads from GGUF metadata."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    rope_theta: float
    rope_linear_factor: float | None
    rms_eps: float
    vocab_size: int
    tied_embeddings: bool
    sliding_window: int | None = None


def arch_spec(hf_config: Any) -> ArchSpec:
    """The llama.cpp architecture for an HF config, as its family's adapter names it; a one-line UserError for
    a family without one (:meth:`~turboboa.arch.base.ArchAdapter.gguf`) or without an adapter."""
    adapter = adapter_for_config(hf_config)
    gguf = adapter.gguf()
    adapter.check_gguf_config(hf_config)
    return ArchSpec(ARCH_BY_NAME[gguf.name], gguf.permute_qk, gguf.qkv_bias, adapter.LAYOUT, gguf.norm_offset)


def _rope(hf_config: Any) -> tuple[float, float | None]:
    """(rope base, linear scaling factor or None) from ``rope_parameters`` (transformers 5) or the older
    ``rope_theta``/``rope_scaling`` attributes; rope types other than default and linear are refused."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    params = dict(params.get("full_attention") or params)  # per layer type (Gemma 3): the global layers' rope
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    theta = getattr(hf_config, "rope_theta", None) or params.get("rope_theta") or scaling.get("rope_theta")
    rope = params or scaling
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return float(theta or 10000.0), None
    if kind == "linear":
        return float(theta or 10000.0), float(rope["factor"])
    raise UserError(f"GGUF export supports default and linear rope, not rope type {kind!r}")


def hyperparameters(hf_config: Any) -> Hyperparameters:
    """Read the decoder hyperparameters from an HF config (``PretrainedConfig`` attributes)."""
    n_head = int(hf_config.num_attention_heads)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_head
    theta, factor = _rope(hf_config)
    adapter = adapter_for_config(hf_config)
    return Hyperparameters(
        n_layer=int(hf_config.num_hidden_layers),
        n_embd=int(hf_config.hidden_size),
        n_ff=int(hf_config.intermediate_size),
        n_head=n_head,
        n_head_kv=int(getattr(hf_config, "num_key_value_heads", None) or n_head),
        head_dim=int(head_dim),
        n_ctx_train=int(hf_config.max_position_embeddings),
        rope_theta=theta,
        rope_linear_factor=factor,
        rms_eps=float(hf_config.rms_norm_eps),
        vocab_size=int(hf_config.vocab_size),
        tied_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        sliding_window=adapter.config_window(hf_config) if adapter.gguf().sliding_window else None,
    )


def add_hyperparameters(writer: GGUFWriter, hp: Hyperparameters) -> None:
    """Write the ``{arch}.*`` model keys of ``hp`` with the writer's typed helpers."""
    writer.add_context_length(hp.n_ctx_train)
    writer.add_embedding_length(hp.n_embd)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_head != hp.n_embd:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_linear_factor is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(hp.rope_linear_factor)
    writer.add_vocab_size(hp.vocab_size)
    if hp.sliding_window:
        writer.add_sliding_window(hp.sliding_window)


def file_type(types: Iterable[tuple[GGMLQuantizationType, int]]) -> LlamaFileType:
    """The ``general.file_type`` for matrices of the given (stored type, element count).

    The type holding the most weights names the file: F32 -> ALL_F32, F16 -> MOSTLY_F16, and a quantized
    type T -> ``MOSTLY_T`` (or ``MOSTLY_T_M`` for K-quants, llama.cpp's usual mix); otherwise GUESSED.
    """
    counts: Counter[GGMLQuantizationType] = Counter()
    for qtype, n in types:
        counts[qtype] += n
    if not counts:
        return LlamaFileType.ALL_F32
    dominant = max(sorted(counts, key=int), key=lambda t: counts[t])
    if dominant == GGMLQuantizationType.F32:
        return LlamaFileType.ALL_F32
    for candidate in (f"MOSTLY_{dominant.name}", f"MOSTLY_{dominant.name}_M"):
        if candidate in LlamaFileType.__members__:
            return LlamaFileType[candidate]
    return LlamaFileType.GUESSED


def add_file_info(writer: GGUFWriter, ftype: LlamaFileType) -> None:
    """Write ``general.file_type`` and ``general.quantization_version``."""
    writer.add_file_type(int(ftype))
    writer.add_quantization_version(GGML_QUANT_VERSION)
