"""Non-finite values (NaN, Inf) caught where they appear, named by layer, before anything is written.

One ``torch.isfinite(t).all()`` per tensor, on a band of :data:`FINITE_ELEMENTS` elements at a time: cheap next
to the work that produced it, and without temporaries the size of the tensor (``isfinite`` of a whole
embedding table allocates more than the table).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .errors import UserError

FINITE_ELEMENTS = 1 << 24  # elements checked at a time by is_finite


class NonFiniteError(UserError):
    """A tensor holds NaN or Inf; the CLI reports it like any UserError (one line, exit code 2)."""


def is_finite(t: torch.Tensor | None) -> bool:
    """True for ``None``, integer tensors, tensors on the meta device (not read yet: a streamed model's
    blocks, checked when read) and float tensors without NaN/Inf."""
    if t is None or t.is_meta or not (t.is_floating_point() or t.is_complex()):
        return True
    if t.numel() <= FINITE_ELEMENTS or not t.is_contiguous():
        return bool(torch.isfinite(t).all())
    flat = t.view(-1)
    return all(bool(torch.isfinite(flat[i : i + FINITE_ELEMENTS]).all()) for i in range(0, flat.numel(), FINITE_ELEMENTS))


def check_finite(t: torch.Tensor | None, where: str, hint: str = "") -> None:
    """A :class:`NonFiniteError` naming ``where`` when ``t`` holds NaN or Inf."""
    if not is_finite(t):
        raise NonFiniteError(f"{where} holds NaN or Inf{'; ' + hint if hint else ''}")


def check_state_finite(tensors: Iterable[tuple[str, torch.Tensor]], what: str = "the float model") -> None:
    """Every floating tensor of ``tensors`` (name, tensor) finite; the first bad one is named."""
    for name, t in tensors:
        check_finite(t, f"{what}: tensor {name}", "the model file is damaged or was saved after a diverged run")


def check_model_finite(model: torch.nn.Module, what: str = "the float model") -> None:
    """Every parameter and buffer of ``model`` finite (checked right after loading)."""
    check_state_finite(model.state_dict().items(), what)


def check_quantized_finite(name: str, fields: Mapping[str, torch.Tensor | None]) -> None:
    """The solved codes/scales/zeros (and stored grid fields) of layer ``name`` are finite."""
    for key, t in fields.items():
        check_finite(t, f"layer {name}: the solved {key}", "try more bits, a larger --damp or more calibration")
