"""Online rotations: the part of QuaRot that cannot be fused into the weights because a nonlinearity sits in
between. ``x -> x H_I`` on the input of the MLP's down projection (whose weight took ``W H_I`` in
:func:`turboboa.rotation.fuse.rotate_down_inputs`), so ``x H_I (W H_I)^T = x W^T``: it spreads the MLP's
outlier channels before the per-token activation quantizer. Queries and keys are rotated inside the attention
function (:func:`turboboa.activations.dynamic.kv_attention`)."""

from __future__ import annotations

from torch import nn

from turboboa.arch import get_adapter

from .hadamard import HadamardTransform

HOOK_FLAG = "turboboa_online_down"


def _down_hook(transform: HadamardTransform):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (transform(args[0]), *args[1:])

    return hook


def install_online_down(model: nn.Module) -> None:
    """Register ``x -> x H_I`` as a forward pre-hook of every down projection of ``model`` (once per module; it
    runs before any hook registered later, such as the input quantizer or a calibration capture)."""
    adapter = get_adapter(model)
    for block in adapter.blocks(model):
        down = adapter.linear(block, "down")
        if not getattr(down, HOOK_FLAG, False):
            down.register_forward_pre_hook(_down_hook(HadamardTransform(down.in_features)))
            setattr(down, HOOK_FLAG, True)
