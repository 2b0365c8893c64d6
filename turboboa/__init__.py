"""turboboa: post-training quantization of LLMs with RTN, GPTQ, BoA and TurboBoA."""

__version__ = "0.1.0"
