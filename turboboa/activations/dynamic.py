"""Dynamic weight-activation quantization, the protocol of QuaRot, BoA and TurboBoA (``WxAyKVz``): the input
of every linear layer of the decoder blocks quantized per token, and the KV cache per token and head, each
by a min-max nearest-rounding quantizer whose parameters come from the tensor itself at run time.

For one vector ``x`` (a token's layer input, or one head of a token's key or value) and ``b`` bits:

* symmetric: ``s = fp32(max|x| / (2^(b-1) - 1))``, ``x_hat = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) s``;
* asymmetric: ``lo = min(min x, 0)``, ``hi = max(max x, 0)``, ``s = fp32((hi - lo) / (2^b - 1))``,
  ``z = clamp(round(-lo / s), 0, 2^b - 1)``, ``x_hat = (clamp(round(x / s) + z, 0, 2^b - 1) - z) s``;

``round`` is half to even and ``x / s`` a true division: ONNX ``QuantizeLinear`` then ``DequantizeLinear``
with a scale computed in the graph. A vector of zeros gets ``s = 1``. 16 bits means float (no quantizer).

Online rotations (:mod:`turboboa.rotation.online`) come first: the input of the MLP's down projection is
rotated by ``H_I`` before it is quantized, queries and keys by ``H_d`` after RoPE (``q k^T`` is unchanged) before the keys are.
The head and the queries stay in float, as in the papers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from turboboa.arch import get_adapter
from turboboa.errors import UserError
from turboboa.rotation.hadamard import HadamardTransform
from turboboa.rotation.online import install_online_down

DYNAMIC_ACT_BITS = (4, 6, 8, 16)
KV_BITS = (4, 8, 16)
ATTENTION = "turboboa_kv"


def check_dynamic_bits(act_bits: int, kv_bits: int) -> None:
    """One-line UserErrors for widths the protocol does not have."""
    if act_bits not in DYNAMIC_ACT_BITS:
        raise UserError(f"--act-bits {act_bits} is not supported for per-token activation quantization; choose "
                        f"{', '.join(map(str, DYNAMIC_ACT_BITS))}")
    if kv_bits not in KV_BITS:
        raise UserError(f"--kv-bits {kv_bits} is not supported; choose {', '.join(map(str, KV_BITS))}")


def quant_params(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point (float32, shape ``x.shape[:-1] + (1,)``) of each vector along the last dim."""
    x = x.to(torch.float32)
    if sym:
        s = x.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, torch.zeros_like(s)
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, torch.clamp(torch.round(-lo / s), 0, 2**bits - 1)


def fake_quant_dynamic(x: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """``x_hat`` of the module docstring along the last dim (float32 arithmetic, ``x``'s dtype out)."""
    if bits >= 16:
        return x
    s, z = quant_params(x, bits, sym)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)
    q = torch.clamp(torch.round(x.to(torch.float32) / s) + z, lo, hi)
    return ((q - z) * s).to(x.dtype)


@dataclass(frozen=True)
class DynamicSpec:
    """What a QDIR's fake-quant model computes beyond its weights: per-token activation and KV quantization
    and the online rotations (``online_down``: ``x H_I`` before the MLP's down projection; ``online_qk``:
    ``H_d`` on queries and keys after RoPE)."""

    act_bits: int = 16
    act_sym: bool = True
    kv_bits: int = 16
    kv_sym: bool = False
    online_down: bool = False
    online_qk: bool = False

    @property
    def active(self) -> bool:
        return self.act_bits < 16 or self.kv_bits < 16 or self.online_down or self.online_qk

    @classmethod
    def from_config(cls, cfg: Any) -> DynamicSpec:
        online = set(filter(None, str(getattr(cfg, "online_rotate", "none")).split(","))) - {"none"}
        return cls(act_bits=int(getattr(cfg, "dyn_act_bits", 16)), act_sym=bool(getattr(cfg, "dyn_act_sym", True)),
                   kv_bits=int(getattr(cfg, "kv_bits", 16)), kv_sym=bool(getattr(cfg, "kv_sym", False)),
                   online_down="down" in online, online_qk="qk" in online)

    def label(self) -> str:
        """``W?A4KV4``-style suffix: ``A4KV4`` (``A16`` when only the cache is quantized)."""
        return f"A{self.act_bits}" + (f"KV{self.kv_bits}" if self.kv_bits < 16 else "")

    def summary(self) -> dict[str, Any]:
        return {"scheme": "dynamic", "act_bits": self.act_bits, "act_sym": self.act_sym,
                "act_granularity": "per-token", "kv_bits": self.kv_bits, "kv_sym": self.kv_sym,
                "kv_granularity": "per-token-per-head", "online_down": self.online_down,
                "online_qk": self.online_qk}


def _input_hook(bits: int, sym: bool) -> Callable[[nn.Module, tuple], tuple]:
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (fake_quant_dynamic(args[0], bits, sym), *args[1:])

    return hook


def kv_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers attention function (registered as :data:`ATTENTION`, with transformers' additive eager
    mask): ``H_d`` on queries and keys after RoPE when ``online_qk``, keys and values quantized per token and
    head, then ``softmax(q k^T * scaling + mask) v`` in float32, query head ``h`` reading KV head
    ``h // (H / G)``.

    Written out rather than calling SDPA: a fused kernel rounds ``softmax . v`` differently, and the first
    token (whose attention output is its quantized value exactly) lands on the quantization ties of the next
    layer's input; the exported graph computes these very products (``MatMul``, ``Mul``, ``Add``,
    ``Softmax``, ``MatMul``)."""
    spec: DynamicSpec = module.turboboa_dynamic
    if spec.online_qk:
        T = HadamardTransform(query.shape[-1])
        query, key = T(query), T(key)
    key = fake_quant_dynamic(key, spec.kv_bits, spec.kv_sym)
    value = fake_quant_dynamic(value, spec.kv_bits, spec.kv_sym)
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


def install_dynamic(model: nn.Module, spec: DynamicSpec) -> None:
    """Make the transformers ``model`` compute ``spec`` (in place): the online rotation of the down
    projection's input and the per-token input quantizer as forward pre-hooks of the block's linear layers
    (rotation first), the key/value side through the :func:`kv_attention` function."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if not spec.active:
        return
    if spec.online_down:
        install_online_down(model)
    adapter = get_adapter(model)
    for block in adapter.blocks(model):
        if spec.act_bits < 16:
            for lin in (m for m in block.modules() if isinstance(m, nn.Linear)):
                lin.register_forward_pre_hook(_input_hook(spec.act_bits, spec.act_sym))
        adapter.attention(block).turboboa_dynamic = spec
    if spec.kv_bits < 16 or spec.online_qk:
        AttentionInterface.register(ATTENTION, kv_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, eager_mask)
        model.set_attn_implementation(ATTENTION)
