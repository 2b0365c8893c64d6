"""Export profiles: what a target runtime accepts (opset, shapes, grids, containers), checked per layer.

* ``generic``: onnxruntime and any QDQ-aware tool. Opset 21 by default (int4/uint4/int8/uint8
  DequantizeLinear, blocked or per channel); opsets 22 to 25 on request, and at 25 the 2-bit grids use the
  native int2/uint2 types. Any group size (ragged last groups included), symmetric or asymmetric grids,
  dynamic sequence length unless ``seqlen`` is given.
* ``npu``: what NPU toolchains (Qualcomm QNN HTP, Intel NPU, AMD) take: symmetric weights with zero point 0
  in int4 or int8 containers, per output channel or blocks of 32, 64 or 128, opset 21, a static sequence
  length (512 unless ``seqlen`` is given).

A grid a profile cannot express is refused in one line naming the fix; nothing is requantized. Both profiles
take LPBQ layers (``--format lpbq4``: symmetric int4 with per-channel-times-integer block scales) and static
activation quantization (``act_bits`` 8 or 16: the QDIR's per-tensor uint8/uint16 encodings as
QuantizeLinear -> DequantizeLinear on each quantized MatMul's input; None keeps float activations).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from turboboa.errors import UserError
from turboboa.quantized import UNIFORM, QuantizedLinear

from .containers import Container, container_for


@dataclass(frozen=True)
class ExportProfile:
    """Rules of one export target.

    ``opsets``: allowed opsets, the first the default. ``seqlen``: static sequence length, or None for a
    dynamic one. ``default_seqlen``: the static length used when none is given (None: dynamic).
    ``symmetric_only``: refuse grids with a zero point other than ``2^(b-1)``. ``containers``: allowed
    container names (None: any). ``group_sizes``: allowed block sizes besides per channel (None: any).
    ``native_int2``: 2-bit grids in int2/uint2 when the opset has them. ``act_bits``: bits of static
    activation quantization (None: float activations).
    """

    name: str
    opsets: tuple[int, ...]
    opset: int = 0
    seqlen: int | None = None
    default_seqlen: int | None = None
    symmetric_only: bool = False
    containers: frozenset[str] | None = None
    group_sizes: tuple[int, ...] | None = None
    native_int2: bool = True
    act_bits: int | None = None

    @property
    def static(self) -> bool:
        """True when the graph has a fixed sequence length."""
        return self.seqlen is not None

    def container(self, q: QuantizedLinear) -> Container:
        """The container of layer ``q`` under this profile's opset (native int2 from opset 25 on)."""
        native = self.native_int2 and self.opset >= 25
        return container_for(q.bits, q.sym, native_int2=native)

    def check_layer(self, name: str, q: QuantizedLinear) -> None:
        """Raise a one-line :class:`UserError` when layer ``name``'s grid cannot be expressed under this profile."""
        if self.symmetric_only and not q.sym:
            raise UserError(f"--profile {self.name} needs symmetric weights (zero point 0), but {name} has an "
                            f"asymmetric {q.bits}-bit grid; quantize again with --sym")
        columns = q.shape[1]
        per_channel = q.group_size <= 0 or q.group_size >= columns
        if self.group_sizes is not None and not per_channel and q.group_size not in self.group_sizes:
            allowed = ", ".join(map(str, self.group_sizes))
            fix = f"--group-size -1 or {allowed}"
            if q.fmt != UNIFORM:
                fix = f"--format {q.fmt.split('_')[0]} --group-size {allowed}"
            raise UserError(f"--profile {self.name} takes per-channel grids or blocks of {allowed}, but {name} "
                            f"has groups of {q.group_size}; quantize again with {fix}")
        container = self.container(q)
        if self.containers is not None and container.name not in self.containers:
            allowed = ", ".join(sorted(self.containers))
            raise UserError(f"--profile {self.name} takes {allowed} weights, but {name}'s {q.bits}-bit grid "
                            f"needs {container.label}; quantize again with --sym")


PROFILES = {
    "generic": ExportProfile("generic", opsets=(21, 22, 23, 24, 25)),
    "npu": ExportProfile("npu", opsets=(21,), default_seqlen=512, symmetric_only=True,
                         containers=frozenset({"int4", "int8"}), group_sizes=(32, 64, 128), native_int2=False),
}


def make_profile(name: str = "generic", opset: int | None = None, seqlen: int | None = None,
                 act_bits: int | None = None) -> ExportProfile:
    """The profile ``name`` with its opset (``opset`` or the default), sequence length (``seqlen``, else
    the profile's default; None means dynamic) and static activation bits (``act_bits``: None, 8 or 16).
    Bad choices are a one-line :class:`UserError`."""
    from turboboa.activations import check_act_bits

    check_act_bits(act_bits)
    base = PROFILES.get(name)
    if base is None:
        raise UserError(f"unknown --profile {name!r}; choose one of {', '.join(PROFILES)}")
    opset = base.opsets[0] if opset is None else int(opset)
    if opset not in base.opsets:
        allowed = ", ".join(map(str, base.opsets))
        raise UserError(f"--opset {opset} is not available under --profile {name}; choose {allowed}")
    seqlen = base.default_seqlen if seqlen is None else int(seqlen)
    if seqlen is not None and seqlen < 1:
        raise UserError(f"--seqlen {seqlen} must be a positive number of tokens")
    return replace(base, opset=opset, seqlen=seqlen, act_bits=act_bits)
