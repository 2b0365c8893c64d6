"""Build llama.cpp's own tools (llama-quantize, llama-imatrix, llama-perplexity) into a cache folder.

The source is the llama.cpp tree inside the llama-cpp-python source package of the installed version
(downloaded from PyPI with pip); nothing of it is copied into this repository. Usage::

    python bench/llamacpp_tools.py          # prints the folder holding the built binaries
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
import tarfile
from pathlib import Path

TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
# the same portable build as the Makefile's llama-cpp-python (AVX2, no -march=native): ggml's AMX kernels, which
# a native build enables on CPUs that have AMX, crash; and every host then runs the same kernels
PORTABLE = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON")


def cache_root() -> Path:
    return Path(os.environ.get("TURBOBOA_CACHE", Path.home() / ".cache" / "turboboa")) / "llama.cpp-tools"


def build(jobs: int = 2) -> Path:
    """Return the folder with the tool binaries, building them first when missing."""
    version = md.version("llama_cpp_python")
    root = cache_root() / f"{version}-portable"
    bin_dir = root / "build" / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    sdists = list(root.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-binary",
                        ":all:", "--no-deps", "-d", str(root)], check=True)
        sdists = list(root.glob("llama_cpp_python-*.tar.gz"))
    src = root / "src"
    if not src.exists():
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(src, filter="data")
    llama_dir = next(src.glob("*/vendor/llama.cpp"))
    build_dir = root / "build"
    subprocess.run(["cmake", "-S", str(llama_dir), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", *PORTABLE, "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--target", *TOOLS, "-j", str(jobs)], check=True)
    return bin_dir


if __name__ == "__main__":
    print(build())
