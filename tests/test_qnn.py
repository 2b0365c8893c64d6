"""``runtime_check.qnn``: QDQ graphs on Qualcomm's QNN HTP backend, emulated on x86_64 by ``onnxruntime-qnn``.

Small hand-built opset-21 graphs: ``x -> Q -> DQ -> MatMul <- DQ(int4/int8 per-channel weight) -> Q -> DQ``.

* a fully QDQ MatMul runs whole on the HTP (fallback disabled, NPU share 1) and matches onnxruntime CPU within
  the bounds measured below;
* an op the QNN EP lacks (Erf between Q/DQ pairs) is refused in one line naming it; with fallback allowed it
  runs on the CPU, is listed, and the NPU share drops below 1;
* an EPContext model (compiled binary embedded) is written atomically and reproduces the JIT-compiled
  session's outputs bit for bit;
* :class:`QnnLogits` on a tiny static-length decoder, and the missing-extra message.

HTP-vs-CPU bounds, measured on these graphs (unbiased, calibrated scales, K = 64..576, weights int4 or int8):
uint8 activations differ by at most one output quantization step (mean about 0.1 step); uint16 activations
by at most 264 uint16 steps (mean 36 to 41), i.e. about one uint8 step: the emulated HTP keeps about 8 bits
at worst and 10.7 on average there, not 16. The bounds below leave a margin over those numbers.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from turboboa.errors import UserError

from .conftest import ROOT

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn (the npu extra) is not installed")

from runtime_check import qnn  # noqa: E402
from runtime_check.qnn import (  # noqa: E402
    MISSING,
    QnnLogits,
    load_context_model,
    open_qnn_session,
    qnn_available,
    require_qnn,
)

ACT = {"uint8": (TensorProto.UINT8, 255), "uint16": (TensorProto.UINT16, 65535)}
U8_MAX_STEPS, U8_MEAN_STEPS = 1.0 + 1e-3, 0.25  # measured: max 1.00, mean 0.09 to 0.11
U16_MAX_STEPS, U16_MEAN_STEPS = 512.0, 64.0  # measured: max 264, mean 36 to 41 (about one uint8 step)


# --- graphs ---------------------------------------------------------------------------------------------


def quantized_weight(rng: np.random.Generator, k: int, n: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel integer codes (k, n) and their float scales (n,), zero point 0."""
    w = rng.normal(size=(k, n)) / np.sqrt(k)
    qmax = 2 ** (bits - 1) - 1
    scale = (np.abs(w).max(0) / qmax).astype(np.float32)
    return np.clip(np.round(w / scale), -qmax - 1, qmax).astype(np.int8), scale


def qdq_matmul(path, *, act: str = "uint8", bits: int = 4, k: int = 64, n: int = 32, length: int = 8,
               extra_op: str | None = None, seed: int = 0) -> tuple[np.ndarray, float]:
    """Write the QDQ MatMul graph to ``path`` (scales calibrated on its input, 5% headroom); with ``extra_op``
    the output passes through ``DQ -> extra_op -> Q`` before the last DQ. Returns the input and output scale."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(1, length, k)).astype(np.float32)
    codes, w_scale = quantized_weight(rng, k, n, bits)
    a_type, a_max = ACT[act]
    zp = (a_max + 1) // 2
    x_scale = np.float32(np.abs(x).max() * 1.05 / (a_max / 2))
    y_scale = np.float32(np.abs(x @ (codes * w_scale)).max() * 1.05 / (a_max / 2))
    w_type = TensorProto.INT4 if bits == 4 else TensorProto.INT8
    inits = [numpy_helper.from_array(w_scale, "w_scale"),
             helper.make_tensor("w_q", w_type, [k, n], codes.flatten().tolist()),
             helper.make_tensor("w_zp", w_type, [n], [0] * n),
             numpy_helper.from_array(np.array(x_scale), "x_scale"), helper.make_tensor("x_zp", a_type, [], [zp]),
             numpy_helper.from_array(np.array(y_scale), "y_scale"), helper.make_tensor("y_zp", a_type, [], [zp])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="x/Q"),
             helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xdq"], name="x/DQ"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="w/DQ", axis=1),
             helper.make_node("MatMul", ["xdq", "w"], ["y"], name="mm/MatMul"),
             helper.make_node("QuantizeLinear", ["y", "y_scale", "y_zp"], ["yq"], name="y/Q")]
    last = "yq"
    if extra_op:
        nodes += [helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zp"], ["e0"], name="mid/DQ"),
                  helper.make_node(extra_op, ["e0"], ["e1"], name=f"model.layers.0.mlp/{extra_op}"),
                  helper.make_node("QuantizeLinear", ["e1", "y_scale", "y_zp"], ["e2"], name="mid/Q")]
        last = "e2"
    nodes.append(helper.make_node("DequantizeLinear", [last, "y_scale", "y_zp"], ["out"], name="y/DQ"))
    graph = helper.make_graph(nodes, "qdq_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 [1, length, k])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, length, n])], inits)
    save(graph, path)
    return x, float(y_scale)


def tiny_decoder(path, *, vocab: int = 32, hidden: int = 16, length: int | str = 8, tokenizer: str = "tok",
                 seed: int = 1) -> None:
    """A turboboa-like decoder, uint16 activations: ``input_ids (1, L) -> Gather`` from a uint16 QDQ embedding
    (its output re-quantized with the table's own scale: the HTP's Gather keeps its input's quantization)
    ``-> MatMul`` with an int4 per-channel weight ``-> logits (1, L, vocab)``; the tokenizer in the metadata."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(vocab, hidden)).astype(np.float32)
    e_scale = np.float32(np.abs(emb).max() / 32767.5)
    e_q = np.clip(np.round(emb / e_scale) + 32768, 0, 65535).astype(np.uint16)
    codes, w_scale = quantized_weight(rng, hidden, vocab, 4)
    logits = (e_q.astype(np.float32) - 32768) * e_scale @ (codes * w_scale)
    l_scale = np.float32(np.abs(logits).max() * 1.05 / 32767.5)
    inits = [numpy_helper.from_array(e_q, "emb_q"), numpy_helper.from_array(np.array(e_scale), "emb_scale"),
             numpy_helper.from_array(np.array(32768, np.uint16), "zp"), numpy_helper.from_array(w_scale, "w_scale"),
             helper.make_tensor("w_q", TensorProto.INT4, [hidden, vocab], codes.flatten().tolist()),
             helper.make_tensor("w_zp", TensorProto.INT4, [vocab], [0] * vocab),
             numpy_helper.from_array(np.array(l_scale), "l_scale")]
    nodes = [helper.make_node("DequantizeLinear", ["emb_q", "emb_scale", "zp"], ["emb"], name="emb/DQ"),
             helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="model.embed_tokens/Gather"),
             helper.make_node("QuantizeLinear", ["h", "emb_scale", "zp"], ["hq"], name="h/Q"),
             helper.make_node("DequantizeLinear", ["hq", "emb_scale", "zp"], ["hdq"], name="h/DQ"),
             helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="lm_head/w/DQ", axis=1),
             helper.make_node("MatMul", ["hdq", "w"], ["l"], name="lm_head/MatMul"),
             helper.make_node("QuantizeLinear", ["l", "l_scale", "zp"], ["lq"], name="logits/Q"),
             helper.make_node("DequantizeLinear", ["lq", "l_scale", "zp"], ["logits"], name="logits/DQ")]
    graph = helper.make_graph(
        nodes, "tiny_decoder", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, length])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, length, vocab])], inits)
    save(graph, path, metadata={"turboboa.tokenizer": tokenizer})


def save(graph, path, metadata: dict[str, str] | None = None) -> None:
    """Save ``graph`` as a checked opset-21 model (IR 10) with ``metadata``."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="turboboa")
    model.ir_version = 10
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def cpu_run(path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of onnxruntime's CPU EP on ``feeds``."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# --- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("act", "bits", "max_steps", "mean_steps"),
                         [("uint8", 4, U8_MAX_STEPS, U8_MEAN_STEPS), ("uint16", 4, U16_MAX_STEPS, U16_MEAN_STEPS),
                          ("uint16", 8, U16_MAX_STEPS, U16_MEAN_STEPS)])
def test_full_qdq_matmul_runs_whole_on_htp(tmp_path, act, bits, max_steps, mean_steps):
    path = tmp_path / "mm.onnx"
    x, y_scale = qdq_matmul(path, act=act, bits=bits, k=256, n=64, length=16)
    session = open_qnn_session(path, threads=1)
    assert session.npu_share == 1.0 and session.fallback_nodes == []
    assert {op for _, _, op in session.assignment} == {"QuantizeLinear", "DequantizeLinear", "MatMul"}
    steps = np.abs(session.run(None, {"x": x})[0] - cpu_run(path, {"x": x})) / y_scale
    assert steps.max() <= max_steps and steps.mean() <= mean_steps, (steps.max(), steps.mean())
    info = session.describe()
    assert info["cpu_fallback"] == "disabled" and info["qnn.htp_arch"] == "73" and info["npu_share"] == 1.0


def test_unsupported_node_is_refused_in_one_line(tmp_path):
    path = tmp_path / "erf.onnx"
    qdq_matmul(path, extra_op="Erf")
    with pytest.raises(UserError) as e:
        open_qnn_session(path, threads=1)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("qnn-htp rejects node 'model.layers.0.mlp/Erf' (Erf);"), message
    assert "allow CPU fallback" in message


def test_fallback_lists_cpu_nodes_and_npu_share(tmp_path):
    path = tmp_path / "erf.onnx"
    x, y_scale = qdq_matmul(path, extra_op="Erf")
    session = open_qnn_session(path, allow_fallback=True, threads=1)
    assert ("model.layers.0.mlp/Erf", "Erf") in session.fallback_nodes
    assert ("mm/MatMul", "MatMul") not in session.fallback_nodes
    nodes = len(session.assignment)
    assert nodes == 9 and session.npu_share == pytest.approx(1 - len(session.fallback_nodes) / nodes)
    assert 0 < session.npu_share < 1
    assert session.describe()["cpu_fallback"] == "allowed"
    steps = np.abs(session.run(None, {"x": x})[0] - cpu_run(path, {"x": x})) / y_scale
    assert steps.max() <= U8_MAX_STEPS


def test_context_model_is_written_atomically_and_reproduces_outputs(tmp_path):
    path = tmp_path / "mm.onnx"
    x, _ = qdq_matmul(path, act="uint16", k=128, n=32)
    out = tmp_path / "ctx" / "mm_ctx.onnx"
    compiled = open_qnn_session(path, context_out=out, threads=1)
    assert sorted(p.name for p in out.parent.iterdir()) == ["mm_ctx.onnx"]  # embedded binary, no temp left
    model = onnx.load(str(out))
    (node,) = model.graph.node
    assert node.op_type == "EPContext" and {a.name: a.i for a in node.attribute}["embed_mode"] == 1
    loaded = load_context_model(out, threads=1)
    assert loaded.npu_share == 1.0 and [op for _, _, op in loaded.assignment] == ["EPContext"]
    assert np.array_equal(loaded.run(None, {"x": x})[0], compiled.run(None, {"x": x})[0])
    open_qnn_session(path, context_out=out, threads=1)  # an existing context model is replaced
    assert np.array_equal(load_context_model(out, threads=1).run(None, {"x": x})[0], compiled.run(None, {"x": x})[0])


def test_load_context_model_refuses_a_plain_graph(tmp_path):
    path = tmp_path / "mm.onnx"
    qdq_matmul(path)
    with pytest.raises(UserError, match="has no EPContext node"):
        load_context_model(path)


def test_dynamic_shapes_are_refused(tmp_path):
    path = tmp_path / "dyn.onnx"
    tiny_decoder(path, length="seq")
    with pytest.raises(UserError, match=r"static shapes.*'input_ids'.*seq"):
        open_qnn_session(path)


def test_qnn_logits_on_a_static_decoder(tmp_path):
    (tmp_path / "tok").mkdir()
    path = tmp_path / "dec.onnx"
    tiny_decoder(path, length=8)
    ids = torch.tensor([[1, 5, 9, 3, 31, 0, 7, 2]])
    expected = cpu_run(path, {"input_ids": ids.numpy()})
    ctx = tmp_path / "dec_ctx.onnx"
    with QnnLogits(path, threads=1, context_out=ctx) as fn:
        logits = fn(ids)
        assert logits.dtype == torch.float32 and logits.shape == (1, 8, 32)
        # measured 0.0064 of the largest logit (191 uint16 steps: the bound of the uint16 MatMul above)
        assert np.abs(logits.numpy() - expected).max() / np.abs(expected).max() < 0.02
        fn.check_length(8)
        with pytest.raises(UserError, match="static sequence length of 8"):
            fn.check_length(16)
        assert fn.tokenizer() == str(tmp_path / "tok")
        info = fn.describe()
        assert info["npu_share"] == 1.0 and info["runs"] == 1 and info["seconds_per_run"] > 0
        assert info["onnxruntime_qnn"] and info["backend"].startswith("QNN HTP")
    with QnnLogits(ctx, threads=1) as compiled:  # the EPContext model keeps the tokenizer metadata
        assert torch.equal(compiled(ids), logits) and compiled.tokenizer() == str(tmp_path / "tok")


def test_missing_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import raises ImportError
    assert not qnn_available()
    with pytest.raises(UserError) as e:
        require_qnn()
    assert str(e.value) == MISSING == "the qnn-htp backend needs the npu extra; install it with: pip install -e '.[npu]'"
    with pytest.raises(UserError, match="npu extra"):
        qnn.open_qnn_session(tmp_path / "any.onnx")


def test_compile_failure_is_one_line(tmp_path):
    # onnxruntime-qnn 2.7.0 takes a QDQ Selu at partitioning, then fails to finalize it (QNN_COMMON_ERROR_MEM_ALLOC)
    path = tmp_path / "selu.onnx"
    qdq_matmul(path, extra_op="Selu")
    with pytest.raises(UserError) as e:
        open_qnn_session(path, threads=1)
    assert "\n" not in str(e.value) and str(e.value).startswith("qnn-htp cannot compile"), str(e.value)


def test_stdout_stays_clean(tmp_path):
    """libQnnHtp prints a LIBNATIVE notice on stdout when it loads; it must not reach a --json summary."""
    path = tmp_path / "mm.onnx"
    qdq_matmul(path)
    code = ("import sys; from runtime_check.qnn import open_qnn_session; "
            f"s = open_qnn_session({str(path)!r}, threads=1); print('npu_share', s.npu_share)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "npu_share 1.0\n" and "LIBNATIVE" not in proc.stderr, (proc.stdout, proc.stderr)
