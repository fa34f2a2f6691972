"""Quantized GEMM / attention kernels (Triton) with pure-torch references, behind one backend switch.

    from workbench.kernels import Backend, W8A8Linear, quant_attention
    layer = W8A8Linear.from_linear(linear)                           # Backend.AUTO: Triton on a GPU
    out = quant_attention(q, k, v, backend=Backend.REFERENCE)        # the exact math, any device

The public API lives in ``dispatch`` (functional calls and the kernel linears) and is re-exported here;
``backend`` holds the switch (`Backend`: auto / triton / reference). The Triton modules (``scaled_mm``,
``int8_gemm``, ``fp8_gemm``, ``w4a8_gemm``, ``act_quant``, ``attention``) are loaded lazily: importing this
package does not import triton.
"""

from . import reference
from .backend import Backend, available, unavailable_reason
from .dispatch import (KERNEL_LINEARS, FP8Linear, QuantizedActivation, W4A8Linear, W8A8Linear, fp8_linear,
                       gelu_quant, layernorm_quant, quant_attention, quantize_activation, rmsnorm_quant, set_backend,
                       swap_linears, w4a8_linear, w8a8_linear)

__all__ = [
    "Backend", "KERNEL_LINEARS", "reference", "available", "unavailable_reason", "w8a8_linear", "fp8_linear",
    "w4a8_linear", "quant_attention", "quantize_activation", "layernorm_quant", "rmsnorm_quant", "gelu_quant",
    "QuantizedActivation", "W8A8Linear", "FP8Linear", "W4A8Linear", "set_backend", "swap_linears",
]
