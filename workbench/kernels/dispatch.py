"""Public entry points: Triton kernels or their pure-torch reference, as the `Backend` switch says."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import reference as ref
from .backend import Backend, available, unavailable_reason, use_triton

# ------------------------------------------------------------------------------ functional API

def w8a8_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                activation: Optional[str] = None, backend: Backend | str = Backend.AUTO,
                w_sum: Optional[torch.Tensor] = None, **kw: Any) -> torch.Tensor:
    """W8A8 linear (per-token int8 activations, per-channel int8 weights); see reference.w8a8_linear_ref.
    With `w_sum` (reference.weight_row_sums(wq)) the activations are asymmetric uint8 per token
    (reference.w8a8_asym_linear_ref: the fake quantizer's `uint8` per-token dynamic, exactly)."""
    if use_triton("w8a8_linear", "int8", x.device, backend):
        from .int8_gemm import w8a8_linear_triton
        return w8a8_linear_triton(x, wq, w_scale, bias, activation, w_sum=w_sum, **kw)
    if w_sum is not None:
        return ref.w8a8_asym_linear_ref(x, wq, w_scale, w_sum, bias, activation)
    return ref.w8a8_linear_ref(x, wq, w_scale, bias, activation)


def fp8_linear(x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
               activation: Optional[str] = None, backend: Backend | str = Backend.AUTO, **kw: Any) -> torch.Tensor:
    """FP8 e4m3 row-wise linear; see reference.fp8_rowwise_linear_ref."""
    if use_triton("fp8_linear", "fp8", x.device, backend):
        from .fp8_gemm import fp8_linear_triton
        return fp8_linear_triton(x, w_fp8, w_scale, bias, activation, **kw)
    return ref.fp8_rowwise_linear_ref(x, w_fp8, w_scale, bias, activation)


def w4a8_linear(x: torch.Tensor, w_packed: torch.Tensor, w_scales_grouped: torch.Tensor,
                bias: Optional[torch.Tensor] = None, activation: Optional[str] = None,
                backend: Backend | str = Backend.AUTO, **kw: Any) -> torch.Tensor:
    """W4A8 linear (int8 tokens x group-wise int4 weights); see reference.w4a8_linear_ref."""
    if use_triton("w4a8_linear", "int8", x.device, backend):
        from .w4a8_gemm import w4a8_linear_triton
        return w4a8_linear_triton(x, w_packed, w_scales_grouped, bias, activation, **kw)
    return ref.w4a8_linear_ref(x, w_packed, w_scales_grouped, bias, activation)


def quant_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: Optional[float] = None,
                    pv_dtype: str = "fp8", backend: Backend | str = Backend.AUTO, **kw: Any) -> torch.Tensor:
    """SageAttention-style quantized attention for [B, H, N, D]; see reference.quant_attention_ref."""
    kind = "fp8" if pv_dtype == "fp8" else "int8"
    if use_triton("quant_attention", kind, q.device, backend):
        from .attention import quant_attention_triton
        return quant_attention_triton(q, k, v, sm_scale, pv_dtype=pv_dtype, **kw)
    bm, bn = ref.default_blocks(q.shape[-1])
    kw.setdefault("block_m", bm)
    kw.setdefault("block_n", bn)
    kw = {key: val for key, val in kw.items() if key in ("block_m", "block_n", "smooth_k", "smooth_v")}
    return ref.quant_attention_ref(q, k, v, sm_scale, pv_dtype=pv_dtype, **kw)


class QuantizedActivation(NamedTuple):
    """Pre-quantized activations (codes [M, K], fp32 per-row scale [M]) plus the original leading shape."""
    q: torch.Tensor
    scale: torch.Tensor
    lead_shape: Tuple[int, ...]


def _quantize_act(op: str, producer: str, fp8: bool, x: torch.Tensor, *args: Any,
                  backend: Backend | str = Backend.AUTO, **kw: Any) -> QuantizedActivation:
    """Run a fused producer+quant kernel (or its reference) and wrap the result."""
    kind = "fp8" if fp8 else "int8"
    if use_triton(op, kind, x.device, backend):
        from . import act_quant
        q, s = getattr(act_quant, producer)(x, *args, fp8=fp8, **kw)
    else:
        if producer == "quantize_rows":
            q, s = (ref.quantize_per_token_fp8 if fp8 else ref.quantize_per_token_int8)(x)
        else:
            q, s = getattr(ref, producer + "_ref")(x, *args, fp8=fp8, **kw)
    lead = tuple(x.shape[:-1])
    return QuantizedActivation(q.reshape(-1, x.shape[-1]), s.reshape(-1), lead)


def quantize_activation(x: torch.Tensor, fp8: bool = False, backend: Backend | str = Backend.AUTO) -> QuantizedActivation:
    """Per-token int8/fp8 quantization of x (one fused pass on GPU)."""
    return _quantize_act("quantize_activation", "quantize_rows", fp8, x, backend=backend)


def layernorm_quant(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                    eps: float = 1e-5, mod_scale: Optional[torch.Tensor] = None,
                    mod_shift: Optional[torch.Tensor] = None, fp8: bool = False,
                    backend: Backend | str = Backend.AUTO) -> QuantizedActivation:
    """LayerNorm (+affine, +AdaLN modulation) fused with per-token quantization."""
    return _quantize_act("layernorm_quant", "layernorm_quant", fp8, x, weight, bias, eps,
                         mod_scale=mod_scale, mod_shift=mod_shift, backend=backend)


def rmsnorm_quant(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6,
                  fp8: bool = False, backend: Backend | str = Backend.AUTO) -> QuantizedActivation:
    """RMSNorm (+weight) fused with per-token quantization."""
    return _quantize_act("rmsnorm_quant", "rmsnorm_quant", fp8, x, weight, eps, backend=backend)


def gelu_quant(x: torch.Tensor, fp8: bool = False, backend: Backend | str = Backend.AUTO) -> QuantizedActivation:
    """GELU-tanh fused with per-token quantization."""
    return _quantize_act("gelu_quant", "gelu_quant", fp8, x, backend=backend)


# ---------------------------------------------------------------------------------- modules

class _QuantLinearBase(nn.Module):
    """Shared plumbing of the kernel linears.

    `backend` picks Triton or the reference for every call of the module (`Backend`). The bias is a
    frozen nn.Parameter, so a model made of kernel layers still has parameters (diffusers probes
    `next(module.parameters()).dtype`). `.to()` / `.half()` move buffers and parameters to a device but
    keep every dtype: the codes stay int8 / fp8 / packed int4, scales fp32, the bias in the output dtype.
    """

    in_features: int
    out_features: int
    activation: Optional[str]
    backend: Backend

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "nn.Module":
        for name, buf in list(self._buffers.items()):
            if buf is not None:
                device = fn(torch.empty(0, device=buf.device)).device
                self._buffers[name] = buf.to(device)
        for name, p in list(self._parameters.items()):
            if p is not None:
                device = fn(torch.empty(0, device=p.device)).device
                self._parameters[name] = nn.Parameter(p.data.to(device), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        """Shape / activation / backend summary for print(model)."""
        asym = ", asym_act" if getattr(self, "asym_act", False) else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, activation={self.activation}, backend={self.backend.value}{asym}")

    def _init_common(self, in_features: int, out_features: int, bias: bool, activation: Optional[str],
                     out_dtype: torch.dtype, device: Optional[torch.device], backend: Backend | str) -> None:
        self.in_features, self.out_features, self.activation, self.out_dtype = \
            in_features, out_features, activation, out_dtype
        self.backend = Backend.parse(backend)
        self.set_bias(torch.zeros(out_features, device=device) if bias else None)
        # under torch.compile: quantize the input with the one-pass row kernel (an opaque op) rather than in plain
        # torch; for inputs an opaque kernel produced, where Inductor has no producer to fuse the quantization into
        self.input_from_kernel = False

    def set_bias(self, bias: Optional[torch.Tensor]) -> None:
        """Store `bias` (a copy, frozen) or None."""
        self.register_parameter("bias", None if bias is None else
                                nn.Parameter(bias.detach().clone(), requires_grad=False))

    def _split(self, x: Union[torch.Tensor, QuantizedActivation]) -> Tuple[Optional[torch.Tensor], Any]:
        """Return (dense input or None, QuantizedActivation or None)."""
        return (None, x) if isinstance(x, QuantizedActivation) else (x, None)

    def _prequantized(self, qa: QuantizedActivation, code_dtype: torch.dtype, op: Callable[..., torch.Tensor],
                      *weights: torch.Tensor) -> torch.Tensor:
        """GEMM on codes a fused producer made (`layernorm_quant`, `residual_norm_quant`, ...), through the custom op
        so the same call runs eagerly and inside torch.compile."""
        if qa.q.dtype != code_dtype:
            raise ValueError(f"{type(self).__name__} takes {code_dtype} activation codes, got {qa.q.dtype}: quantize "
                             f"its input with fp8={code_dtype != torch.int8}")
        if qa.q.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: pre-quantized input has {qa.q.shape[-1]} features, the layer "
                             f"takes {self.in_features}")
        out = op(qa.q, qa.scale, *weights, self.bias, self.activation, self.out_dtype, self.backend.value)
        return out.reshape(*qa.lead_shape, self.out_features)

    def _traced(self, x: torch.Tensor, fp8: bool, op: Callable[..., torch.Tensor], *weights: torch.Tensor
                ) -> torch.Tensor:
        """Forward under torch.compile: quantize in plain torch (Inductor can fuse it into the producer), then
        one custom-op GEMM, so the graph has no break."""
        if getattr(self, "asym_act", False):
            xq, xs, xz = ops.quantize_tokens_asym(x)
            out = op(xq, xs, *weights, self.bias, self.activation, ref.linear_out_dtype(x), self.backend.value,
                     xz, self.weight_sum)
        else:
            if self.input_from_kernel:
                xq, xs = torch.ops.workbench.quantize_rows(x.reshape(-1, x.shape[-1]), fp8, self.backend.value)
            else:
                xq, xs = ops.quantize_tokens(x, fp8)
            out = op(xq, xs, *weights, self.bias, self.activation, ref.linear_out_dtype(x), self.backend.value)
        return out.reshape(*x.shape[:-1], self.out_features)


def _weight_dtype(linear: nn.Linear) -> torch.dtype:
    return linear.weight.dtype if linear.weight.is_floating_point() else torch.bfloat16


class W8A8Linear(_QuantLinearBase):
    """Drop-in nn.Linear replacement: int8 per-channel weights, per-token int8 activations (symmetric, or with
    `asym_act` asymmetric uint8 with a zero point per token, the `weight_sum` correction in the epilogue)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[str] = None, out_dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None, backend: Backend | str = Backend.AUTO,
                 asym_act: bool = False) -> None:
        super().__init__()
        self.asym_act = bool(asym_act)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("weight_sum", torch.zeros(out_features, dtype=torch.float32, device=device)
                             if self.asym_act else None)
        self._init_common(in_features, out_features, bias, activation, out_dtype, device, backend)

    def set_weight(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        """Store int8 codes [N, K] and their per-channel scales (and the row sums asymmetric inputs need)."""
        self.weight_q = codes.to(torch.int8).contiguous()
        self.weight_scale = scale.float().reshape(-1).contiguous()
        if self.asym_act:
            self.weight_sum = ref.weight_row_sums(self.weight_q)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: Optional[str] = None,
                    backend: Backend | str = Backend.AUTO) -> "W8A8Linear":
        """Quantize an nn.Linear (weights per output channel); activation='gelu_tanh' fuses GELU."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                  _weight_dtype(linear), linear.weight.device, backend)
        mod.set_weight(*ref.quantize_per_channel_int8(linear.weight.detach()))
        mod.set_bias(linear.bias)
        return mod

    def forward(self, x: Union[torch.Tensor, QuantizedActivation]) -> torch.Tensor:
        """y = dequant(quant(x) @ Wq^T) + b (+GELU); x may be pre-quantized by layernorm_quant etc."""
        dense, qa = self._split(x)
        if dense is not None and torch.compiler.is_compiling():
            return self._traced(dense, False, torch.ops.workbench.scaled_mm, self.weight_q, self.weight_scale)
        if dense is not None:
            return w8a8_linear(dense, self.weight_q, self.weight_scale, self.bias, self.activation, self.backend,
                               w_sum=self.weight_sum if self.asym_act else None)
        if self.asym_act:
            raise ValueError("this W8A8Linear quantizes its input asymmetrically itself: pass the dense input, not "
                             "symmetric codes from a fused producer")
        return self._prequantized(qa, torch.int8, torch.ops.workbench.scaled_mm, self.weight_q, self.weight_scale)


class FP8Linear(_QuantLinearBase):
    """Drop-in nn.Linear replacement: e4m3 per-channel weights, per-token e4m3 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 activation: Optional[str] = None, out_dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None, backend: Backend | str = Backend.AUTO) -> None:
        super().__init__()
        self.register_buffer("weight_fp8", torch.zeros(out_features, in_features, device=device).to(ref.FP8_DTYPE))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self._init_common(in_features, out_features, bias, activation, out_dtype, device, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, activation: Optional[str] = None,
                    backend: Backend | str = Backend.AUTO) -> "FP8Linear":
        """Quantize an nn.Linear to e4m3 (scale absmax/448 per output channel)."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, activation,
                  _weight_dtype(linear), linear.weight.device, backend)
        mod.weight_fp8, mod.weight_scale = ref.quantize_per_channel_fp8(linear.weight.detach())
        mod.set_bias(linear.bias)
        return mod

    def forward(self, x: Union[torch.Tensor, QuantizedActivation]) -> torch.Tensor:
        """y = dequant(fp8(x) @ W8^T) + b (+GELU); x may be pre-quantized with fp8=True."""
        dense, qa = self._split(x)
        if dense is not None and torch.compiler.is_compiling():
            return self._traced(dense, True, torch.ops.workbench.scaled_mm, self.weight_fp8, self.weight_scale)
        if dense is not None:
            return fp8_linear(dense, self.weight_fp8, self.weight_scale, self.bias, self.activation, self.backend)
        return self._prequantized(qa, ref.FP8_DTYPE, torch.ops.workbench.scaled_mm, self.weight_fp8,
                                  self.weight_scale)


class W4A8Linear(_QuantLinearBase):
    """Drop-in nn.Linear replacement: group-wise int4 weights (packed 2/byte), per-token int8 activations."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: Optional[int] = 128,
                 activation: Optional[str] = None, out_dtype: torch.dtype = torch.bfloat16,
                 device: Optional[torch.device] = None, backend: Backend | str = Backend.AUTO) -> None:
        super().__init__()
        group_size = in_features if group_size is None else group_size  # None: one scale per output channel
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} must be a multiple of group_size={group_size}")
        self.group_size = group_size
        self.register_buffer("weight_packed",
                             torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("weight_scales",
                             torch.ones(out_features, in_features // group_size, dtype=torch.float32, device=device))
        self._init_common(in_features, out_features, bias, activation, out_dtype, device, backend)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: Optional[int] = 128, activation: Optional[str] = None,
                    backend: Backend | str = Backend.AUTO) -> "W4A8Linear":
        """Quantize an nn.Linear to symmetric int4, scale absmax/7 per group of group_size input channels (None: per
        output channel: unpacked to int8 for the int8 GEMM, which runs at int8 speed on Hopper)."""
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, activation,
                  _weight_dtype(linear), linear.weight.device, backend)
        mod.weight_packed, mod.weight_scales = ref.quantize_weight_int4_grouped(linear.weight.detach(), mod.group_size)
        mod.set_bias(linear.bias)
        return mod

    def forward(self, x: Union[torch.Tensor, QuantizedActivation]) -> torch.Tensor:
        """y = sum_g (quant(x) . W4_g) * s_g * x_scale + b (+GELU); x may be pre-quantized (int8)."""
        dense, qa = self._split(x)
        if dense is not None and torch.compiler.is_compiling():
            return self._traced(dense, False, torch.ops.workbench.w4a8_scaled_mm, self.weight_packed,
                                self.weight_scales)
        if dense is not None:
            return w4a8_linear(dense, self.weight_packed, self.weight_scales, self.bias, self.activation,
                               self.backend)
        return self._prequantized(qa, torch.int8, torch.ops.workbench.w4a8_scaled_mm, self.weight_packed,
                                  self.weight_scales)


KERNEL_LINEARS = (W8A8Linear, FP8Linear, W4A8Linear)


def set_backend(model: nn.Module, backend: Backend | str) -> int:
    """Set `backend` on every kernel module of `model` (linears here; attention reads its own spec); returns the count."""
    backend = Backend.parse(backend)
    mods = [m for m in model.modules() if isinstance(m, KERNEL_LINEARS)]
    for m in mods:
        m.backend = backend
    return len(mods)


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


from . import ops  # noqa: E402  (registers the torch.library ops)
