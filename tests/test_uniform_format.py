"""The uniform integer grid is the registered format ``int``, and every grid answers the same interface.

* ``get_format("int")`` is the uniform grid; a layer on it dequantizes through the registry exactly as
  :func:`turboboa.grids.dequantize_weight` (bit for bit, ragged last groups and per channel included);
* its bits, group size and symmetry are the layer's (the run's), a block format's are its own;
* the capabilities the pipeline and the exporters ask for: solver grid, width check, GGUF type and refusal,
  ONNX encoding;
* the registry lists it first, ``--format int`` and ``--tensor-format PATTERN=int`` take it, ``--embed-format``
  does not (a table is rounded onto a block format).
"""

from __future__ import annotations

import math

import pytest
import torch

from turboboa.config import QuantConfig
from turboboa.errors import UserError
from turboboa.formats import (
    BlockFormat,
    Format,
    GridParams,
    all_format_names,
    block_format_names,
    format_names,
    get_format,
    is_ggml_format,
)
from turboboa.formats.uniform import UNIFORM, UniformFormat
from turboboa.grids import GridSpec, dequantize_weight
from turboboa.quantized import QuantizedLinear, empty_rows, set_rows


def uniform_layer(bits: int, group: int, sym: bool, rows: int = 24, columns: int = 200,
                  seed: int = 0) -> QuantizedLinear:
    """Random codes, scales of mixed magnitudes and integer zero points on the ``bits`` grid (200 columns:
    ragged last groups for most group sizes)."""
    gen = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    groups = 1 if group <= 0 else math.ceil(columns / group)
    codes = torch.randint(0, maxq + 1, (rows, columns), generator=gen, dtype=torch.uint8)
    scale = torch.exp(torch.randn(rows, groups, generator=gen) * 3).float()
    zero = (torch.full((rows, groups), float(2 ** (bits - 1))) if sym
            else torch.randint(0, maxq + 1, (rows, groups), generator=gen).float())
    return QuantizedLinear(codes=codes, scale=scale, zero=zero, bits=bits, group_size=group, sym=sym)


def test_int_is_the_registered_uniform_grid() -> None:
    fmt = get_format("int")
    assert fmt is UniformFormat and get_format("INT") is fmt and issubclass(fmt, Format)
    assert fmt.name == UNIFORM == "int" and fmt.family == "int" and not issubclass(fmt, BlockFormat)
    assert fmt.configurable and fmt.ggml_type is None and fmt.onnx_encoding == "uniform"
    assert all_format_names()[0] == "int"
    assert "int" not in format_names() and "int" not in block_format_names() and not is_ggml_format("int")
    assert set(all_format_names()) == {"int", *block_format_names()}
    with pytest.raises(TypeError):
        fmt()


@pytest.mark.parametrize(("bits", "group", "sym"), [(2, 32, False), (3, 32, False), (4, 128, True),
                                                    (8, -1, False), (4, 64, False), (3, 200, True)])
def test_uniform_layer_dequantizes_through_the_registry_bit_for_bit(bits: int, group: int, sym: bool) -> None:
    """``W_hat[r, c] = scale[r, g] * (codes[r, c] - zero[r, g])``: the layer, the registry and the grid
    function give the same float32 bits."""
    q = uniform_layer(bits, group, sym)
    ref = dequantize_weight(q.codes, q.scale, q.zero, q.group_size)
    assert q.fmt == "int" and ref.dtype == torch.float32
    assert torch.equal(get_format(q.fmt).dequantize_layer(q), ref)
    assert torch.equal(q.dequantize(), ref)
    both = empty_rows(q, q.shape[0])
    set_rows(both, 10, q.row_slice(10, q.shape[0]))  # filled out of order: each part lands at its offset
    set_rows(both, 0, q.row_slice(0, 10))
    assert torch.equal(both.dequantize(), ref)


def test_a_storage_format_layer_assembled_from_row_parts_keeps_every_field() -> None:
    """A q6_k layer (scales, zero points and the stored ``d``/``sc`` fields) rebuilt from two row parts, as a
    table is rounded a band of rows at a time: every field and the decoded weight are the layer's."""
    from turboboa.blockwise import quantize_layer
    from turboboa.solvers import LayerProblem

    W = torch.randn(24, 512, generator=torch.Generator().manual_seed(0))
    q = quantize_layer(LayerProblem("t", W, torch.eye(512), fmt="q6_k"),
                       QuantConfig(method="rtn", grid="search"))
    assert q.grid is not None
    both = empty_rows(q, 24)
    set_rows(both, 0, q.row_slice(0, 7))
    set_rows(both, 7, q.row_slice(7, 24))
    for key in ("codes", "scale", "zero"):
        assert torch.equal(getattr(both, key), getattr(q, key)), key
    for key, value in vars(q.grid).items():
        assert (value is None and getattr(both.grid, key) is None) or torch.equal(getattr(both.grid, key), value), key
    assert torch.equal(both.dequantize(), q.dequantize())


def test_grid_params_are_the_layers_for_int_and_the_formats_own_otherwise() -> None:
    assert get_format("int").grid_params(3, 32, False) == GridParams(3, 32, False)
    assert get_format("int").grid_params(4, -1, True) == GridParams(4, -1, True)
    assert get_format("q4_0").grid_params(3, 128, False) == GridParams(4, 32, True)
    assert get_format("q4_k").grid_params(3, 128, True) == GridParams(4, 32, False)
    assert get_format("q6_k").grid_params(3, 128, False) == GridParams(6, 16, True)
    assert get_format("lpbq4_g64").grid_params(8, 128, False) == GridParams(4, 64, True)
    for name in block_format_names():
        f = get_format(name)
        assert not f.configurable and f.grid_params(2, 7, False) == (f.bits, f.group_size, not f.asymmetric)


def test_solver_grid_of_int_is_the_configs_uniform_grid() -> None:
    c = QuantConfig(method="gptq", bits=3, group_size=32, sym=True)
    spec, group = get_format("int").solver_grid(bits=3, group_size=32, sym=True, search=True)
    assert spec == GridSpec(bits=3, sym=True, search=True) == c.grid_spec() and group == 32
    assert c.solver_grid("int") == (c.grid_spec(), 32)
    rtn = QuantConfig(method="rtn", bits=4, group_size=-1)
    assert rtn.solver_grid("int") == (GridSpec(bits=4, sym=False, search=False), -1)


def test_width_checks() -> None:
    """A uniform group may not be wider than the layer (a narrower last group is fine); a block format
    keeps its block rule."""
    uniform = get_format("int")
    uniform.check_columns(576, 128, "layer 0.q_proj")
    uniform.check_columns(64, -1, "layer 0.q_proj")
    uniform.check_columns(64, 64, "layer 0.q_proj")
    with pytest.raises(UserError, match=r"--group-size 128 is wider than the input width 64 of layer 1\.o_proj"):
        uniform.check_columns(64, 128, "layer 1.o_proj")
    assert uniform.supports_width(200)
    get_format("q4_k").check_columns(512, 128, "layer 0.q_proj")
    with pytest.raises(UserError, match="256"):
        get_format("q4_k").check_columns(576, 128, "layer 0.q_proj")


def test_gguf_refusals_come_from_the_format() -> None:
    """Formats without a ggml type give their own one-line reason; every ggml type has a type."""
    text = get_format("int").gguf_refusal("Q", "model.layers.0.mlp.up_proj")
    assert "uniform grid" in text and "model.layers.0.mlp.up_proj" in text and "--format" in text
    text = get_format("lpbq4_g64").gguf_refusal("Q", "x")
    assert "lpbq4_g64 layers (e.g. x)" in text and "LPBQ" in text and "--to onnx" in text
    assert all("\n" not in get_format(n).gguf_refusal("Q", "x") for n in ("int", "lpbq4"))
    assert {n for n in all_format_names() if get_format(n).ggml_type is not None} == set(format_names())


def test_int_is_a_format_choice_but_not_a_table_format() -> None:
    assert QuantConfig(format="INT").format == "int"
    assert QuantConfig(tensor_formats=("*.down_proj=int",), format="q4_0").tensor_formats
    with pytest.raises(UserError, match="unknown --format 'q9'; choose one of int, q4_0"):
        QuantConfig(format="q9")
    with pytest.raises(UserError, match="unknown --embed-format 'int'"):
        QuantConfig(embed_format="int")


def test_the_pipeline_asks_each_layers_format_to_check_its_width(tiny_llama_dir) -> None:
    """Hidden 64, MLP 128: groups of 128 fit the MLP's down_proj but not the 64-wide layers (a uniform
    grid), while q8_0's 32-column blocks fit every layer whatever the group size."""
    from transformers import AutoModelForCausalLM

    from turboboa.arch import get_adapter
    from turboboa.blockwise import check_group_size

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    adapter = get_adapter(model)
    with pytest.raises(UserError, match=r"--group-size 128 is wider than the input width 64 of layer 0\.self_attn"):
        check_group_size(model, adapter, QuantConfig(format="int", group_size=128))
    formats = check_group_size(model, adapter, QuantConfig(format="q8_0", group_size=128))
    assert set(formats.values()) == {"q8_0"}
    formats = check_group_size(model, adapter, QuantConfig(format="int", group_size=64))
    assert set(formats.values()) == {"int"}
