"""The GGUF writer and the llama.cpp backend: files read back as written, and llama.cpp computes what torch does.

Measured on this machine (llama-cpp-python 0.3.36, CPU, 2 threads):

* tiny random Llama / Qwen2 (hidden 256, 4 heads of 64, 2 KV heads), F32 weights, 2 windows of 128 WikiText-2
  tokens: max |logit diff| 4e-5 to 9e-5 with an F32 KV cache, 0.014 to 0.033 with llama.cpp's default F16 KV
  cache (the F16 rounding of K and V is the whole difference), logit std 0.96. Without the Q/K permutation
  the difference is 7.0, so the bounds below are far from what a layout bug gives.
* attn_q/attn_k packed as Q8_0 rows (permuted as whole rows), torch on the same dequantized weights, q/k std
  0.04: max |diff| 0.030 std with an F32 KV cache (llama.cpp quantizes the activations to Q8_0 for those
  matmuls), 3.4 std without the permutation. The same weights written dequantized as F32: 7e-5.
* SmolLM2-135M, every tensor F32, 2 windows of 256 tokens: PPL 30.9397 torch, 30.9408 llama.cpp (+0.004%),
  30.9397 with an F32 KV cache; llama.cpp's own tokenizer ("smollm" pre) splits 29 of the 304,986 WikiText-2
  test tokens differently from the HF tokenizer.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType

from exporters.gguf import GgufTensor, float_tensors, permute_qk_rows, write_gguf
from exporters.gguf.tokenizer import detect_bpe_pre
from turboboa.data import eval_tokens, resolve_text
from turboboa.errors import UserError
from turboboa.eval.perplexity import make_windows, perplexity, torch_logits_fn

from .conftest import make_tiny_llama

TINY = {"hidden": 256, "heads": 4, "kv_heads": 2, "layers": 2, "intermediate": 512}
# llama.cpp vs torch, max |logit difference| / std of the torch logits (measured: see the module docstring)
BOUND_F32_KV = 1e-3  # measured <= 1e-4
BOUND_F16_KV = 0.1  # measured <= 0.035
BOUND_Q8_0 = 0.3  # measured 0.030 (3.4 without the permutation)


def randomize(model: torch.nn.Module, seed: int = 1, qk_std: float = 0.15) -> torch.nn.Module:
    """Give every parameter a random value: norms near 1, biases of size 0.5, q/k of std ``qk_std`` (large
    enough for peaked attention, so a wrong q/k row order shows in the logits), other matrices std 0.06."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1:
                p.copy_(1 + 0.2 * noise if "norm" in name else 0.5 * noise)
            else:
                p.copy_((qk_std if ("q_proj" in name or "k_proj" in name) else 0.06) * noise)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_tokenizer):
    """model_type -> (random float model, its HF folder) for a tiny llama and a tiny qwen2 (with q/k/v biases)."""
    from transformers import AutoModelForCausalLM

    out = {}
    for model_type in ("llama", "qwen2"):
        folder = make_tiny_llama(tmp_path_factory.mktemp(model_type) / f"tiny-{model_type}", default_tokenizer,
                                 model_type=model_type, **TINY)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        out[model_type] = (randomize(model), folder)
    return out


@pytest.fixture(scope="module")
def windows(default_tokenizer) -> torch.Tensor:
    """The first 2 windows of 128 WikiText-2 test tokens."""
    return make_windows(eval_tokens(default_tokenizer, "wikitext2"), 128, 2)


def source_gguf() -> Path:
    from turboboa.models.loader import alias_gguf_path

    return alias_gguf_path("smollm2-135m")


def fields(path: Path) -> dict[str, object]:
    """Every metadata value of a GGUF file (``contents()``), by key."""
    return {k: f.contents() for k, f in GGUFReader(path).fields.items() if not k.startswith("GGUF.")}


def logit_gap(fn, model: torch.nn.Module, windows: torch.Tensor) -> float:
    """max |llama.cpp logits - torch logits| over the windows, divided by the std of the torch logits."""
    worst = 0.0
    for window in windows:
        with torch.no_grad():
            ref = model(input_ids=window[None]).logits
        worst = max(worst, float((fn(window[None]) - ref).abs().max() / ref.std()))
    return worst


# ---------------------------------------------------------------------------------------------- units


def test_permutation_interleaves_the_halves_of_each_head() -> None:
    rows = np.arange(16)
    assert permute_qk_rows(rows, 2).tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    packed = np.arange(8 * 3, dtype=np.uint8).reshape(8, 3)  # rows of bytes move as units
    assert permute_qk_rows(packed, 1).tolist() == packed[[0, 4, 1, 5, 2, 6, 3, 7]].tolist()
    with pytest.raises(ValueError):
        permute_qk_rows(np.arange(12), 4)  # heads of 3 rows cannot be split in halves


def test_packed_tensors_are_checked() -> None:
    ok = GgufTensor.from_packed(GGMLQuantizationType.Q8_0, np.zeros((4, 68), np.uint8), (4, 64))
    assert ok.is_packed and ok.stored_type == GGMLQuantizationType.Q8_0 and ok.n_elements == 256
    with pytest.raises(ValueError, match="multiple of 32"):
        GgufTensor.from_packed(GGMLQuantizationType.Q8_0, np.zeros((4, 34), np.uint8), (4, 48))
    with pytest.raises(ValueError, match=r"uint8 \(4, 68\)"):
        GgufTensor.from_packed(GGMLQuantizationType.Q8_0, np.zeros((4, 64), np.uint8), (4, 64))
    with pytest.raises(ValueError, match="F32 or F16"):
        GgufTensor.from_float(np.zeros((4, 64)), GGMLQuantizationType.Q8_0)
    assert GgufTensor.from_float(np.zeros(4), GGMLQuantizationType.F16).stored_type == GGMLQuantizationType.F32
    with pytest.raises(ValueError, match="F16 range"):
        GgufTensor.from_float(np.full((2, 2), 1e6), GGMLQuantizationType.F16).payload()


def test_pre_tokenizer_is_recognised_by_structure() -> None:
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    split = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}

    def seq(*steps: dict) -> dict:
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)}}

    def regex(pattern: str) -> dict:
        return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}

    letters = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
    rest = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    assert detect_bpe_pre({"pre_tokenizer": byte_level}) == "gpt-2"
    assert detect_bpe_pre(seq({"type": "Digits", "individual_digits": True}, byte_level)) == "smollm"
    assert detect_bpe_pre(seq(regex(letters + r"\p{N}{1,3}" + rest), split)) == "llama-bpe"
    assert detect_bpe_pre(seq(regex(letters + r"\p{N}" + rest), split)) == "qwen2"
    assert detect_bpe_pre(seq({"type": "Metaspace"})) is None
    assert detect_bpe_pre({"pre_tokenizer": None}) is None


# ------------------------------------------------------------------------------------- the file itself


def test_file_reads_back_with_expected_keys_names_types_and_shapes(tmp_path, tiny) -> None:
    model, folder = tiny["llama"]
    state = model.state_dict()
    tensors = float_tensors(state, GGMLQuantizationType.F16)
    q = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    tensors["model.layers.0.self_attn.q_proj.weight"] = GgufTensor.from_packed(
        GGMLQuantizationType.Q8_0, gguf.quants.quantize(q, GGMLQuantizationType.Q8_0), q.shape)
    path = write_gguf(tmp_path / "m.gguf", model.config, folder, tensors,
                      extra_kv={"method": "gptq", "bits": 4, "alpha": 0.25, "turboboa.note": ""})

    kv = fields(path)
    arch = "llama"
    expected = {
        "general.architecture": arch, "general.name": "tiny-llama", f"{arch}.context_length": 2048,
        f"{arch}.embedding_length": 256, f"{arch}.block_count": 2, f"{arch}.feed_forward_length": 512,
        f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
        f"{arch}.rope.freq_base": pytest.approx(10000.0), f"{arch}.rope.dimension_count": 64,
        f"{arch}.attention.layer_norm_rms_epsilon": pytest.approx(model.config.rms_norm_eps),
        f"{arch}.vocab_size": 49152, "general.file_type": int(LlamaFileType.MOSTLY_F16),
        "general.quantization_version": 2, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",  # this tokenizer (saved from the GGUF) has GPT-2's plain byte-level split
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False,
        "turboboa.method": "gptq", "turboboa.bits": 4, "turboboa.alpha": 0.25, "turboboa.note": "",
    }
    assert {k: kv.get(k) for k in expected} == expected
    assert len(kv["tokenizer.ggml.tokens"]) == 49152 and len(kv["tokenizer.ggml.merges"]) == 48900
    assert kv["tokenizer.ggml.token_type"][:18] == [3] * 17 + [1]  # the 17 special tokens are control tokens

    reader = GGUFReader(path)
    info = {t.name: (t.tensor_type, t.shape.tolist()) for t in reader.tensors}
    layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{t}.weight" for i in range(2) for t in layer}
    assert set(info) == names  # tied embeddings: no output.weight
    F16, F32 = GGMLQuantizationType.F16, GGMLQuantizationType.F32
    assert info["token_embd.weight"] == (F16, [256, 49152])  # ne order: [in, out]
    assert info["blk.0.attn_q.weight"] == (GGMLQuantizationType.Q8_0, [256, 256])
    assert info["blk.1.attn_q.weight"] == (F16, [256, 256])
    assert info["blk.0.attn_k.weight"] == (F16, [256, 128])
    assert info["blk.0.ffn_down.weight"] == (F16, [512, 256])
    assert info["blk.0.attn_norm.weight"] == (F32, [256])
    data = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert np.array_equal(data["blk.0.attn_q.weight"], permute_qk_rows(tensors[
        "model.layers.0.self_attn.q_proj.weight"].data, 4))  # packed rows, moved as units
    k = state["model.layers.1.self_attn.k_proj.weight"].numpy().astype(np.float16)
    assert np.array_equal(data["blk.1.attn_k.weight"], permute_qk_rows(k, 2))
    assert np.array_equal(data["blk.1.attn_v.weight"], state["model.layers.1.self_attn.v_proj.weight"].numpy()
                          .astype(np.float16))
    assert np.array_equal(data["output_norm.weight"], state["model.norm.weight"].numpy())


def test_writing_twice_gives_identical_bytes(tmp_path, tiny) -> None:
    model, folder = tiny["qwen2"]
    tensors = float_tensors(model.state_dict())
    a = write_gguf(tmp_path / "a.gguf", model.config, folder, tensors, extra_kv={"seed": 0})
    b = write_gguf(tmp_path / "b.gguf", model.config, folder, dict(reversed(tensors.items())), extra_kv={"seed": 0})
    assert a.read_bytes() == b.read_bytes()
    names = [t.name for t in GGUFReader(a).tensors]
    assert names[:2] == ["output_norm.weight", "token_embd.weight"] and names[2].startswith("blk.0.")
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.1.attn_v.bias"} <= set(names)


def test_a_failed_write_leaves_no_file_under_the_final_name(tmp_path, tiny, monkeypatch) -> None:
    model, folder = tiny["llama"]
    tensors = float_tensors(model.state_dict())
    target = tmp_path / "m.gguf"

    def broken(self, *, progress: bool = False) -> None:
        self.fout[0].write(b"\0" * 1000)  # part of the data is on disk when the failure comes
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(target, model.config, folder, tensors)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"previous")
    with pytest.raises(OSError, match="disk full"):
        write_gguf(target, model.config, folder, tensors)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and target.read_bytes() == b"previous"


def test_bad_inputs_are_user_errors(tmp_path, tiny) -> None:
    model, folder = tiny["llama"]
    tensors = float_tensors(model.state_dict())
    incomplete = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(UserError, match=r"blk\.1\.ffn_up\.weight"):
        write_gguf(tmp_path / "m.gguf", model.config, folder, incomplete)
    with pytest.raises(UserError, match="no place"):
        write_gguf(tmp_path / "m.gguf", model.config, folder, {**tensors, "model.extra.weight": tensors[
            "model.norm.weight"]})
    config = copy.deepcopy(model.config)
    config.model_type = "gpt_neox"
    with pytest.raises(UserError, match="gpt_neox"):
        write_gguf(tmp_path / "m.gguf", config, folder, tensors)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_is_copied_from_the_source_gguf(tmp_path, tiny) -> None:
    model, folder = tiny["llama"]
    path = write_gguf(tmp_path / "m.gguf", model.config, folder, float_tensors(model.state_dict()),
                      source_gguf=source_gguf())
    ours, theirs = GGUFReader(path).fields, GGUFReader(source_gguf()).fields
    keys = [k for k in theirs if k.startswith("tokenizer.")]
    assert [k for k in ours if k.startswith("tokenizer.")] == keys
    for key in keys:
        assert ours[key].types == theirs[key].types, key
        assert ours[key].contents() == theirs[key].contents(), key
    assert ours["tokenizer.ggml.pre"].contents() == "smollm"
    assert ours["general.name"].contents() == theirs["general.name"].contents()
    assert ours["general.file_type"].contents() == int(LlamaFileType.ALL_F32)
    assert ours["llama.rope.freq_base"].types == [GGUFValueType.FLOAT32]


def test_unknown_pre_tokenizer_falls_back_to_default_with_a_warning(tmp_path, tiny, capsys) -> None:
    model, folder = tiny["llama"]
    edited = tmp_path / "tok"
    edited.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, edited / name)
    doc = json.loads((edited / "tokenizer.json").read_text())
    doc["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                            "use_regex": False}
    (edited / "tokenizer.json").write_text(json.dumps(doc))
    path = write_gguf(tmp_path / "m.gguf", model.config, edited, float_tensors(model.state_dict()))
    assert fields(path)["tokenizer.ggml.pre"] == "default"
    warning = [line for line in capsys.readouterr().err.splitlines() if "pre-tokenizer" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: unknown pre-tokenizer")


# ----------------------------------------------------------------------------------------- llama.cpp


def test_missing_llama_cpp_is_a_user_error(monkeypatch) -> None:
    import sys

    from runtime_check.llamacpp import import_llama_cpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(UserError, match=r"pip install 'turboboa\[llamacpp\]'"):
        import_llama_cpp()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_llama_cpp_logits_match_torch(tmp_path, tiny, windows, model_type) -> None:
    pytest.importorskip("llama_cpp")
    from runtime_check.llamacpp import gguf_logits_fn

    model, folder = tiny[model_type]
    tokenizer = folder if model_type == "llama" else None  # qwen2: built from a tokenizer object
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    path = write_gguf(tmp_path / "m.gguf", model.config, tokenizer, float_tensors(model.state_dict()))
    with gguf_logits_fn(path, n_ctx=128, threads=2, kv_cache_f32=True) as fn:
        exact = logit_gap(fn, model, windows)
    with gguf_logits_fn(path, n_ctx=128, threads=2) as fn:
        default = logit_gap(fn, model, windows)
    print(f"{model_type}: max |diff| / std = {exact:.2e} (F32 KV cache), {default:.2e} (F16 KV cache)")
    assert exact < BOUND_F32_KV
    assert default < BOUND_F16_KV


def test_packed_q8_0_rows_are_permuted_as_units(tmp_path, tiny, windows) -> None:
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from runtime_check.llamacpp import gguf_logits_fn

    _, folder = tiny["llama"]
    # smaller q/k than the fixture's: that model is so sensitive that llama.cpp's Q8_0 rounding of the
    # activations alone moves its logits by 0.96 std; here it moves them by 0.03, a wrong row order by 3.4
    twin = randomize(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), qk_std=0.04)
    tensors = float_tensors(twin.state_dict())
    Q8 = GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                packed = gguf.quants.quantize(p.numpy(), Q8)
                tensors[name] = GgufTensor.from_packed(Q8, packed, tuple(p.shape))
                p.copy_(torch.from_numpy(gguf.quants.dequantize(packed, Q8)))
    path = write_gguf(tmp_path / "m.gguf", twin.config, folder, tensors)
    with gguf_logits_fn(path, n_ctx=128, threads=2, kv_cache_f32=True) as fn:
        gap = logit_gap(fn, twin, windows)
    print(f"Q8_0 q/k: max |diff| / std = {gap:.2e}")
    assert gap < BOUND_Q8_0


def test_tokenizer_mismatch_is_zero_for_an_identical_split(tmp_path, tiny, default_tokenizer) -> None:
    pytest.importorskip("llama_cpp")
    from runtime_check.llamacpp import gguf_tokenizer_mismatch

    model, folder = tiny["llama"]
    path = write_gguf(tmp_path / "m.gguf", model.config, folder, float_tensors(model.state_dict()))
    text = "Hello world, it's 2024!\n\n = Valkyria Chronicles III = \n" * 3
    ids = default_tokenizer(text).input_ids
    result = gguf_tokenizer_mismatch(path, text, ids)
    assert (result.hf_tokens, result.gguf_tokens, result.differing, result.first_mismatch) == (
        len(ids), len(ids), 0, None)
    shifted = ids[:5] + [ids[5] + 1] + ids[6:]  # one wrong id (here of the same byte length)
    bad = gguf_tokenizer_mismatch(path, text, shifted)
    assert (bad.differing, bad.first_mismatch) == (1, 5)


@pytest.mark.slow
def test_default_model_in_llama_cpp_matches_torch_perplexity(tmp_path) -> None:
    pytest.importorskip("llama_cpp")
    from runtime_check.llamacpp import gguf_logits_fn, gguf_tokenizer_mismatch
    from turboboa.models import load_float_model

    loaded = load_float_model("smollm2-135m")
    path = write_gguf(tmp_path / "smollm2.gguf", loaded.model.config, loaded.tokenizer,
                      float_tensors(loaded.model.state_dict()), source_gguf=source_gguf())
    ids = eval_tokens(loaded.tokenizer, "wikitext2")
    windows = make_windows(ids, 256, 2)
    ref = perplexity(torch_logits_fn(loaded.model), windows, "torch", progress=False)
    with gguf_logits_fn(path, n_ctx=256, threads=2) as fn:
        got = perplexity(fn, windows, "llama.cpp", progress=False)
    text, _ = resolve_text("wikitext2", "eval")
    mismatch = gguf_tokenizer_mismatch(path, text, ids)
    print(f"PPL torch {ref.ppl:.4f}, llama.cpp {got.ppl:.4f}; tokenizer: {mismatch}")
    assert abs(got.ppl / ref.ppl - 1) < 0.005
    assert mismatch.hf_tokens == ids.numel() and 0 <= mismatch.differing < 0.001 * ids.numel()
