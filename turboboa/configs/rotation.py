"""``RotationConfig``: the QuaRot rotation fused into the weights and the online rotations of the
activations (:mod:`turboboa.rotation`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..rotation import ROTATIONS
from .option import OptionGroup, option

ONLINE = ("down", "qk")  # the online rotations: the down projection's input, queries and keys


@dataclass(frozen=True)
class RotationConfig(OptionGroup):
    """The rotation and the online rotations. ``rotate="auto"`` and ``online_rotate="auto"`` are decided with
    the method, the activation quantization and the model (:class:`~turboboa.config.QuantConfig`); an
    explicit ``online_rotate`` is normalized to ``none`` or a sorted comma list (``down,qk``)."""

    rotate: str = option(
        "auto", "QuaRot rotation fused into the weights (norms folded; the model stays a plain Llama): "
        "hadamard (randomized Hadamard), random (orthogonal) or none; auto: hadamard for gptq/boa/turboboa "
        "unless it would untie a tied head in a weight-only run (the file would store a second "
        "vocabulary-sized matrix), none for rtn", choices=(*ROTATIONS, "auto"))
    rotate_seed: int = option(0, "seed of the rotation's signs/matrix")
    online_rotate: str = option(
        "auto", "none | down | qk | down,qk: online Hadamard of the down projection's input / of queries and keys "
        "(weight-activation quantization only; auto: what --act-bits/--kv-bits need under --rotate)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rotate not in (*ROTATIONS, "auto"):
            raise UserError(f"unknown --rotate '{self.rotate}'; choose auto or one of {', '.join(ROTATIONS)}")
        if self.online_rotate not in ("auto", "none"):
            parts = sorted(set(filter(None, self.online_rotate.split(","))))
            if not parts or any(p not in ONLINE for p in parts):
                raise UserError(f"unknown --online-rotate '{self.online_rotate}'; choose auto, none, down, qk "
                                "or down,qk")
            object.__setattr__(self, "online_rotate", ",".join(parts))
