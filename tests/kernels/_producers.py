"""The fused activation producers (row quantizer, LayerNorm / RMSNorm / GELU + quantization) next to their
references, shared by the interpreter checks and the GPU tests."""
from __future__ import annotations

import torch


def kernel_and_reference(name: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, ms: torch.Tensor,
                         msh: torch.Tensor, fp8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales) of the Triton producer `name` ("rows", "layernorm", "rmsnorm", "gelu") and of its
    pure-torch reference on the same input (w, b: norm affine; ms, msh: AdaLN scale / shift per batch)."""
    from workbench.kernels import act_quant as Q
    from workbench.kernels import reference as R

    if name == "rows":
        q, s = Q.quantize_rows(x, fp8=fp8)
        qr, sr = (R.quantize_per_token_fp8 if fp8 else R.quantize_per_token_int8)(x)
    elif name == "layernorm":
        q, s = Q.layernorm_quant(x, w, b, 1e-5, ms, msh, fp8=fp8)
        qr, sr = R.layernorm_quant_ref(x, w, b, 1e-5, ms, msh, fp8=fp8)
    elif name == "rmsnorm":
        q, s = Q.rmsnorm_quant(x, w, 1e-6, fp8=fp8)
        qr, sr = R.rmsnorm_quant_ref(x, w, 1e-6, fp8=fp8)
    elif name == "gelu":
        q, s = Q.gelu_quant(x, fp8=fp8)
        qr, sr = R.gelu_quant_ref(x, fp8=fp8)
    else:
        raise ValueError(f"unknown producer {name!r}")
    return q, s, qr, sr
