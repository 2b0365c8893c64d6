"""The safetensors writer that holds one part at a time: what the ``safetensors`` package reads back."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from turboboa.safetensors_file import read_header, save_by_parts


def _parts() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {"a.codes": torch.randint(0, 255, (3, 5), generator=g, dtype=torch.uint8),  # 15 bytes: odd
         "a.scale": torch.randn(3, 2, generator=g)},
        {"b.codes": torch.randint(0, 255, (7,), generator=g, dtype=torch.uint8),
         "b.sc": torch.randint(-9, 9, (7, 3), generator=g, dtype=torch.int32),
         "b.half": torch.randn(5, generator=g).to(torch.bfloat16),
         "b.wide": torch.randn(2, 3, generator=g, dtype=torch.float64),
         "b.mask": torch.tensor([True, False, True]),
         "b.scalar": torch.tensor(2.5),
         "b.empty": torch.zeros(0, 4)},
    ]


def test_parts_read_back_by_safetensors(tmp_path):
    parts = _parts()
    calls = []

    def produce():
        calls.append(1)
        return iter(parts)

    path = tmp_path / "t.safetensors"
    save_by_parts(path, produce, {"format": "x"})
    back = load_file(str(path))
    expected = {k: v for p in parts for k, v in p.items()}
    assert back.keys() == expected.keys()
    for name, t in expected.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "x"}
    header, start = read_header(path)
    assert start % 8 == 0
    sizes = {torch.float64: 8, torch.float32: 4, torch.int32: 4, torch.bfloat16: 2, torch.uint8: 1, torch.bool: 1}
    for name, e in header.items():
        if name != "__metadata__":  # every tensor starts at a multiple of its element size
            assert e["data_offsets"][0] % sizes[expected[name].dtype] == 0, name
    assert len(calls) == 1 + len({4, 8, 2, 1})  # the header pass, then one pass per element size


def test_same_tensors_same_bytes_whatever_the_parts(tmp_path):
    parts = _parts()
    merged = {k: v for p in parts for k, v in p.items()}
    save_by_parts(tmp_path / "split.safetensors", lambda: parts)
    save_by_parts(tmp_path / "one.safetensors", lambda: [merged])
    assert (tmp_path / "split.safetensors").read_bytes() == (tmp_path / "one.safetensors").read_bytes()


def test_refuses_a_name_twice_and_parts_that_change(tmp_path):
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="given twice"):
        save_by_parts(tmp_path / "a.safetensors", lambda: [{"x": t}, {"x": t}])
    shapes = iter([(2,), (3,)])
    with pytest.raises(ValueError, match="changed"):
        save_by_parts(tmp_path / "b.safetensors", lambda: [{"x": torch.zeros(next(shapes))}])
