"""``--format lpbq4``: every solver lands exactly on the LPBQ grid, and its ONNX pattern decodes it exactly.

``W_hat[r, c] = fp32(fp32(s_r * k[r, c // B]) * (code - 8))`` with one positive float32 ``s_r`` per row and
integer ``k`` in 1..16 per block; checked by brute force on small problems, against onnxruntime's
DequantizeLinear pair (bit for bit), through the QDIR, on a tiny Llama (logits within 1e-4 relative), and
the GGUF exporter refuses it in one line.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from exporters.onnx import check_onnx_weights, export_onnx
from exporters.onnx.check import run_alone
from turboboa.blockwise import quantize_layer
from turboboa.checkpoint import load_qdir, save_qdir
from turboboa.config import QuantConfig
from turboboa.errors import UserError
from turboboa.formats import GgmlGrid, get_format
from turboboa.formats.choice import layer_format
from turboboa.formats.lpbq import K_MAX, LpbqSpec
from turboboa.formats.spec import format_spec, reshape_grid
from turboboa.grids import BlockGrid
from turboboa.quantized import QuantizedLinear
from turboboa.solvers import LayerProblem
from turboboa.solvers.gptq import gptq_quantize
from turboboa.solvers.refine import kron_objective, refine_params
from turboboa.solvers.rtn import rtn_quantize

from .conftest import EMBEDDING, run_cli
from .test_format_solvers import objective, problem, solve_problem
from .test_onnx_export import (
    REL_BOUND,
    assert_one_line_error,
    one_weight_model,
    perturbed_tiny,
    quantize,
    relative_gap,
)

LPBQ = ("lpbq4", "lpbq4_g64")
METHODS = ("rtn", "gptq", "boa", "turboboa")


def rebuild(q: QuantizedLinear) -> torch.Tensor:
    """``W_hat`` from the stored ``(s, k, codes)`` alone, in the ONNX graph's order."""
    B = get_format(q.fmt).block_size
    s = q.grid.d[:, :1]
    block_scale = s * q.grid.sc.float()  # DequantizeLinear(k, s)
    return block_scale.repeat_interleave(B, -1) * (q.codes.float() - 8)  # DequantizeLinear(q, block scale)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_tokenizer):
    return perturbed_tiny(tmp_path_factory.mktemp("lpbq") / "llama", default_tokenizer)


# --- the grid, for every method -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", LPBQ)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_lands_on_the_lpbq_grid(fmt: str, method: str) -> None:
    W, q = solve_problem(method, fmt)
    f = get_format(fmt)
    f.check_grid(q.codes, q.grid)  # one positive float32 s per row, k in 1..16, codes 0..15
    assert q.fmt == fmt and q.bits == 4 and q.sym and q.group_size == f.block_size
    assert torch.equal(q.dequantize(), rebuild(q))
    assert torch.equal(q.scale, q.grid.d * q.grid.sc.float()) and not q.zero.any()
    if method in ("rtn", "gptq"):  # without row coupling an all-zero row stays exactly zero
        assert torch.equal(q.dequantize()[3], torch.zeros(W.shape[1]))
        assert float(q.grid.d[3, 0]) == 1.0 and bool((q.grid.sc[3] == 1).all())
        # and so does an all-zero block solved before any other column (act-order would compensate into it)
        W, q = solve_problem(method, fmt, act_order=False)
        assert torch.equal(q.dequantize()[5, :256], torch.zeros(256))
        assert bool((q.grid.sc[5, : 256 // f.block_size] == 1).all())


@pytest.mark.parametrize("fmt", LPBQ)
def test_gptq_column_loop_q_is_the_formats_dequantization(fmt: str) -> None:
    W, H, _ = problem(seed=1)
    spec = format_spec(fmt)
    assert isinstance(spec, LpbqSpec)
    res = gptq_quantize(W, H, spec, spec.fmt.group_size)
    grid = reshape_grid(res.stored, W.shape[0])
    assert torch.equal(res.Q, spec.fmt.dequantize(res.codes.to(torch.uint8), grid))
    spec.fmt.check_grid(res.codes.to(torch.uint8), grid)


def test_rtn_block_multipliers_are_the_brute_force_best() -> None:
    """Tiny case: for the s_r RTN fixed, no k in 1..16 of any block gives a smaller error than RTN's choice
    (every combination of the two blocks of each row tried)."""
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(1, 6, 64, generator=gen) * torch.tensor([1.0, 0.1, 3.0, 0.01, 1.0, 0.5]).reshape(1, 6, 1)
    W[0, 4, 32:] *= 0.05  # a quiet second block: k far below 16
    spec = format_spec("lpbq4", search=False)
    res = rtn_quantize(W, spec, 32)
    s = res.stored.d[0, :, :1]
    k_rtn = res.stored.sc[0]

    def error(k: torch.Tensor) -> torch.Tensor:
        """Squared error of nearest rounding of each row for block multipliers ``k`` (rows, 2)."""
        scale = (s * k.float()).repeat_interleave(32, -1)
        q = torch.clamp(torch.round(W[0] / scale), -8, 7)
        return ((scale * q - W[0]) ** 2).sum(-1)

    pairs = itertools.product(range(1, K_MAX + 1), repeat=2)
    best = torch.stack([error(torch.tensor(c).expand(6, 2)) for c in pairs])
    assert torch.equal(error(k_rtn), best.min(0).values)
    assert torch.equal(error(k_rtn), ((res.Q[0] - W[0]) ** 2).sum(-1))
    assert int(k_rtn[4, 1]) < 8 <= int(k_rtn[4, 0])


@pytest.mark.parametrize("fmt", LPBQ)
def test_gptq_beats_rtn_on_the_lpbq_grid(fmt: str) -> None:
    W, H, _ = problem(seed=2)
    spec = format_spec(fmt)
    rtn = rtn_quantize(W.unsqueeze(0), spec, spec.fmt.group_size, H.unsqueeze(0))
    gptq = gptq_quantize(W, H, spec, spec.fmt.group_size)
    assert objective(W, gptq.Q, H) < 0.95 * objective(W, rtn.Q[0], H)


@pytest.mark.parametrize("coupled", [False, True])
def test_channel_scale_refinement_never_increases_the_objective(coupled: bool) -> None:
    W, H, H_row = problem(seed=3)
    f = get_format("lpbq4")
    heads = H_row.shape[0]
    Wh = W.reshape(heads, -1, W.shape[1])
    res = gptq_quantize(Wh, H.expand(heads, -1, -1), format_spec("lpbq4"), f.group_size)
    Hr = H_row if coupled else None
    before = kron_objective(Wh, res.Q, H.unsqueeze(0), Hr)
    grid, Q = refine_params(format_spec("lpbq4"), Wh, res.codes, BlockGrid(res.scale, res.zero, res.stored),
                            H.unsqueeze(0), Hr, f.group_size, iters=2)
    after = kron_objective(Wh, Q, H.unsqueeze(0), Hr)
    assert after < before
    flat = reshape_grid(grid.stored, W.shape[0])
    codes = res.codes.reshape(W.shape).to(torch.uint8)
    assert torch.equal(Q.reshape(W.shape), f.dequantize(codes, flat))
    f.check_grid(codes, flat)  # still one positive s per row, the same k
    assert torch.equal(flat.sc, reshape_grid(res.stored, W.shape[0]).sc)


def test_refinement_finds_the_optimal_channel_scale() -> None:
    """Identity Hessian: with codes and k fixed the best s_r is <w, k q> / <k q, k q> (up to float32)."""
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(1, 8, 128, generator=gen)
    res = rtn_quantize(W, format_spec("lpbq4", search=False), 32)
    grid, _ = refine_params(format_spec("lpbq4"), W, res.codes, BlockGrid(res.scale, res.zero, res.stored),
                            torch.eye(128)[None], None, 32)
    kq = res.stored.sc.float().repeat_interleave(32, -1) * (res.codes - 8)
    best = (W * kq).sum(-1) / (kq * kq).sum(-1)
    assert torch.allclose(grid.stored.d[..., 0], best, rtol=1e-5, atol=0)
    assert bool((grid.stored.d == grid.stored.d[..., :1]).all())


# --- configuration ------------------------------------------------------------------------------------------


def test_block_size_comes_from_the_format_or_group_size() -> None:
    assert (QuantConfig(format="lpbq4").format, QuantConfig(format="lpbq4").group_size) == ("lpbq4", 32)
    cfg = QuantConfig(format="lpbq4", group_size=64)
    assert (cfg.format, cfg.group_size) == ("lpbq4_g64", 64)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    assert QuantConfig(format="lpbq4_g128").group_size == 128
    assert QuantConfig().group_size == 128 and QuantConfig(group_size=-1).group_size == -1
    with pytest.raises(UserError, match="--format lpbq4 takes --group-size 16, 32, 64, 128"):
        QuantConfig(format="lpbq4", group_size=-1)
    with pytest.raises(UserError, match="has blocks of 64 columns"):
        QuantConfig(format="lpbq4_g64", group_size=32)
    with pytest.raises(UserError, match="multiple of the 128-column block"):
        layer_format("lpbq4_g128", "model.layers.0.self_attn.q_proj", 576)
    assert layer_format("int", "x.down_proj", 1536, (("*.down_proj", "lpbq4"),)) == "lpbq4"


def test_qdir_round_trip_keeps_the_lpbq_grid(tmp_path, tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    W, H, _ = problem(C=64, R=64)
    cfg = QuantConfig(method="gptq", format="lpbq4")
    name = "model.layers.0.self_attn.q_proj"
    q = quantize_layer(LayerProblem(name, W, H, fmt="lpbq4"), cfg)
    save_qdir(tmp_path / "q", model, None, {name: q}, cfg, {})
    ckpt = load_qdir(tmp_path / "q")
    back = ckpt.layers[name]
    assert ckpt.config == cfg and back.fmt == "lpbq4" and back.group_size == 32
    assert back.grid.equal(q.grid) and torch.equal(back.codes, q.codes)
    assert torch.equal(back.dequantize(), q.dequantize())


# --- ONNX ---------------------------------------------------------------------------------------------------


def random_lpbq(rows: int = 40, columns: int = 192, block: int = 32, seed: int = 0) -> QuantizedLinear:
    """Random codes over 0..15, k over 1..16 (both ends), per-channel scales of mixed magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    nb = columns // block
    codes = torch.randint(0, 16, (rows, columns), generator=gen, dtype=torch.uint8)
    codes[0, :2] = torch.tensor([0, 15], dtype=torch.uint8)
    k = torch.randint(1, K_MAX + 1, (rows, nb), generator=gen, dtype=torch.int32)
    k[0, :2] = torch.tensor([1, K_MAX], dtype=torch.int32)
    s = torch.exp(torch.randn(rows, 1, generator=gen) * 3).expand(rows, nb).contiguous()
    fmt = {16: "lpbq4_g16", 32: "lpbq4", 64: "lpbq4_g64", 128: "lpbq4_g128"}[block]
    grid = GgmlGrid(d=s, sc=k)
    scale, zero = get_format(fmt).group_scale_offset(grid)
    return QuantizedLinear(codes=codes, scale=scale, zero=zero, bits=4, group_size=block, sym=True, fmt=fmt,
                           grid=grid)


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_lpbq_pattern_decodes_to_the_fake_quant_weight(block: int) -> None:
    q = random_lpbq(columns=384, block=block)
    model = one_weight_model(q, 21)
    inits = {t.name: t for t in model.graph.initializer}
    nb, N, K = q.shape[1] // block, q.shape[0], q.shape[1]
    def kind(name: str) -> tuple[int, list[int]]:
        return inits[f"layer.{name}"].data_type, list(inits[f"layer.{name}"].dims)

    assert kind("weight_q") == (TensorProto.INT4, [K, N])
    assert kind("weight_block_scale_q") == (TensorProto.UINT8, [nb, N])
    assert kind("weight_channel_scale") == (TensorProto.FLOAT, [N])
    assert inits["layer.weight_zero_point"].data_type == TensorProto.INT4
    assert inits["layer.weight_block_scale_zero_point"].data_type == TensorProto.UINT8
    for name in ("layer.weight_zero_point", "layer.weight_block_scale_zero_point"):
        assert not onnx.numpy_helper.to_array(inits[name]).astype(np.int16).any()
    scale_dq, weight_dq = model.graph.node
    attrs = {a.name: a.i for a in weight_dq.attribute}
    assert scale_dq.op_type == weight_dq.op_type == "DequantizeLinear"
    assert {a.name: a.i for a in scale_dq.attribute} == {"axis": 1}
    assert attrs == {"axis": 0, "block_size": block} and weight_dq.input[1] == scale_dq.output[0]
    got = run_alone(model)
    assert np.array_equal(got.T, q.dequantize().numpy())


@pytest.mark.parametrize("method", ["rtn", "turboboa"])
def test_tiny_model_lpbq_logits_match_fake_quant(tmp_path, tiny_llama, method) -> None:
    from transformers import AutoTokenizer

    from turboboa import quantization
    from turboboa.data import eval_tokens

    quantization.quantize(str(tiny_llama), QuantConfig(method=method, format="lpbq4", rows=4, nsamples=2, seqlen=32),
                 tmp_path / "q", device="cpu", progress=False)
    ckpt = load_qdir(tmp_path / "q")
    assert {q.fmt for name, q in ckpt.layers.items() if name != EMBEDDING} == {"lpbq4"}
    ids = eval_tokens(AutoTokenizer.from_pretrained(ckpt.path), "wikitext2")
    cases = (("generic", {}, [ids[:64], ids[64:81]]), ("npu", {"seqlen": 64}, [ids[:64]]))
    for profile, options, windows in cases:
        path = export_onnx(ckpt, tmp_path / f"{profile}.onnx", profile=profile, **options)
        gaps = check_onnx_weights(path, ckpt)
        assert len(gaps) == len(ckpt.layers) and max(gaps.values()) == 0.0
        gap = relative_gap(path, ckpt, windows)
        print(f"lpbq4 {method} {profile}: max |onnxruntime - torch| / max |logit| = {gap:.3g}")
        assert gap < REL_BOUND
        props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        # the LPBQ layers, and under generic the embedding's q8_0 table (int8 codes; npu keeps it float)
        assert json.loads(props["turboboa.containers"]) == {"4": "int4+lpbq", **({"8": "int8"} if profile == "generic"
                                                                                  else {})}
        assert "lpbq" in props["turboboa.weight_pattern"]


def test_exporters_refuse_what_they_cannot_express(tmp_path, tiny_llama) -> None:
    quantize(tiny_llama, tmp_path / "lpbq", format="lpbq4")
    quantize(tiny_llama, tmp_path / "g16", format="lpbq4", group_size=16)
    out = tmp_path / "m.gguf"
    proc = run_cli("export", str(tmp_path / "lpbq"), "--to", "gguf", "-o", str(out))
    assert_one_line_error(proc, "lpbq4", "--to onnx")
    assert not out.exists()
    proc = run_cli("export", str(tmp_path / "g16"), "--to", "onnx", "--profile", "npu", "-o",
                   str(tmp_path / "m.onnx"))
    assert_one_line_error(proc, "groups of 16", "32, 64, 128")
