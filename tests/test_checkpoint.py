"""The QDIR: save and load are exact, and the fake-quant model needs nothing but the QDIR."""

from __future__ import annotations

import json

import torch

from turboboa.checkpoint import load_fakequant_model, load_qdir, save_qdir
from turboboa.config import QuantConfig
from turboboa.errors import UserError
from turboboa.models import load_float_model
from turboboa.pipeline import quantize_model


def test_qdir_round_trip_is_exact(tmp_path, tiny_llama_dir):
    loaded = load_float_model(str(tiny_llama_dir))
    cfg = QuantConfig(method="turboboa", bits=3, group_size=32, rows=4, nsamples=4, seqlen=48)
    ids = torch.randint(0, 1000, (4, 48), generator=torch.Generator().manual_seed(0))
    result = quantize_model(loaded.model, ids, cfg, torch.device("cpu"), progress=False)
    qdir = save_qdir(tmp_path / "Q", loaded.model, loaded.tokenizer, result.layers, cfg, {"calibration": {}})
    assert not [p for p in qdir.parent.iterdir() if ".tmp-" in p.name]
    ckpt = load_qdir(qdir)
    assert ckpt.config == cfg
    assert set(ckpt.layers) == set(result.layers)
    for name, q in result.layers.items():
        r = ckpt.layers[name]
        assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale) and torch.equal(q.zero, r.zero)
        assert int(r.codes.max()) <= 7
    model = load_fakequant_model(ckpt)
    # the fake-quant model computes exactly what the in-memory quantized model computes
    x = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, loaded.model(input_ids=x).logits)
    for name, q in result.layers.items():
        assert torch.equal(model.get_submodule(name).weight, q.dequantize())


def test_qdir_version_and_marker_are_checked(tmp_path, tiny_llama_dir):
    loaded = load_float_model(str(tiny_llama_dir))
    cfg = QuantConfig(method="rtn", bits=4, group_size=-1)
    ids = torch.randint(0, 1000, (2, 16))
    result = quantize_model(loaded.model, ids, cfg, torch.device("cpu"), progress=False)
    qdir = save_qdir(tmp_path / "Q", loaded.model, None, result.layers, cfg, {})
    doc = json.loads((qdir / "quant_config.json").read_text())
    doc["version"] = 999
    (qdir / "quant_config.json").write_text(json.dumps(doc))
    try:
        load_qdir(qdir)
        raise AssertionError("a QDIR of another version must be refused")
    except UserError as e:
        assert "version 999" in str(e)
