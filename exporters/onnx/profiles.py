"""Export profiles: what a target runtime accepts (opset, shapes, grids, containers), checked per layer.

* ``generic``: onnxruntime and any QDQ-aware tool. Opset 21 by default (int4/uint4/int8/uint8
  DequantizeLinear, blocked or per channel); opsets 22 to 25 on request, and at 25 the 2-bit grids use the
  native int2/uint2 types. Any group size (ragged last groups included), symmetric or asymmetric grids,
  dynamic sequence length unless ``seqlen`` is given.
* ``qnn-htp``: what Qualcomm's HTP compiler takes whole (:mod:`.qnn`): every tensor quantized (uint8/uint16
  activations from the QDIR's ``static-graph`` encodings), symmetric int4/int8 weights per output channel
  with explicit zero points, or LPBQ layers; opset 23, a static sequence length (128 unless ``seqlen``).
* ``openvino``: what OpenVINO's CPU and NPU plugins compress: int4/int8 weights (uint4/uint8 with a zero point
  for asymmetric grids), per channel or blocks of 32, 64 or 128, opset 21, dynamic sequence length unless
  ``seqlen`` is given; the OpenVINO exporter (:mod:`exporters.openvino`) uses it by default.
* ``npu``: what NPU toolchains (Qualcomm QNN HTP, Intel NPU, AMD) take: symmetric weights with zero point 0
  in int4 or int8 containers, per output channel or blocks of 32, 64 or 128, opset 21, a static sequence
  length (512 unless ``seqlen`` is given).

A grid a profile cannot express is refused in one line naming the fix; nothing is requantized. Both profiles
take the ggml types DequantizeLinear decodes exactly (:data:`.containers.LEVEL_FORMATS`), within their block
rules: ``npu`` takes q4_0, q5_0 and q8_0 (blocks of 32) and refuses q3_k and q6_k (groups of 16). Both take
LPBQ layers (``--format lpbq4``: symmetric int4 with per-channel-times-integer block scales) and static
activation quantization (``act_bits`` 8 or 16: the QDIR's per-tensor uint8/uint16 encodings as
QuantizeLinear -> DequantizeLinear on each quantized MatMul's input; None keeps float activations).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from turboboa.activations import check_act_bits
from turboboa.errors import UserError
from turboboa.formats import get_format
from turboboa.quantized import QuantizedLinear

from .containers import LEVEL_FORMATS, Container, container_for, level_container


@dataclass(frozen=True)
class ExportProfile:
    """Rules of one export target.

    ``opsets``: allowed opsets, the first the default. ``seqlen``: static sequence length, or None for a
    dynamic one. ``default_seqlen``: the static length used when none is given (None: dynamic).
    ``symmetric_only``: refuse grids with a zero point other than ``2^(b-1)``. ``containers``: allowed
    container names (None: any). ``group_sizes``: allowed block sizes besides per channel (None: any).
    ``native_int2``: 2-bit grids in int2/uint2 when the opset has them. ``act_bits``: bits of static
    activation quantization (None: float activations). ``explicit_zero_point``: every weight
    DequantizeLinear gets a zero-point input (zeros for signed containers). ``quantized_graph``: every tensor
    of the graph is quantized (:mod:`.qnn`), not only the linear layers' inputs. ``blocked_lpbq_only``: blocks
    only in LPBQ's form (uniform grids and ggml types per channel, or refused).
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
    explicit_zero_point: bool = False
    quantized_graph: bool = False
    blocked_lpbq_only: bool = False

    @property
    def static(self) -> bool:
        """True when the graph has a fixed sequence length."""
        return self.seqlen is not None

    def container(self, q: QuantizedLinear) -> Container:
        """The container of layer ``q`` under this profile's opset: a ggml type's levels
        (:func:`~.containers.level_container`), else by bits and symmetry (native int2 from opset 25 on)."""
        levels = level_container(q.fmt)
        if levels is not None:
            return levels
        native = self.native_int2 and self.opset >= 25
        return container_for(q.bits, q.sym, native_int2=native)

    def takes_block(self, block: int, columns: int | None = None) -> bool:
        """True when blocks of ``block`` columns (per channel when ``block <= 0`` or ``>= columns``) are allowed."""
        per_channel = block <= 0 or (columns is not None and block >= columns)
        return per_channel or self.group_sizes is None or block in self.group_sizes

    def block_fix(self, fmt: str) -> str:
        """How to quantize again so the blocks fit: the group sizes of a configurable grid (the uniform one),
        the block sizes of the format's family (LPBQ's), or the ggml types whose blocks this profile takes (or
        ``--profile generic``, which takes every block)."""
        allowed = ", ".join(map(str, self.group_sizes or ()))
        f = get_format(fmt)
        if f.configurable:
            return f"--group-size -1 or {allowed}"
        if fmt not in LEVEL_FORMATS:
            return f"--format {f.family} --group-size {allowed}"
        fitting = [f for f in LEVEL_FORMATS if self.takes_block(get_format(f).group_size)]
        names = ", ".join(fitting[:-1]) + f" or {fitting[-1]}" if len(fitting) > 1 else "".join(fitting)
        return f"--format {names}, or export with --profile generic"

    def check_format(self, fmt: str, subject: str | None = None, columns: int | None = None) -> None:
        """Raise a one-line :class:`UserError` when the storage format ``fmt`` has blocks this profile does not
        take (a configurable grid, the uniform one, has the user's group size: checked per layer by
        :meth:`check_layer`); ``subject`` names the layer and ``columns`` its width (a single block is per
        channel)."""
        if get_format(fmt).configurable:
            return
        if self.blocked_lpbq_only and get_format(fmt).onnx_encoding != "lpbq":
            raise UserError(f"--profile {self.name} takes symmetric int4/int8 weights per channel or LPBQ blocks, "
                            f"not --format {fmt}; quantize again with --format int --sym --group-size -1, or "
                            f"--format lpbq4")
        block = get_format(fmt).group_size
        if not self.takes_block(block, columns):
            allowed = ", ".join(map(str, self.group_sizes or ()))
            who = f"{subject} ({fmt})" if subject else f"--format {fmt}"
            raise UserError(f"--profile {self.name} takes per-channel grids or blocks of {allowed}, but {who} "
                            f"has groups of {block}; quantize again with {self.block_fix(fmt)}")

    def check_layer(self, name: str, q: QuantizedLinear) -> None:
        """Raise a one-line :class:`UserError` when layer ``name``'s grid cannot be expressed under this profile."""
        if self.symmetric_only and not q.sym:
            raise UserError(f"--profile {self.name} needs symmetric weights (zero point 0), but {name} has an "
                            f"asymmetric {q.bits}-bit grid; quantize again with --sym")
        if not get_format(q.fmt).configurable:
            self.check_format(q.fmt, name, q.shape[1])
        elif self.blocked_lpbq_only and 0 < q.group_size < q.shape[1]:
            raise UserError(f"--profile {self.name} takes uniform grids per output channel only (blocks need "
                            f"LPBQ), but {name} has groups of {q.group_size}; quantize again with --group-size -1, "
                            f"or --format lpbq4")
        elif not self.takes_block(q.group_size, q.shape[1]):
            allowed = ", ".join(map(str, self.group_sizes or ()))
            raise UserError(f"--profile {self.name} takes per-channel grids or blocks of {allowed}, but {name} "
                            f"has groups of {q.group_size}; quantize again with {self.block_fix(q.fmt)}")
        container = self.container(q)
        if self.containers is not None and container.name not in self.containers:
            allowed = ", ".join(sorted(self.containers))
            raise UserError(f"--profile {self.name} takes {allowed} weights, but {name}'s {q.bits}-bit grid "
                            f"needs {container.label}; quantize again with --sym")


PROFILES = {
    "generic": ExportProfile("generic", opsets=(21, 22, 23, 24, 25)),
    "npu": ExportProfile("npu", opsets=(21,), default_seqlen=512, symmetric_only=True,
                         containers=frozenset({"int4", "int8"}), group_sizes=(32, 64, 128), native_int2=False),
    "openvino": ExportProfile("openvino", opsets=(21,), containers=frozenset({"int4", "uint4", "int8", "uint8"}),
                              group_sizes=(32, 64, 128), native_int2=False),
    "qnn-htp": ExportProfile("qnn-htp", opsets=(23,), default_seqlen=128, symmetric_only=True,
                             containers=frozenset({"int4", "int8"}), group_sizes=(16, 32, 64, 128),
                             native_int2=False, explicit_zero_point=True, quantized_graph=True,
                             blocked_lpbq_only=True),
}


def make_profile(name: str = "generic", opset: int | None = None, seqlen: int | None = None,
                 act_bits: int | None = None) -> ExportProfile:
    """The profile ``name`` with its opset (``opset`` or the default), sequence length (``seqlen``, else
    the profile's default; None means dynamic) and static activation bits (``act_bits``: None, 8 or 16).
    Bad choices are a one-line :class:`UserError`."""
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
