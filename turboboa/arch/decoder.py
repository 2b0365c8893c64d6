"""The decoder the exported graphs (and the fully quantized simulation) compute, as data a family's adapter
fills from a Hugging Face config (:meth:`~turboboa.arch.base.ArchAdapter.decoder_spec`).

With ``D`` hidden, ``H`` query heads over ``G`` KV heads of size ``d`` (query head ``h`` reads KV head
``h // (H / G)``), ``M`` the causal mask (0 on and below the diagonal, -inf above):

* ``h_0 = E[ids]``, plus ``P[t + offset]`` at position ``t`` where the family has learned positions;
* per block: ``x = Norm_a(h)``; ``q, k, v = x W_q^T (+ b_q), ...`` split into heads, with RoPE on ``q`` and
  ``k`` where the family has it; ``h += concat_h(softmax(q k^T / sqrt(d) + M) v) W_o^T (+ b_o)``;
  ``y = Norm_m(h)``; ``h += (act(y W_gate^T) * (y W_up^T)) W_down^T`` (gated) or
  ``h += act(y W_up^T + b_up) W_down^T + b_down`` (ungated);
* ``logits = Norm_f(h_L) W_head^T``, ``W_head = E`` when tied.

Norms: ``rms``: ``x / sqrt(mean(x^2) + eps) * w``; ``layer``: ``(x - mean(x)) / sqrt(var(x) + eps) * w + b``.
"""

from __future__ import annotations

from dataclasses import dataclass

from turboboa.arch.layout import Layout

NORMS = ("rms", "layer")
ACTIVATIONS = ("silu", "relu")


@dataclass(frozen=True)
class DecoderSpec:
    """Hyperparameters and names of a decoder (module docstring): ``hidden`` D, ``heads`` H, ``kv_heads`` G,
    ``head_dim`` d, ``vocab`` V, ``layers``, the norms' ``eps``, tied head, ``max_positions``; ``norm`` (rms or
    layer), the MLP's ``activation`` and whether it is ``gated``, ``rope`` (else learned positions, the row
    of position ``t`` being ``t + position_offset``); ``layout``: the module names."""

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
