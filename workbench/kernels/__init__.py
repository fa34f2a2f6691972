"""Quantized GEMM / attention kernels (Triton) with pure-torch references and a dispatching public API.

Public API: ``workbench.kernels.dispatch`` (w8a8_linear, fp8_linear, w4a8_linear, quant_attention,
fused activation quantizers, W8A8Linear / FP8Linear / W4A8Linear). Everything except
``quant_attention`` is re-exported here; that name is also the Triton submodule
``workbench.kernels.quant_attention``, so import the function from ``dispatch``.
Importing this package does not import triton; the Triton modules are loaded lazily.
"""

from . import reference
from .dispatch import (FP8Linear, QuantizedActivation, W4A8Linear, W8A8Linear, available, fp8_linear, gelu_quant,
                       layernorm_quant, quantize_activation, rmsnorm_quant, swap_linears, unavailable_reason,
                       w4a8_linear, w8a8_linear)

__all__ = [
    "reference", "available", "unavailable_reason", "w8a8_linear", "fp8_linear", "w4a8_linear",
    "quantize_activation", "layernorm_quant", "rmsnorm_quant", "gelu_quant", "QuantizedActivation",
    "W8A8Linear", "FP8Linear", "W4A8Linear", "swap_linears",
]
