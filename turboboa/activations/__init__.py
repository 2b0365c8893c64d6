"""Static activation quantization (``--act-bits 8|16``): per-tensor uint8/uint16 encodings of every quantized
linear layer's input, calibrated on the fake-quant model (:mod:`.calibrate`), stored in the QDIR and simulated
by forward pre-hooks (:mod:`.encodings`) exactly as onnxruntime's QuantizeLinear/DequantizeLinear compute."""

from .calibrate import calibrate_activations
from .encodings import (
    ACT_BITS,
    ActivationEncodings,
    TensorEncoding,
    check_act_bits,
    encoding_from_range,
    fake_quant,
    install_input_quantization,
)

__all__ = ["ACT_BITS", "ActivationEncodings", "TensorEncoding", "calibrate_activations", "check_act_bits",
           "encoding_from_range", "fake_quant", "install_input_quantization"]
