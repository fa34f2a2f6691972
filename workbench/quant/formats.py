"""Number formats: integer (2-8 bits, symmetric or asymmetric) and simulated fp8 (e4m3, e5m2).

Everything here is a pure function of tensors. `fake_quant` is the differentiable round trip used in
forward passes: a straight-through estimator for the input and an LSQ-style gradient for the scale, so
distillation stages can learn scales with no extra machinery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KINDS = ("int", "fp8_e4m3", "fp8_e5m2")
INT_BITS = (2, 8)  # inclusive range of supported integer bit widths
SCALE_EPS = 1e-8  # smallest scale; keeps all-zero channels from dividing by zero

FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
FP8_MANTISSA_BITS = {"fp8_e4m3": 3, "fp8_e5m2": 2}
FP8_MIN_NORMAL = {"fp8_e4m3": 2.0**-6, "fp8_e5m2": 2.0**-14}


@dataclass(frozen=True)
class QuantFormat:
    """A number format: `kind` "int" | "fp8_e4m3" | "fp8_e5m2", bit width and symmetry (int only)."""

    kind: str = "int"
    bits: int = 8
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown format kind {self.kind!r}; choose one of {list(KINDS)}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be an integer in {INT_BITS[0]}..{INT_BITS[1]}, got {self.bits!r}")
        if self.kind == "int" and not INT_BITS[0] <= self.bits <= INT_BITS[1]:
            raise ValueError(f"bits must be in {INT_BITS[0]}..{INT_BITS[1]} for integer formats, got {self.bits}")
        if self.kind != "int" and (self.bits != 8 or not self.symmetric):
            raise ValueError(f"{self.kind} is an 8-bit symmetric format (bits=8, symmetric=True)")

    @property
    def is_fp8(self) -> bool:
        return self.kind != "int"

    @classmethod
    def parse(cls, text: str | QuantFormat) -> QuantFormat:
        """Read "int8", "int4", "int4_sym", "uint4", "int4_asym", "fp8", "fp8_e4m3", "fp8_e5m2"."""
        if isinstance(text, QuantFormat):
            return text
        name = str(text).strip().lower()
        if name in ("fp8", "fp8_e4m3", "e4m3"):
            return cls("fp8_e4m3", 8, True)
        if name in ("fp8_e5m2", "e5m2"):
            return cls("fp8_e5m2", 8, True)
        match = re.fullmatch(r"(u?)int(\d+)(_asym|_sym)?", name)
        if match is None:
            raise ValueError(
                f"cannot read format {text!r}; use intN / intN_sym (symmetric), uintN / intN_asym "
                f"(asymmetric) with N in {INT_BITS[0]}..{INT_BITS[1]}, or fp8_e4m3 / fp8_e5m2"
            )
        unsigned, bits, suffix = match.groups()
        if unsigned and suffix == "_sym":
            raise ValueError(f"{text!r} is contradictory: uint formats are asymmetric")
        return cls("int", int(bits), symmetric=not unsigned and suffix != "_asym")

    def __str__(self) -> str:
        if self.is_fp8:
            return self.kind
        return f"int{self.bits}" if self.symmetric else f"uint{self.bits}"


def qrange(fmt: QuantFormat) -> tuple[float, float]:
    """Smallest and largest code: int symmetric [-2^(b-1), 2^(b-1)-1], asymmetric [0, 2^b-1], fp8 [-max, max]."""
    if fmt.is_fp8:
        return -FP8_MAX[fmt.kind], FP8_MAX[fmt.kind]
    if fmt.symmetric:
        return float(-(2 ** (fmt.bits - 1))), float(2 ** (fmt.bits - 1) - 1)
    return 0.0, float(2**fmt.bits - 1)


def scale_zero_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, fmt: QuantFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point mapping [xmin, xmax] onto the format's grid (scale >= SCALE_EPS).

    Symmetric formats use max(|xmin|, |xmax|) so that +-absmax land on +-qmax; asymmetric formats first
    widen the range to contain 0 so that zero is exactly representable (as Q-Diffusion / ViDiT-Q do).
    """
    xmin = torch.as_tensor(xmin, dtype=torch.float32)
    xmax = torch.as_tensor(xmax, dtype=torch.float32, device=xmin.device)
    qmin, qmax = qrange(fmt)
    if fmt.symmetric:
        absmax = torch.maximum(xmin.abs(), xmax.abs())
        scale = (absmax / qmax).clamp(min=SCALE_EPS)
        return scale, torch.zeros_like(scale)
    lo, hi = xmin.clamp(max=0.0), xmax.clamp(min=0.0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=SCALE_EPS)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def code_dtype(fmt: QuantFormat) -> torch.dtype:
    """Storage dtype of codes: int8 (symmetric int), uint8 (asymmetric int) or the fp8 dtype."""
    if fmt.is_fp8:
        return FP8_DTYPES[fmt.kind]
    return torch.int8 if fmt.symmetric else torch.uint8


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Codes of x: clamp(round(x / scale) + zero) for int, the fp8 value of x / scale for fp8."""
    v = x.float() / scale
    if fmt.is_fp8:
        fmax = FP8_MAX[fmt.kind]
        return v.clamp(-fmax, fmax).to(FP8_DTYPES[fmt.kind])
    qmin, qmax = qrange(fmt)
    return torch.clamp(torch.round(v) + zero, qmin, qmax).to(code_dtype(fmt))


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    fmt: QuantFormat,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Real values of codes: (codes - zero) * scale."""
    if fmt.is_fp8:
        return (codes.float() * scale).to(dtype)
    return ((codes.float() - zero) * scale).to(dtype)


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    """round(v) in the forward pass, identity in the backward pass."""
    if not v.requires_grad:
        return torch.round(v)
    return (torch.round(v) - v).detach() + v


def _fp8_round_ste(v: torch.Tensor, kind: str) -> torch.Tensor:
    """Nearest fp8 value (round to nearest even) in the forward pass, identity in the backward pass."""
    rounded = v.to(FP8_DTYPES[kind]).float()
    if not v.requires_grad:
        return rounded
    return (rounded - v).detach() + v


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """dequantize(quantize(x)) in x's dtype, differentiable: STE for x (zero outside the clamp range) and
    the LSQ gradient for scale (round(x/s) - x/s inside the range, the clamp bound outside)."""
    v = x.float() / scale
    if fmt.is_fp8:
        fmax = FP8_MAX[fmt.kind]
        out = _fp8_round_ste(v.clamp(-fmax, fmax), fmt.kind) * scale
    elif fmt.symmetric:  # zero point is 0
        qmin, qmax = qrange(fmt)
        out = torch.clamp(_round_ste(v), qmin, qmax) * scale
    else:
        qmin, qmax = qrange(fmt)
        out = (torch.clamp(_round_ste(v) + zero, qmin, qmax) - zero) * scale
    return out.to(x.dtype)


def fp8_error_bound(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Largest rounding error of fp8 fake quant at x (inside +-max*scale): half an ulp, relative for normal
    numbers (2^-(m+1) |x|), absolute for subnormals (half the subnormal step times scale)."""
    m = FP8_MANTISSA_BITS[fmt.kind]
    subnormal_half_step = FP8_MIN_NORMAL[fmt.kind] * 2.0 ** (-m - 1)
    return torch.maximum(x.abs().float() * 2.0 ** (-m - 1), subnormal_half_step * scale)
