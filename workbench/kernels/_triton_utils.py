"""Shared Triton helpers: jit math building blocks and launch utilities (imports triton)."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# 1.5 * 2**23: adding it to an fp32 |x| < 2**22 rounds x to an integer (RNE); the int32 bit
# pattern 0x4B400000 + i is the fp32 value MAGIC_F + i for |i| < 2**22.
MAGIC_F = 12582912.0
MAGIC_I = 0x4B400000

try:  # host-side TMA descriptors (triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    HAS_TENSOR_DESC = True
except Exception:  # pragma: no cover - older triton
    TensorDescriptor = None  # type: ignore[assignment]
    HAS_TENSOR_DESC = False


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_for_numpy2() -> None:
    """Make the Triton interpreter's tensor.__index__ work with numpy >= 2.3 (size-1 arrays, not 0-d)."""
    try:
        import numpy as np
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_workbench_patched", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._workbench_patched = True  # type: ignore[attr-defined]
    _interp._patch_lang_tensor = patched


if interpreting():
    _patch_interpreter_for_numpy2()


@functools.lru_cache(maxsize=None)
def _num_sms_cached(index: int) -> int:
    """Number of SMs of a CUDA device."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """SM count of the tensor's device (a small constant for CPU / the interpreter)."""
    if device.type != "cuda":
        return 4
    return _num_sms_cached(device.index if device.index is not None else torch.cuda.current_device())


def is_hopper_or_newer(device: torch.device) -> bool:
    """True on sm_90+ where TMA descriptors and wgmma are available."""
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def use_fast_math() -> bool:
    """True when inline PTX (tanh.approx, ex2.f16x2) may be used, i.e. not in the interpreter."""
    return not interpreting()


def tma_ok(*tensors: torch.Tensor) -> bool:
    """True when every tensor is 2-D, unit inner stride, 16-byte aligned base and row stride."""
    if not HAS_TENSOR_DESC:
        return False
    for t in tensors:
        if t.dim() != 2 or t.stride(1) != 1:
            return False
        if t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


def m_bucket(m: int) -> int:
    """Autotune bucket for the token dim so that nearby M values share a tuned config."""
    return triton.next_power_of_2(max(int(m), 16))


def fast_bench(fn, quantiles=None):
    """Short do_bench used by the autotuners (keeps tuning of large shapes to well under a second)."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


@triton.jit
def rint_f32(x):
    """Round fp32 to the nearest integer, ties to even (valid for |x| < 2**22)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def int_to_f32_exact(s):
    """Convert int32 |s| < 2**22 to fp32 with an integer add + fp32 sub (no slow I2F instruction)."""
    return (s + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def round_to_e4m3_grid(x):
    """Round fp32 (already clamped to +-448) to the nearest e4m3 value, ties to even, in fp32."""
    ax = tl.abs(x)
    bits = ax.to(tl.int32, bitcast=True)
    c = ((bits & 0x7F800000) + (20 << 23)).to(tl.float32, bitcast=True)
    c = tl.maximum(c, 16384.0)  # e4m3 subnormal spacing 2**-9 == ulp(2**14)
    r = (ax + c) - c
    return tl.where(x < 0, -r, r)


@triton.jit
def to_fp8_e4m3(x, EMULATE: tl.constexpr):
    """Saturating RNE cast fp32 -> e4m3 (exact grid emulation under the interpreter)."""
    x = tl.minimum(tl.maximum(x, -448.0), 448.0)
    if EMULATE:
        x = round_to_e4m3_grid(x)
    return x.to(tl.float8e4nv)


@triton.jit
def gelu_tanh_f32(x, FAST: tl.constexpr):
    """GELU (tanh approximation) of fp32 x; FAST uses the tanh.approx.f32 MUFU instruction."""
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if FAST:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32,
                                      is_pure=True, pack=1)
        y = 0.5 * x * (1.0 + t)
    else:
        # 0.5*x*(1+tanh(u)) == x * sigmoid(2u)
        y = x / (1.0 + tl.math.exp2(tl.minimum(-2.8853900817779268 * u, 126.0)))
    return y


@triton.jit
def grouped_pid(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Map a linear tile id to (pid_m, pid_n) with GROUP_M-row super-grouping for L2 reuse."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


def check_gemm_shapes(k: int, n: int, what: str) -> None:
    """Raise a clear ValueError unless K and N are multiples of 16."""
    if k % 16 or n % 16:
        raise ValueError(f"{what}: K={k} and N={n} must both be multiples of 16 "
                         "(pad the weight / features to a multiple of 16)")
