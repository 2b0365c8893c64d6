"""QDQ ONNX export: the decoder with integer weights feeding DequantizeLinear, for onnxruntime and NPU toolchains.

Modules, one job each: ``containers`` (which integer type holds a b-bit grid), ``profiles`` (generic / npu
rules), ``weights`` (a quantized layer as initializers + DequantizeLinear), ``arch`` (the decoder read from
the HF config), ``rope`` (RoPE tables), ``builder`` (named nodes), ``graph`` (the decoder graph),
``metadata`` (``metadata_props``), ``check`` (DequantizeLinear outputs against the QDIR in onnxruntime),
``export`` (the exporter entry point).
"""

from .export import check_onnx_weights, export_onnx

__all__ = ["check_onnx_weights", "export_onnx"]
