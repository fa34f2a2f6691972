"""`QuantLinear`: an in-place replacement for nn.Linear with weight and input quantizers.

    y = fq_a((x / s) R) . fq_w((W * s) R)^T + b + sum_k extras[k](x, y_q)

`s` (SmoothQuant channel balancing) and `R` (orthogonal rotation) are optional and exactly cancel in full
precision. `weight` and `bias` are the original nn.Linear parameters (same objects, same names), so
state dicts, optimizers and name-based hooks keep working. `extras` is where later stages add output
corrections (LoRA branches, token-aware estimators): each is called as extra(x, y_q) -> delta.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .balance import smooth_scales
from .quantizer import QuantSpec, Quantizer


def _tensor_key(t: torch.Tensor | None) -> Any:
    """Identity + in-place version of a tensor: changes whenever its contents may have changed."""
    return None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _share_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Give dst the very hook dicts of src, so hooks keep firing and their handles still remove them."""
    for name in _HOOK_DICTS:
        if name in src.__dict__:
            setattr(dst, name, getattr(src, name))


class QuantLinear(nn.Module):
    """nn.Linear with fake-quantized weight and input, optional smoothing / rotation and output extras."""

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None = None,
        weight_spec: QuantSpec | None = None,
        act_spec: QuantSpec | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias)
        self.register_parameter("bias", bias)
        self.weight_quantizer: Quantizer | None = None
        self.input_quantizer: Quantizer | None = None
        self.register_buffer("smooth", None)
        self.register_buffer("rotation", None)
        self.register_buffer("input_absmax", None, persistent=False)  # max |x_j| seen while observing
        self.extras = nn.ModuleDict()
        self.cache_weight = True  # keep fq(W') between calls while weight and scales are frozen
        self._weight_cache: tuple[Any, torch.Tensor] | None = None
        self.set_specs(weight_spec, act_spec)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, weight_spec: QuantSpec | None = None, act_spec: QuantSpec | None = None
    ) -> QuantLinear:
        """Wrap `linear`'s own weight and bias parameters (no copy); its forward hooks carry over."""
        q = cls(linear.weight, linear.bias, weight_spec, act_spec)
        _share_hooks(linear, q)
        return q

    def to_linear(self, dequantized: bool = False) -> nn.Linear:
        """A plain nn.Linear: the original parameters, or (dequantized=True) the fake-quantized weight
        mapped back to the input's basis (weight-only quantization baked in). Hooks carry over."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantized_weight()) if dequantized else self.weight
        linear.bias = self.bias
        _share_hooks(self, linear)
        return linear

    # ---- configuration -------------------------------------------------------------------------------

    def set_specs(self, weight_spec: QuantSpec | None, act_spec: QuantSpec | None) -> None:
        """(Re)build the quantizers; None leaves that side in full precision."""
        self.weight_quantizer = None if weight_spec is None else Quantizer(weight_spec, is_weight=True)
        self.input_quantizer = None if act_spec is None else Quantizer(act_spec)
        if self.weight_quantizer is not None:
            self.weight_quantizer.to(self.weight.device)
        self._weight_cache = None
        self.recalibrate_weight()

    def recalibrate_weight(self) -> None:
        """Recompute the static weight range from the current (smoothed, rotated) weight."""
        wq = self.weight_quantizer
        if wq is not None and not wq.spec.dynamic:
            wq.calibrate(self.effective_weight().detach())

    def set_smooth(self, s: torch.Tensor | None) -> None:
        """Use per-input-channel smoothing scales s (None removes them). Static input ranges are reset,
        since the input distribution they describe changed; the weight range is recomputed."""
        self.smooth = self._checked_smooth(s)
        self._after_transform_change()

    def smooth_(self, alpha: float = 0.5) -> torch.Tensor:
        """SmoothQuant from the input max |x_j| recorded while observing; returns the scales used."""
        if self.input_absmax is None:
            raise RuntimeError("no input statistics: run the model inside observing(model) first")
        s = smooth_scales(self.input_absmax, self.weight, alpha)
        self.set_smooth(s)
        return s

    def set_rotation(self, r: torch.Tensor | None) -> None:
        """Rotate input and weight by the orthogonal matrix r (in x in); None removes the rotation."""
        self.rotation = self._checked_rotation(r)
        self._after_transform_change()

    def set_balance(self, s: torch.Tensor | None, r: torch.Tensor | None) -> None:
        """Set smoothing scales and rotation together: one weight-range recomputation instead of two
        (an MSE weight observer makes each one cost a range search)."""
        smooth, rotation = self._checked_smooth(s), self._checked_rotation(r)
        self.smooth, self.rotation = smooth, rotation
        self._after_transform_change()

    def _checked_smooth(self, s: torch.Tensor | None) -> torch.Tensor | None:
        if s is None:
            return None
        if s.shape != (self.in_features,):
            raise ValueError(f"smooth scales must have shape ({self.in_features},), got {tuple(s.shape)}")
        return s.detach().float().to(self.weight.device)

    def _checked_rotation(self, r: torch.Tensor | None) -> torch.Tensor | None:
        if r is None:
            return None
        n = self.in_features
        if r.shape != (n, n):
            raise ValueError(f"rotation must have shape ({n}, {n}), got {tuple(r.shape)}")
        r = r.detach().float().to(self.weight.device)
        if not torch.allclose(r @ r.T, torch.eye(n, device=r.device), atol=1e-4):
            raise ValueError("rotation matrix must be orthogonal (R R^T = I)")
        return r

    def _after_transform_change(self) -> None:
        self._weight_cache = None
        if self.input_quantizer is not None and not self.input_quantizer.spec.dynamic:
            self.input_quantizer.reset()
        self.recalibrate_weight()

    # ---- computation ---------------------------------------------------------------------------------

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """x' = (x / s) R (identity when neither is set)."""
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.rotation is not None:
            x = x @ self.rotation.to(x.dtype)
        return x

    def effective_weight(self) -> torch.Tensor:
        """W' = (W * s) R, the weight the input quantizer's x' multiplies."""
        w = self.weight
        if self.smooth is not None:
            w = w * self.smooth.to(w.dtype)
        if self.rotation is not None:
            w = w @ self.rotation.to(w.dtype)
        return w

    def _compute_weight(self) -> torch.Tensor:
        w = self.effective_weight()
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def quantized_weight(self) -> torch.Tensor:
        """fq_w(W'), cached while nothing it depends on changes and no gradient is needed."""
        wq = self.weight_quantizer
        plain = self.smooth is None and self.rotation is None
        if plain and (wq is None or wq.mode == "off"):
            return self.weight
        wants_grad = torch.is_grad_enabled() and (
            self.weight.requires_grad or (wq is not None and any(p.requires_grad for p in wq.parameters()))
        )
        if wants_grad or not self.cache_weight or (wq is not None and wq.spec.timestep_wise):
            return self._compute_weight()
        key = (
            _tensor_key(self.weight),
            _tensor_key(self.smooth),
            _tensor_key(self.rotation),
            None if wq is None else wq.state_key(),
        )
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self._compute_weight())
        return self._weight_cache[1]

    @torch.no_grad()
    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer effectively applies to the original x: fq_w(W') R^T / s."""
        w = self._compute_weight().float()
        if self.rotation is not None:
            w = w @ self.rotation.T
        if self.smooth is not None:
            w = w / self.smooth
        return w.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = self.transform_input(x)
        iq = self.input_quantizer
        if iq is not None:
            if iq.mode == "observe":
                self._record_absmax(x)
            xt = iq(xt)
        y = F.linear(xt, self.quantized_weight(), self.bias)
        if len(self.extras):
            y_q = y
            for extra in self.extras.values():
                y = y + extra(x, y_q)
        return y

    @torch.no_grad()
    def _record_absmax(self, x: torch.Tensor) -> None:
        m = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
        self.input_absmax = m if self.input_absmax is None else torch.maximum(self.input_absmax, m)

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        parts.append(f"bias={self.bias is not None}")
        if self.smooth is not None:
            parts.append("smooth")
        if self.rotation is not None:
            parts.append("rotation")
        return ", ".join(parts)
