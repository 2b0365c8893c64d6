"""OpenVINO IR export: the QDQ ONNX decoder converted by OpenVINO, its quantized weights kept as integer
Constants (i4/u4/i8/u8) feeding OpenVINO's weight-decompression subgraph.

Modules: ``package`` (the optional ``openvino`` import), ``check`` (every quantized weight is one integer
Constant in the converted model), ``metadata`` (``turboboa.*`` keys in the IR's ``rt_info``), ``export`` (the
exporter entry point).
"""

from .export import export_openvino
from .metadata import read_rt_info
from .package import import_openvino

__all__ = ["export_openvino", "import_openvino", "read_rt_info"]
