"""coalora: quantized language models on every device from one exported bundle.

Sub-packages follow the dependency direction export -> runtime -> kernels:

- ``coalora.kernels``  quantize, pack, MatMulNBits layout, configuration space (numpy only)
- ``coalora.runtime``  device side: bundle reader, budget probe, selection, serving (no torch)
- ``coalora.export``   workstation side: calibration, bit allocation, training, bundle writer
"""

__version__ = "0.1.0"
