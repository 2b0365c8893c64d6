"""turboboa: post-training quantization of LLMs with RTN, GPTQ, BoA and TurboBoA.

``turboboa.quantize(model, config, output)`` quantizes a model (a Hugging Face folder, an alias or a GGUF
file) with a :class:`QuantConfig` into a QDIR, as ``turboboa quantize`` does; the QDIR's readers are in
:mod:`turboboa.checkpoint`, its evaluation in :mod:`turboboa.eval.evaluate`."""

from .config import QuantConfig
from .quantization import QuantizeSummary, quantize

__version__ = "0.1.0"

__all__ = ["QuantConfig", "QuantizeSummary", "__version__", "quantize"]
