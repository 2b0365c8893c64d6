"""Workflows: the work that spans the quantization core, the exporters and the runtime checker.

The layers, each importing only those below it::

    cli.py          the ``turboboa`` command
    workflows/      turboboa run (quantize -> export -> check -> report), evaluating an exported file in its
                    runtime, exporting with the QNN HTP context binary compiled
    runtime_check/  the same token windows through torch, llama.cpp, onnxruntime and the NPU runtimes
    exporters/      writers that pack a QDIR: GGUF, ONNX, OpenVINO
    turboboa/       the quantization core: calibration, Hessians, solvers, grids and formats, the QDIR

``make lint`` checks these directions with import-linter (``[tool.importlinter]`` in pyproject.toml).
"""
