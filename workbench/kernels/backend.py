"""Which implementation a kernel call runs: the one switch every kernel module and function takes.

    from workbench.kernels import Backend, W8A8Linear
    layer = W8A8Linear.from_linear(linear, backend=Backend.REFERENCE)   # pure torch, any device

AUTO: Triton on a GPU that runs it, else the pure-torch reference (with one warning per op and reason).
TRITON: Triton or an error naming why it cannot run. REFERENCE: the pure-torch reference, always (the
kernels' exact math on any device, no warning).
"""

from __future__ import annotations

import enum
import warnings

import torch

_WARNED: set[tuple[str, str]] = set()
_MIN_CC = {"int8": (8, 0), "fp8": (8, 9)}


class Backend(str, enum.Enum):
    """Where a kernel call runs (see module docstring)."""

    AUTO = "auto"
    TRITON = "triton"
    REFERENCE = "reference"

    @classmethod
    def parse(cls, value: "Backend | str") -> "Backend":
        """A Backend from itself or its name; anything else is an error listing the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown kernel backend {value!r}; choose one of {[b.value for b in cls]}") from None


def _triton_error() -> str | None:
    """None if triton imports, else the import error text."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"{type(exc).__name__}: {exc}"
    return None


def unavailable_reason(kind: str = "int8", device: torch.device | None = None) -> str | None:
    """Why the Triton path cannot run for kind ('int8' or 'fp8') on device, or None if it can."""
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


def use_triton(op: str, kind: str, device: torch.device, backend: Backend | str = Backend.AUTO) -> bool:
    """Whether `op` runs Triton under `backend`; AUTO warns once per (op, reason) when it falls back."""
    backend = Backend.parse(backend)
    if backend is Backend.REFERENCE:
        return False
    reason = unavailable_reason(kind, device)
    if reason is None:
        return True
    if backend is Backend.TRITON:
        raise RuntimeError(f"workbench.kernels.{op}: backend 'triton' was asked for, but {reason}; "
                           "use backend 'auto' or 'reference' on this machine")
    if (op, reason) not in _WARNED:
        _WARNED.add((op, reason))
        warnings.warn(f"workbench.kernels.{op}: using the slow pure-torch reference path because {reason}",
                      RuntimeWarning, stacklevel=3)
    return False


__all__ = ["Backend", "available", "unavailable_reason", "use_triton"]
