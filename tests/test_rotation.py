"""Rotation (QuaRot) fused into the weights, online rotations, and per-token weight-activation quantization.

* Hadamard matrices of every order the models need are Hadamard (``H H^T = n I``); the Kronecker-form
  transform equals the dense matrix; an order with no construction is one clear line.
* Folding the norms and fusing the rotations keeps the function (tiny Llama and Qwen2 with biases, random norm
  weights, tied embeddings untied), online down_proj rotation included; and on the default model the rotated
  float PPL equals the float PPL within 1e-4 relative, for each kind, padded to 256 as well.
* The per-token quantizer equals its definition computed vector by vector.
* A rotated W-A QDIR is simulated by ``turboboa eval`` and exported to ONNX with blocked QuantizeLinear ops
  whose scales are computed in the graph; GGUF refuses it in one line; a rotated weight-only QDIR exports to
  a GGUF that llama.cpp runs.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from exporters.gguf.export import check_gguf_weights
from turboboa import quantization
from turboboa.activations.dynamic import DynamicSpec, fake_quant_dynamic, install_dynamic
from turboboa.checkpoint import load_qdir
from turboboa.errors import UserError
from turboboa.rotation import (
    HadamardTransform,
    hadamard_matrix,
    random_orthogonal,
    randomized_hadamard,
    rotate_model,
)
from turboboa.rotation.hadamard import factorization

from .conftest import assert_one_line_error, make_tiny_llama, run_cli


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 44, 60, 64, 96, 576, 768, 1536])
def test_hadamard_matrices_are_hadamard_and_the_transform_is_them(n) -> None:
    H = hadamard_matrix(n)
    assert set(H.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))
    x = torch.randn(3, 5, n, dtype=torch.float64)
    T = HadamardTransform(n)
    assert torch.allclose(T(x), x @ T.matrix(), atol=1e-12)
    for Q in (randomized_hadamard(n, 3), random_orthogonal(n, 3)):
        assert torch.allclose(Q @ Q.T, torch.eye(n, dtype=torch.float64), atol=1e-10)
    assert torch.equal(randomized_hadamard(n, 3), randomized_hadamard(n, 3))  # seeded


def test_factorizations_and_an_impossible_order() -> None:
    assert factorization(576) == (36, 16) and factorization(1536) == (12, 128) and factorization(768) == (12, 64)
    with pytest.raises(UserError, match="no Hadamard matrix of order 6"):
        factorization(6)


def _tiny(tmp_path, tokenizer, model_type: str):
    from transformers import AutoModelForCausalLM

    folder = make_tiny_llama(tmp_path / model_type, tokenizer, hidden=96, heads=6, kv_heads=2, intermediate=192,
                             model_type=model_type)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_((0.5 if "norm" in name else 0.05) * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("model_type,kind,pad", [("llama", "hadamard", 0), ("llama", "random", 0),
                                                  ("qwen2", "hadamard", 0), ("llama", "hadamard", 128)])
def test_fused_rotation_keeps_the_function(tmp_path, default_tokenizer, model_type, kind, pad) -> None:
    from turboboa.models.padding import pad_model

    model = _tiny(tmp_path, default_tokenizer, model_type)
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        if pad:  # padded first (96 -> 128 wide, 6 -> 8 heads, 192 -> 256), then rotated at the padded width
            pad_model(model, pad)
        report = rotate_model(model, kind, seed=5, online_down=True)
        install_dynamic(model, DynamicSpec(online_down=True, online_qk=True))
        got = model(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert report["untied_head"] and not model.config.tie_word_embeddings
    assert report["residual"] == (128 if pad else 96)
    for layer in model.model.layers:  # the norms are weight-free: a plain Llama with norm weights of ones
        assert (layer.input_layernorm.weight == 1).all() and (layer.post_attention_layernorm.weight == 1).all()
    assert (model.model.norm.weight == 1).all()


def test_default_model_rotated_float_ppl_equals_float_ppl() -> None:
    from turboboa.data import eval_tokens
    from turboboa.eval.perplexity import make_windows, perplexity, torch_logits_fn
    from turboboa.models import load_float_model
    from turboboa.models.padding import pad_model

    base = load_float_model("smollm2-135m")
    windows = make_windows(eval_tokens(base.tokenizer, "wikitext2"), 256, 1)
    ref = perplexity(torch_logits_fn(base.model), windows, "float", progress=False).ppl
    for kind, pad in (("hadamard", 0), ("random", 0), ("hadamard", 256)):
        model = load_float_model("smollm2-135m").model
        if pad:
            pad_model(model, pad)
        rotate_model(model, kind, seed=0)
        got = perplexity(torch_logits_fn(model), windows, kind, progress=False).ppl
        assert abs(got / ref - 1) <= 1e-4, (kind, pad, got, ref)


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True), (8, False), (6, True)])
def test_per_token_quantizer_equals_its_definition(bits, sym) -> None:
    x = torch.randn(3, 7, 32) * torch.rand(3, 7, 1) * 5
    x[0, 0] = 0  # a vector of zeros stays zeros
    got = fake_quant_dynamic(x, bits, sym)
    for v, g in zip(x.reshape(-1, 32), got.reshape(-1, 32), strict=True):
        if sym:
            s = v.abs().max() / (2 ** (bits - 1) - 1)
            s = s if s > 0 else torch.tensor(1.0)
            want = torch.clamp(torch.round(v / s), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * s
        else:
            lo, hi = min(v.min(), torch.tensor(0.0)), max(v.max(), torch.tensor(0.0))
            s = (hi - lo) / (2**bits - 1)
            s = s if s > 0 else torch.tensor(1.0)
            z = torch.clamp(torch.round(-lo / s), 0, 2**bits - 1)
            want = (torch.clamp(torch.round(v / s) + z, 0, 2**bits - 1) - z) * s
        assert torch.equal(g, want)
    assert torch.allclose(fake_quant_dynamic(got, bits, sym), got, rtol=0, atol=1e-5)  # min-max: idempotent
    assert (got[0, 0] == 0).all()


@pytest.fixture(scope="module")
def wa_qdir(tmp_path_factory, default_tokenizer):
    tmp = tmp_path_factory.mktemp("wa")
    folder = make_tiny_llama(tmp / "m", default_tokenizer, hidden=96, heads=6, kv_heads=2, intermediate=192)
    qdir = tmp / "q"
    proc = run_cli("quantize", str(folder), "--method", "gptq", "--bits", "4", "--group-size", "-1", "--rotate",
                   "hadamard", "--act-bits", "4", "--kv-bits", "4", "--calib", "wikitext2", "--nsamples", "4",
                   "--seqlen", "64", "-q", "-o", str(qdir))
    assert proc.returncode == 0, proc.stderr
    return qdir


def test_weight_activation_qdir_records_and_simulates_the_protocol(wa_qdir) -> None:
    from turboboa.checkpoint import load_fakequant_model

    meta = json.loads((wa_qdir / "quant_config.json").read_text())
    assert meta["rotation"]["kind"] == "hadamard" and meta["rotation"]["online_down"]
    assert meta["dynamic_activations"]["act_bits"] == 4 and meta["dynamic_activations"]["kv_bits"] == 4
    assert meta["quant_config"]["online_rotate"] == "down,qk"
    ckpt = load_qdir(wa_qdir)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a4 = load_fakequant_model(ckpt)(input_ids=ids).logits
        a16 = load_fakequant_model(ckpt, activations=False)(input_ids=ids).logits
        a16b = load_fakequant_model(ckpt, dynamic=DynamicSpec(online_down=True, online_qk=True))(input_ids=ids).logits
    assert torch.allclose(a16, a16b, atol=1e-5)  # online rotations alone keep the weights' function
    assert not torch.allclose(a4, a16, atol=1e-3)  # the quantizers are on
    out = run_cli("eval", str(wa_qdir), "--seqlen", "64", "--max-windows", "2", "--json", "-q")
    out8 = run_cli("eval", str(wa_qdir), "--seqlen", "64", "--max-windows", "2", "--json", "-q", "--act-bits", "8",
                   "--kv-bits", "8")
    r4, r8 = json.loads(out.stdout), json.loads(out8.stdout)
    assert r4["dynamic_activations"]["act_bits"] == 4 and r8["dynamic_activations"]["act_bits"] == 8
    assert r4["ppl"] != r8["ppl"]


def test_weight_activation_onnx_uses_dynamic_quantize_ops_and_matches(tmp_path, wa_qdir) -> None:
    import onnx
    import onnxruntime as ort

    from turboboa.checkpoint import load_fakequant_model

    path = tmp_path / "wa.onnx"
    proc = run_cli("export", str(wa_qdir), "--to", "onnx", "-o", str(path), "-q")
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(path))
    blocked = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    # per block: 7 layer inputs + keys + values (+ their zero points: keys and values are asymmetric)
    assert len(blocked) == 2 * (7 + 2 + 2)
    assert sum("OnlineHadamard" in n.name and n.op_type == "MatMul" for n in model.graph.node) >= 2
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["turboboa.dynamic_activations"])["kv_bits"] == 4
    ids = torch.randint(0, 1000, (1, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = load_fakequant_model(load_qdir(wa_qdir))(input_ids=ids).logits.numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids.numpy()})[0]
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_what_a_runtime_cannot_compute_is_refused_in_one_line(tmp_path, wa_qdir, tiny_llama_dir,
                                                               cli_main) -> None:
    from turboboa import quantization
    from turboboa.config import QuantConfig

    assert_one_line_error(cli_main("export", str(wa_qdir), "--to", "gguf", "-o", str(tmp_path / "x.gguf")),
                          "online rotations", "--to onnx")
    assert not (tmp_path / "x.gguf").exists()
    assert_one_line_error(cli_main("quantize", str(tiny_llama_dir), "--online-rotate", "down", "-o",
                                   str(tmp_path / "q")), "weight-activation")
    assert not (tmp_path / "q").exists()
    for bad, words in (({"rotate": "spin"}, "--rotate"), ({"dyn_act_bits": 5}, "--act-bits 5"),
                       ({"kv_bits": 3}, "--kv-bits 3"), ({"online_rotate": "up"}, "--online-rotate")):
        with pytest.raises(UserError, match=words):
            QuantConfig(**bad)
    from exporters import export

    with pytest.raises(UserError, match="--profile qnn-htp"):
        export(load_qdir(wa_qdir), "onnx", tmp_path / "x.onnx", profile="qnn-htp")
    a6 = tmp_path / "a6"
    quantization.quantize(str(tiny_llama_dir), QuantConfig(method="rtn", group_size=-1, dyn_act_bits=6, nsamples=2, seqlen=32),
                 a6, progress=False)
    with pytest.raises(UserError, match="6-bit"):
        export(load_qdir(a6), "onnx", tmp_path / "a6.onnx")
    with pytest.raises(UserError, match="per-token A6"):
        export(load_qdir(a6), "gguf", tmp_path / "a6.gguf")
    assert not any(p.suffix in (".onnx", ".gguf") for p in tmp_path.iterdir())


def test_auto_rotation_rotates_unless_it_unties_a_tied_head(tmp_path, tiny_llama_dir) -> None:
    """``--rotate auto`` (the default) rotates the models that GPTQ, BoA or TurboBoA quantize, except a
    weight-only run whose rotation would untie a tied head; never RTN's; weight-activation runs always rotate.
    The QDIR's config records what it resolved to; an explicit choice is kept."""
    from transformers import AutoModelForCausalLM

    from turboboa.config import QuantConfig, auto_rotation
    from turboboa.rotation.fuse import rotation_unties_head

    for method in ("gptq", "boa", "turboboa"):
        assert QuantConfig(method=method).rotate == "auto"  # decided with the model
        assert QuantConfig(method=method).resolve_rotation(unties_head=False).rotate == "hadamard"
        assert QuantConfig(method=method).resolve_rotation(unties_head=True).rotate == "none"
        assert QuantConfig(method=method, kv_bits=8).rotate == "hadamard"
        assert QuantConfig(method=method, rotate="random").resolve_rotation(True).rotate == "random"
    assert QuantConfig(method="rtn").rotate == "none" and auto_rotation("rtn", True, False) == "none"
    assert QuantConfig(method="rtn", pad_to=256, rotate="random").rotate == "random"
    assert QuantConfig.from_dict(QuantConfig(method="rtn").to_dict()).rotate == "none"

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)  # tied, final norm of ones: nothing to untie
    assert not rotation_unties_head(model)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    assert rotation_unties_head(model)
    shutil.copytree(tiny_llama_dir, tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    qdir = tmp_path / "q"
    quantization.quantize(str(tmp_path / "m"), QuantConfig(method="gptq", group_size=32, nsamples=2, seqlen=32), qdir,
                 progress=False)
    assert load_qdir(qdir).config.rotate == "none"
    quantization.quantize(str(tiny_llama_dir), QuantConfig(method="gptq", group_size=32, nsamples=2, seqlen=32), tmp_path / "r",
                 progress=False)
    assert load_qdir(tmp_path / "r").config.rotate == "hadamard"
    text = " ".join(run_cli("quantize", "--help").stdout.split())
    rotate_help = text[text.index("--rotate ["):text.index("--rotate-seed")]
    assert "unless it would untie a tied head" in rotate_help and "[default: auto]" in rotate_help


def test_rotated_weight_only_model_runs_in_llama_cpp(tmp_path, default_tokenizer) -> None:
    """A rotated, k-quantized model is a plain Llama GGUF (norm weights of ones, an untied head) that llama.cpp
    runs as the fake-quant model computes it (the default model's Q2_K check is bench/rotation.py's)."""
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    folder = make_tiny_llama(tmp_path / "m", default_tokenizer, hidden=256, heads=4, kv_heads=2, intermediate=512)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():  # norm weights other than ones: the head's fold differs from the embedding's
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(folder)
    qdir, gguf = tmp_path / "q", tmp_path / "m.gguf"
    proc = run_cli("quantize", str(folder), "--method", "gptq", "--preset", "Q4_K_M", "--rotate", "hadamard",
                   "--nsamples", "4", "--seqlen", "64", "-q", "-o", str(qdir))
    assert proc.returncode == 0, proc.stderr
    assert run_cli("export", str(qdir), "--to", "gguf", "-o", str(gguf), "-q").returncode == 0
    names = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    assert np.all(np.asarray(names["blk.0.attn_norm.weight"].data) == 1)
    # the untied head takes the preset's output type, as llama-quantize gives it; the embedding the default type
    assert names["output.weight"].tensor_type.name == "Q6_K" and names["token_embd.weight"].tensor_type.name == "Q4_K"
    assert max(check_gguf_weights(gguf, load_qdir(qdir)).values()) == 0.0
    ev = ["--seqlen", "128", "--max-windows", "2", "--json", "-q"]
    fq = json.loads(run_cli("eval", str(qdir), *ev).stdout)["ppl"]
    cpp = json.loads(run_cli("eval", str(gguf), "--tokenizer", str(qdir), *ev).stdout)["ppl"]
    assert abs(cpp / fq - 1) <= 0.01, (cpp, fq)
