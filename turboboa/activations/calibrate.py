"""Calibrate static activation encodings on the fake-quant model, one block and one stage at a time.

Each quantized layer's input is observed with the activation quantization of every earlier layer already
on, so the encodings are those of the model the fake-quant evaluation (and the ONNX graph) runs: block by
block, and inside a block stage by stage in the architecture's dependency order (q/k/v, o, gate/up, down:
``ArchAdapter.LINEAR_GROUPS``):

1. the block runs on the calibration stream ``X`` (its input, produced with every earlier encoding on);
   forward pre-hooks record the min and max of the stage's layer inputs over all calibration tokens;
2. the stage's encodings are made (:func:`~turboboa.activations.encodings.encoding_from_range`, min-max)
   and switched on (forward pre-hooks that fake-quantize those inputs);
3. after the last stage ``X`` moves through the block with all of its encodings on.

That is ``stages + 1`` block passes per block (five for Llama), on one block at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from turboboa.arch import get_adapter
from turboboa.models.chunks import chunk_size, module_name

from .encodings import (
    ActivationEncodings,
    TensorEncoding,
    check_act_bits,
    encoding_from_range,
    install_input_quantization,
)


class MinMax:
    """Running min and max of every value seen (float32)."""

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))


def calibrate_activations(model: nn.Module, calib_ids: torch.Tensor, bits: int, layers: Iterable[str],
                          device: torch.device | str = "cpu", progress: bool = True,
                          calibration: dict[str, Any] | None = None) -> ActivationEncodings:
    """Min-max encodings of the inputs of ``layers`` (full module names of block linears) of the fake-quant
    ``model`` on ``calib_ids`` (``(n, L)`` token ids), each observed with the earlier encodings on (module
    docstring). The model is left as it was (hooks removed, blocks back on the CPU)."""
    check_act_bits(bits)
    device = torch.device(device)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    prefix = module_name(model, blocks) + "."
    wanted = set(layers)
    n, L = calib_ids.shape
    step = chunk_size(n, L, adapter.attention_shape(model).n_heads)
    found: dict[str, TensorEncoding] = {}
    encodings = ActivationEncodings(bits, found, calibration=dict(calibration or {}))
    handles: list[Any] = []
    try:
        with torch.no_grad():
            cos, sin = adapter.rotary_cos_sin(model, L, device)
            X = torch.cat([adapter.embed(model, calib_ids[i : i + 8]).float() for i in range(0, n, 8)])
            X = X.to(device)
            bar = tqdm(blocks, desc=f"calibrate a{bits}", unit="block", disable=not progress)
            for i, block in enumerate(bar):
                block.to(device)
                for group in adapter.LINEAR_GROUPS:
                    names = [name for name in group if f"{prefix}{i}.{name}" in wanted]
                    if not names:
                        continue
                    observers = {name: MinMax() for name in names}
                    hooks = [block.get_submodule(name).register_forward_pre_hook(observers[name])
                             for name in names]
                    try:
                        for c0 in range(0, n, step):
                            adapter.block_forward(block, X[c0 : c0 + step], cos, sin)
                    finally:
                        for h in hooks:
                            h.remove()
                    for name, obs in observers.items():
                        found[f"{prefix}{i}.{name}"] = encoding_from_range(obs.lo, obs.hi, bits)
                    full = [f"{prefix}{i}.{name}" for name in names]
                    handles += install_input_quantization(model, encodings, full)
                for c0 in range(0, n, step):
                    X[c0 : c0 + step] = adapter.block_forward(block, X[c0 : c0 + step], cos, sin)
                block.to("cpu")
    finally:
        for h in handles:
            h.remove()
    return encodings
