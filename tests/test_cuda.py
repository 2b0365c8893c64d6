"""The GPU path, ``--device cuda`` end to end: quantize with every method, eval and ``turboboa run`` on a tiny
random Llama. Skipped without a CUDA device; the CPU tests run the same code (the device is chosen once and
passed down), so these check only what the device changes: where tensors live and float rounding."""

from __future__ import annotations

import json

import pytest
import torch

from turboboa import quantization
from turboboa.checkpoint import load_qdir
from turboboa.config import QuantConfig
from turboboa.eval.evaluate import evaluate as evaluate_torch

from .conftest import run_cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

METHODS = ("rtn", "gptq", "boa", "turboboa")


@pytest.mark.parametrize("method", METHODS)
def test_quantize_on_cuda_agrees_with_cpu(tmp_path, tiny_llama_dir, method) -> None:
    """The QDIR made on the GPU records its device and scores within 1% of the CPU's (GPTQ's rounding decisions
    may differ where float rounding differs; the weights are not compared bit for bit)."""
    ppl = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        cfg = QuantConfig(method=method, format="q4_0", nsamples=4, seqlen=64)
        quantization.quantize(str(tiny_llama_dir), cfg, out, device=device, progress=False)
        assert json.loads((out / "quant_config.json").read_text())["device"].startswith(device)
        assert len(load_qdir(out).layers) > 0
        ppl[device] = evaluate_torch(str(out), seqlen=64, max_windows=2, device=device, progress=False).ppl
    assert abs(ppl["cuda"] / ppl["cpu"] - 1) < 0.01, ppl


def test_run_on_cuda_passes_the_check(tmp_path, tiny_llama_dir) -> None:
    """``turboboa run --device cuda``: quantized on the GPU, the fake-quant reference evaluated there, the GGUF
    and ONNX files checked against it."""
    out = tmp_path / "run"
    r = run_cli("run", str(tiny_llama_dir), "--device", "cuda", "--nsamples", "4", "--seqlen", "64", "--export",
                "gguf,onnx", "--eval-seqlen", "64", "--max-windows", "2", "-q", "-o", str(out))
    assert r.returncode == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True


def test_eval_on_cuda_equals_cpu(tiny_llama_dir) -> None:
    """The float model's PPL on the GPU equals the CPU's to float rounding."""
    cpu = evaluate_torch(str(tiny_llama_dir), seqlen=64, max_windows=2, device="cpu", progress=False)
    gpu = evaluate_torch(str(tiny_llama_dir), seqlen=64, max_windows=2, device="cuda", progress=False)
    assert gpu.tokens == cpu.tokens and abs(gpu.ppl / cpu.ppl - 1) < 1e-4
