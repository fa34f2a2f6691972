"""Quantization core: number formats, quantizers, QuantLinear, quantized attention, and the verbs.

    from workbench.quant import QuantConfig, quantize_model, calibrate_model
    quantize_model(transformer, QuantConfig.wxay(w_bits=4, a_bits=8))
"""

from .apply import calibrate_model, dequantize_model, quant_modules, quantize_model, quantized_linears, quantizers
from .attention import (
    AttentionSpec,
    QuantAttention,
    QuantAttnProcessor,
    capturing_attention,
    patch_attention_function,
    unpatch_attention_functions,
    unwrap_attention,
    wrap_attention,
)
from .balance import hadamard, random_orthogonal, rotation_matrix, smooth_scales
from .config import QuantConfig, Rule, attention_from_dict, spec_from_dict
from .context import (
    at_timestep,
    current_bucket,
    current_timestep,
    install_timestep_hook,
    observing,
    quant_disabled,
    quantizing,
    remove_timestep_hook,
    set_mode,
    timestep_bucket,
)
from .formats import QuantFormat, dequantize, fake_quant, qrange, quantize, scale_zero_from_range
from .linear import QuantLinear
from .quantizer import QuantSpec, Quantizer

__all__ = [
    "AttentionSpec",
    "QuantAttention",
    "QuantAttnProcessor",
    "QuantConfig",
    "QuantFormat",
    "QuantLinear",
    "QuantSpec",
    "Quantizer",
    "Rule",
    "at_timestep",
    "attention_from_dict",
    "calibrate_model",
    "capturing_attention",
    "current_bucket",
    "current_timestep",
    "dequantize",
    "dequantize_model",
    "fake_quant",
    "hadamard",
    "install_timestep_hook",
    "observing",
    "patch_attention_function",
    "qrange",
    "quant_disabled",
    "quant_modules",
    "quantize",
    "quantize_model",
    "quantized_linears",
    "quantizers",
    "quantizing",
    "random_orthogonal",
    "remove_timestep_hook",
    "rotation_matrix",
    "scale_zero_from_range",
    "set_mode",
    "smooth_scales",
    "spec_from_dict",
    "timestep_bucket",
    "unpatch_attention_functions",
    "unwrap_attention",
    "wrap_attention",
]
