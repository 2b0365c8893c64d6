"""The decoder the exported graphs (and the fully quantized simulation) compute, as data a family's adapter
fills from a Hugging Face config (:meth:`~turboboa.arch.base.ArchAdapter.decoder_spec`).

With ``D`` hidden, ``H`` query heads over ``G`` KV heads of size ``d`` (query head ``h`` reads KV head
``h // (H / G)``), ``M`` the causal mask (0 on and below the diagonal, -inf above):

* ``h_0 = E[ids]`` (times ``embed_scale`` where the family scales it), plus ``P[t + offset]`` at position ``t``
  where the family has learned positions;
* per block ``i``: ``x = Norm_a(h)``; ``q, k, v = x W_q^T (+ b_q), ...`` split into heads; where the layout has
  per-head norms, ``q = Norm_q(q)``, ``k = Norm_k(k)`` over each head's ``d`` channels; RoPE on ``q`` and ``k``
  with the layer's table ``rope_table[i]`` where the family has it;
  ``o = concat_h(softmax(q k^T s + M_i) v) W_o^T (+ b_o)`` with ``s = attention_scale`` (``d^-1/2`` unless
  set) and ``M_i`` causal, limited to the last ``windows[i]`` keys on a windowed layer; ``h += Norm_po(o)``
  where the layout has an attention post-norm, else ``h += o``; ``y = Norm_m(h)``;
  ``z = (act(y W_gate^T) * (y W_up^T)) W_down^T`` (gated) or ``act(y W_up^T + b_up) W_down^T + b_down``
  (ungated); ``h += Norm_pm(z)`` or ``h += z`` likewise;
* ``logits = Norm_f(h_L) W_head^T``, ``W_head = E`` when tied.

Norms: ``rms``: ``x / sqrt(mean(x^2) + eps) * (norm_offset + w)`` (Gemma stores ``w`` with offset 1);
``layer``: ``(x - mean(x)) / sqrt(var(x) + eps) * w + b``. Activations: ``silu(a) = a sigmoid(a)``, ``relu``,
``gelu_tanh(a) = a/2 (1 + tanh(sqrt(2/pi) (a + 0.044715 a^3)))``.
"""

from __future__ import annotations

from dataclasses import dataclass

from turboboa.arch.layout import Layout

NORMS = ("rms", "layer")
ACTIVATIONS = ("silu", "relu", "gelu_tanh")


@dataclass(frozen=True)
class DecoderSpec:
    """Hyperparameters and names of a decoder (module docstring): ``hidden`` D, ``heads`` H, ``kv_heads`` G,
    ``head_dim`` d, ``vocab`` V, ``layers``, the norms' ``eps``, tied head, ``max_positions``; ``norm`` (rms or
    layer), the MLP's ``activation`` and whether it is ``gated``, ``rope`` (else learned positions, the row
    of position ``t`` being ``t + position_offset``); ``layout``: the module names (its per-head and post norms
    included); ``norm_offset``, ``embed_scale``, ``attention_scale`` (None: ``d^-1/2``); per layer,
    ``windows`` (None: full causal attention; empty: every layer full) and ``rope_table`` (the index of the
    layer's RoPE table among the adapter's :meth:`~turboboa.arch.base.ArchAdapter.rope_tables`; empty: 0)."""

    model_type: str
    layout: Layout
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layers: int
    eps: float
    tied: bool
    max_positions: int
    norm: str = "rms"
    activation: str = "silu"
    gated: bool = True
    rope: bool = True
    position_offset: int = 0
    norm_offset: float = 0.0
    embed_scale: float | None = None
    attention_scale: float | None = None
    windows: tuple[int | None, ...] = ()
    rope_table: tuple[int, ...] = ()

    @property
    def scale(self) -> float:
        """The attention's score scale ``s``: ``attention_scale``, else ``d^-1/2``."""
        return self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale

    def window(self, i: int) -> int | None:
        """The sliding window of block ``i`` in keys, None for full causal attention."""
        return self.windows[i] if self.windows else None

    def rope_index(self, i: int) -> int:
        """The index of block ``i``'s RoPE table."""
        return self.rope_table[i] if self.rope_table else 0

    @property
    def rope_table_count(self) -> int:
        """How many RoPE tables the blocks use."""
        return max(self.rope_table, default=0) + 1

    def block(self, i: int) -> str:
        """Module name prefix of decoder block ``i``."""
        return self.layout.block(i)

    def linear(self, i: int, role: str) -> str:
        """Full name of block ``i``'s linear layer of ``role``."""
        return self.layout.linear(i, role)

    def linear_names(self) -> list[str]:
        """Every linear layer of the blocks, in graph order."""
        roles = self.layout.roles.present()
        return [self.linear(i, role) for i in range(self.layers) for role in roles]

    @property
    def embedding(self) -> str:
        """Module name of the token embedding."""
        return self.layout.embedding

    @property
    def final_norm(self) -> str:
        """Module name of the norm after the last block."""
        return self.layout.final_norm

    @property
    def head(self) -> str:
        """Module name of the output head."""
        return self.layout.head
