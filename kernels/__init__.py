"""Quantization formats the device runs, shared by the exporter and the runtime (numpy only).

- ``options``      a matrix's quantization option (bits, block size) and its exact RAM cost
- ``quantize``     block-wise asymmetric uniform quantizer: round-to-nearest and error-searching
- ``matmulnbits``  onnxruntime's MatMulNBits layout: pack, unpack, dequantize, node builder
- ``config``       configuration space: matrix specs, configurations, JSON, accounting
"""

from coalora.kernels.config import ConfigError, ConfigSpace, Configuration, MatrixSpec
from coalora.kernels.options import DEFAULT_OPTIONS, QuantOption
from coalora.kernels.quantize import QuantizedMatrix, quantize, quantize_rtn

__all__ = [
    "DEFAULT_OPTIONS",
    "ConfigError",
    "ConfigSpace",
    "Configuration",
    "MatrixSpec",
    "QuantOption",
    "QuantizedMatrix",
    "quantize",
    "quantize_rtn",
]
