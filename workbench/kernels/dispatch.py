"""Public entry points: Triton kernels on a supported GPU, reference fallback (with one warning) elsewhere."""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, NamedTuple, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from . import reference as ref

_WARNED: Set[Tuple[str, str]] = set()
_MIN_CC = {"int8": (8, 0), "fp8": (8, 9)}


def _triton_error() -> Optional[str]:
    """None if triton imports, else the import error text."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"{type(exc).__name__}: {exc}"
    return None


def unavailable_reason(kind: str = "int8", device: Optional[torch.device] = None) -> Optional[str]:
    """Why the Triton path cannot run for kind ('int8' or 'fp8') on device, or None if it can."""
    if os.environ.get("WORKBENCH_KERNELS_FORCE_REFERENCE", "0") == "1":
        return "WORKBENCH_KERNELS_FORCE_REFERENCE=1"
    if not torch.cuda.is_available():
        return "no CUDA device available"
    if device is not None and torch.device(device).type != "cuda":
        return f"inputs are on {torch.device(device).type}, not CUDA"
    cc = torch.cuda.get_device_capability(device if device is not None else None)
    need = _MIN_CC[kind]
    if cc < need:
        return f"GPU too old: compute capability {cc[0]}.{cc[1]} < {need[0]}.{need[1]} required for {kind}"
    err = _triton_error()
    if err is not None:
        return f"triton missing ({err})"
    return None


def available(kind: str = "fp8") -> bool:
    """True when the Triton kernels can run: CUDA present, cc >= 8.9 (fp8) / 8.0 (int8), triton imports."""
    return unavailable_reason(kind) is None


def _use_triton(op: str, kind: str, device: torch.device) -> bool:
    """Decide the backend for op; warn once per (op, reason) when falling back to the reference."""
    reason = unavailable_reason(kind, device)
    if reason is None:
        return True
    if (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"workbench.kernels.{op}: using the slow pure-torch reference path because {reason}",
                      RuntimeWarning, stacklevel=3)
    return False


# ------------------------------------------------------------------------------ functional API

def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                activation: Optional[str] = None, **kw: Any) -> torch.Tensor:
    """W8A8 linear (per-token int8 activations, per-channel int8 weights); see reference.w8a8_linear_ref."""
    if _use_triton("w8a8_linear", "int8", x.device):
        from .int8_gemm import w8a8_linear_triton
        return w8a8_linear_triton(x, wq, w_scale, bias, activation, **kw)
    return ref.w8a8_linear_ref(x, wq, w_scale, bias, activation)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: Optional[str] = None, **kw: Any) -> torch.Tensor:
    """FP8 e4m3 row-wise linear; see reference.fp8_rowwise_linear_ref."""
    if _use_triton("fp8_linear", "fp8", x.device):
        from .fp8_gemm import fp8_linear_triton
        return fp8_linear_triton(x, w_fp8, w_scale, bias, activation, **kw)
    return ref.fp8_rowwise_linear_ref(x, w_fp8, w_scale, bias, activation)


def w4a8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scales_grouped: torch.Tensor,
                bias: Optional[torch.Tensor] = None, activation: Optional[str] = None, **kw: Any) -> torch.Tensor:
    """W4A8 linear (int8 tokens x group-wise int4 weights); see reference.w4a8_linear_ref."""
    if _use_triton("w4a8_linear", "int8", x.device):
        from .w4a8_gemm import w4a8_linear_triton
        return w4a8_linear_triton(x, w_packed, w_scales_grouped, bias, activation, **kw)
    return ref.w4a8_linear_ref(x, w_packed, w_scales_grouped, bias, activation)


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: Optional[float] = None,
                    pv_dtype: str = "fp8", **kw: Any) -> torch.Tensor:
    """SageAttention-style quantized attention for [B, H, N, D]; see reference.quant_attention_ref."""
    kind = "fp8" if pv_dtype == "fp8" else "int8"
    if _use_triton("quant_attention", kind, q.device):
        from .quant_attention import quant_attention_triton
        return quant_attention_triton(q, k, v, sm_scale, pv_dtype=pv_dtype, **kw)
    d = q.shape[-1]
    kw.setdefault("block_n", 128 if d <= 64 else 64)
    kw = {key: val for key, val in kw.items() if key in ("block_m", "block_n", "smooth_k", "smooth_v")}
    return ref.quant_attention_ref(q, k, v, sm_scale, pv_dtype=pv_dtype, **kw)


class QuantizedActivation(NamedTuple):
    """Pre-quantized activations (codes [M, K], fp32 per-row scale [M]) plus the original leading shape."""
    q: torch.Tensor
    scale: torch.Tensor
    lead_shape: Tuple[int, ...]


def _quantize_act(op: str, producer: str, fp8: bool, x: torch.Tensor, *args: Any, **kw: Any) -> QuantizedActivation:
    """Run a fused producer+quant kernel (or its reference) and wrap the result."""
    kind = "fp8" if fp8 else "int8"
    if _use_triton(op, kind, x.device):
        from . import quant
        q, s = getattr(quant, producer)(x, *args, fp8=fp8, **kw)
    else:
        if producer == "quantize_rows":
            q, s = (ref.quantize_per_token_fp8 if fp8 else ref.quantize_per_token_int8)(x)
        else:
            q, s = getattr(ref, producer + "_ref")(x, *args, fp8=fp8, **kw)
    lead = tuple(x.shape[:-1])
    return QuantizedActivation(q.reshape(-1, x.shape[-1]), s.reshape(-1), lead)


def quantize_activation(x: torch.Tensor, fp8: bool = False) -> QuantizedActivation:
    """Per-token int8/fp8 quantization of x (one fused pass on GPU)."""
    return _quantize_act("quantize_activation", "quantize_rows", fp8, x)


def layernorm_quant(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    eps: float = 1e-5, mod_scale: Optional[torch.Tensor] = None,
                    mod_shift: Optional[torch.Tensor] = None, fp8: bool = False) -> QuantizedActivation:
    """LayerNorm (+affine, +AdaLN modulation) fused with per-token quantization."""
    return _quantize_act("layernorm_quant", "layernorm_quant", fp8, x, weight, bias, eps,
                         mod_scale=mod_scale, mod_shift=mod_shift)


def rmsnorm_quant(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                  fp8: bool = False) -> QuantizedActivation:
    """RMSNorm (+weight) fused with per-token quantization."""
    return _quantize_act("rmsnorm_quant", "rmsnorm_quant", fp8, x, weight, eps)


def gelu_quant(x: torch.Tensor, fp8: bool = False) -> QuantizedActivation:
    """GELU-tanh fused with per-token quantization."""
    return _quantize_act("gelu_quant", "gelu_quant", fp8, x)


# ---------------------------------------------------------------------------------- modules

class _QuantLinearBase(nn.Module):
    """Shared plumbing: buffers keep their quantized dtypes under .to(dtype)/.half(); only devices move."""

    in_features: int
    out_features: int
    activation: Optional[str]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "nn.Module":
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                device = fn(torch.empty(0, device=buf.device)).device
                self._buffers[name] = buf.to(device)
        return self

    def extra_repr(self) -> str:
        """Shape / activation summary for print(model)."""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}")

    def _bias_from(self, linear: nn.Linear) -> None:
        """Copy the bias of linear (or register None)."""
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def _split(self, x: Union[torch.Tensor, QuantizedActivation]) -> Tuple[Optional[torch.Tensor], Any]:
        """Return (dense input or None, QuantizedActivation or None)."""
        return (None, x) if isinstance(x, QuantizedActivation) else (x, None)

    def _traced(self, x: torch.Tensor, fp8: bool, op: Callable[..., torch.Tensor], *weights: torch.Tensor
                ) -> torch.Tensor:
        """Forward under torch.compile: quantize in plain torch (Inductor can fuse it into the producer), then
        one custom-op GEMM, so the graph has no break."""
        xq, xs = ops.quantize_tokens(x, fp8)
        out = op(xq, xs, *weights, self.bias, self.activation, ref.linear_out_dtype(x))
        return out.reshape(*x.shape[:-1], self.out_features)


class W8A8Linear(_QuantLinearBase):
    """Drop-in nn.Linear replacement: int8 per-channel weights, per-token int8 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[str] = None, out_dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.activation, self.out_dtype = \
            in_features, out_features, activation, out_dtype
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: Optional[str] = None) -> "W8A8Linear":
        """Quantize an nn.Linear (weights per output channel); activation='gelu_tanh' fuses GELU."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                  linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16,
                  linear.weight.device)
        mod.weight_q, mod.weight_scale = ref.quantize_per_channel_int8(linear.weight.detach())
        mod._bias_from(linear)
        return mod

    def forward(self, x: Union[torch.Tensor, QuantizedActivation]) -> torch.Tensor:
        """y = dequant(quant(x) @ Wq^T) + b (+GELU); x may be pre-quantized by layernorm_quant etc."""
        dense, qa = self._split(x)
        if dense is not None and torch.compiler.is_compiling():
            return self._traced(dense, False, torch.ops.workbench.scaled_mm, self.weight_q, self.weight_scale)
        if dense is not None:
            return w8a8_linear(dense, self.weight_q, self.weight_scale, self.bias, self.activation)
        if _use_triton("W8A8Linear", "int8", qa.q.device):
            from .int8_gemm import int8_scaled_mm
            out = int8_scaled_mm(qa.q, qa.scale, self.weight_q, self.weight_scale, self.bias, self.activation,
                                 self.out_dtype)
        else:
            out = ref.int8_scaled_mm_ref(qa.q, qa.scale, self.weight_q, self.weight_scale, self.bias,
                                         self.activation, self.out_dtype)
        return out.reshape(*qa.lead_shape, self.out_features)


class FP8Linear(_QuantLinearBase):
    """Drop-in nn.Linear replacement: e4m3 per-channel weights, per-token e4m3 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[str] = None, out_dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.activation, self.out_dtype = \
            in_features, out_features, activation, out_dtype
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, device=device).to(ref.FP8_DTYPE))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: Optional[str] = None) -> "FP8Linear":
        """Quantize an nn.Linear to e4m3 (scale absmax/448 per output channel)."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                  linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16,
                  linear.weight.device)
        mod.weight_fp8, mod.weight_scale = ref.quantize_per_channel_fp8(linear.weight.detach())
        mod._bias_from(linear)
        return mod

    def forward(self, x: Union[torch.Tensor, QuantizedActivation]) -> torch.Tensor:
        """y = dequant(fp8(x) @ W8^T) + b (+GELU); x may be pre-quantized with fp8=True."""
        dense, qa = self._split(x)
        if dense is not None and torch.compiler.is_compiling():
            return self._traced(dense, True, torch.ops.workbench.scaled_mm, self.weight_fp8, self.weight_scale)
        if dense is not None:
            return fp8_linear(dense, self.weight_fp8, self.weight_scale, self.bias, self.activation)
        if _use_triton("FP8Linear", "fp8", qa.q.device):
            from .fp8_gemm import fp8_scaled_mm
            out = fp8_scaled_mm(qa.q, qa.scale, self.weight_fp8, self.weight_scale, self.bias, self.activation,
                                self.out_dtype)
        else:
            out = ref.fp8_scaled_mm_ref(qa.q, qa.scale, self.weight_fp8, self.weight_scale, self.bias,
                                        self.activation, self.out_dtype)
        return out.reshape(*qa.lead_shape, self.out_features)


class W4A8Linear(_QuantLinearBase):
    """Drop-in nn.Linear replacement: group-wise int4 weights (packed 2/byte), per-token int8 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 128,
                 activation: Optional[str] = None, out_dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} must be a multiple of group_size={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.activation, self.out_dtype = activation, out_dtype
        self.register_buffer("weight_packed",
                             torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales",
                             torch.ones(out_features, in_features // group_size, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, activation: Optional[str] = None) -> "W4A8Linear":
        """Quantize an nn.Linear to symmetric group-wise int4 (scale absmax/7 per group of group_size)."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, activation,
                  linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16,
                  linear.weight.device)
        mod.weight_packed, mod.weight_scales = ref.quantize_weight_int4_grouped(linear.weight.detach(), group_size)
        mod._bias_from(linear)
        return mod

    def forward(self, x: Union[torch.Tensor, QuantizedActivation]) -> torch.Tensor:
        """y = sum_g (quant(x) . W4_g) * s_g * x_scale + b (+GELU); x may be pre-quantized (int8)."""
        dense, qa = self._split(x)
        if dense is not None and torch.compiler.is_compiling():
            return self._traced(dense, False, torch.ops.workbench.w4a8_scaled_mm, self.weight_packed,
                                self.weight_scales)
        if dense is not None:
            return w4a8_linear(dense, self.weight_packed, self.weight_scales, self.bias, self.activation)
        if _use_triton("W4A8Linear", "int8", qa.q.device):
            from .w4a8_gemm import w4a8_scaled_mm
            out = w4a8_scaled_mm(qa.q, qa.scale, self.weight_packed, self.weight_scales, self.bias,
                                 self.activation, self.out_dtype)
        else:
            out = ref.w4a8_scaled_mm_ref(qa.q, qa.scale, self.weight_packed, self.weight_scales, self.bias,
                                         self.activation, self.out_dtype)
        return out.reshape(*qa.lead_shape, self.out_features)


def swap_linears(model: nn.Module, factory: Callable[[nn.Linear], nn.Module],
                 predicate: Callable[[str, nn.Linear], bool] = lambda name, lin: True) -> int:
    """Replace every nn.Linear child with factory(linear) where predicate(qualified_name, linear); return count."""
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and predicate(full, child):
                setattr(module, child_name, factory(child))
                count += 1
    return count


from . import ops  # noqa: E402  (registers the torch.library ops; it imports _use_triton from here)
