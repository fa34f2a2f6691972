"""What every quantizer of a model may need to know about the current call, and mode switches.

The current diffusion timestep lives in a context variable. A forward pre-hook on the top-level
transformer sets it from the model's own `timestep` argument, so timestep-wise quantizers deep in the
tree pick their bucket without any plumbing. `observing` / `quantizing` / `quant_disabled` switch the
mode of every quantizer in a model for the duration of a `with` block.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator

import torch
from torch import nn

DEFAULT_MAX_TIMESTEP = 1000.0  # diffusers schedulers hand transformers timesteps in [0, 1000]


@dataclass
class _Step:
    """The timestep of the running forward pass; read lazily so a GPU tensor syncs only when needed."""

    timestep: Any
    max_timestep: float = DEFAULT_MAX_TIMESTEP
    _value: float | None = field(default=None, repr=False)

    @property
    def value(self) -> float:
        if self._value is None:
            t = self.timestep
            self._value = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        return self._value


_STEP: ContextVar[_Step | None] = ContextVar("workbench_quant_timestep", default=None)


def current_timestep() -> float | None:
    """The timestep of the forward pass in progress (first element of a batch), or None outside one."""
    step = _STEP.get()
    return None if step is None else step.value


def timestep_bucket(t: float, n_buckets: int, max_timestep: float = DEFAULT_MAX_TIMESTEP) -> int:
    """Uniform bucket of t in [0, max_timestep] among n_buckets (clamped at both ends)."""
    return min(max(int(t / max_timestep * n_buckets), 0), n_buckets - 1)


def current_bucket(n_buckets: int) -> int | None:
    """Bucket index of the current timestep among n_buckets, or None when no timestep is set."""
    step = _STEP.get()
    if step is None:
        return None
    return timestep_bucket(step.value, n_buckets, step.max_timestep)


@contextmanager
def at_timestep(t: Any, max_timestep: float = DEFAULT_MAX_TIMESTEP) -> Iterator[None]:
    """Set the current timestep by hand (custom loops, tests, bare modules without the hook)."""
    token = _STEP.set(_Step(t, max_timestep))
    try:
        yield
    finally:
        _STEP.reset(token)


def _timestep_pre_hook(module: nn.Module, args: tuple, kwargs: dict, *, arg: str, max_timestep: float) -> None:
    if arg in kwargs:
        t = kwargs[arg]
    else:
        try:
            t = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get(arg)
        except TypeError:
            t = None
    token = _STEP.set(None if t is None else _Step(t, max_timestep))
    module.__dict__.setdefault("_quant_step_tokens", []).append(token)


def _timestep_post_hook(module: nn.Module, args: tuple, output: Any) -> None:
    tokens: list[Token] = module.__dict__.get("_quant_step_tokens", [])
    if tokens:
        _STEP.reset(tokens.pop())


def install_timestep_hook(
    model: nn.Module, arg: str = "timestep", max_timestep: float = DEFAULT_MAX_TIMESTEP
) -> None:
    """Make `model`'s forward publish its `arg` argument (keyword or positional) as the current timestep."""
    remove_timestep_hook(model)
    pre = model.register_forward_pre_hook(
        partial(_timestep_pre_hook, arg=arg, max_timestep=max_timestep), with_kwargs=True
    )
    post = model.register_forward_hook(_timestep_post_hook, always_call=True)
    model.__dict__["_quant_timestep_hooks"] = (pre, post)


def remove_timestep_hook(model: nn.Module) -> None:
    """Undo `install_timestep_hook` (no-op when absent)."""
    for handle in model.__dict__.pop("_quant_timestep_hooks", ()):
        handle.remove()


# ----------------------------------------------------------------------------------------------------
# modes


MODES = ("observe", "quantize", "off")


def _quantizers(model: nn.Module) -> list[nn.Module]:
    """Every Quantizer, and every QuantAttention running the quantized attention kernel (its `mode` switches
    the kernel like an activation quantizer's)."""
    from .attention import QuantAttention
    from .quantizer import Quantizer

    return [m for m in model.modules()
            if isinstance(m, Quantizer) or (isinstance(m, QuantAttention) and m.spec.kernel is not None)]


def set_mode(model: nn.Module, mode: str, weights: bool = True, activations: bool = True) -> None:
    """Set the mode of every weight and/or activation quantizer in `model` ("observe", "quantize", "off")."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    for q in _quantizers(model):
        if (weights and q.is_weight) or (activations and not q.is_weight):
            q.mode = mode


@contextmanager
def _modes(model: nn.Module, mode: str, weights: bool, activations: bool) -> Iterator[nn.Module]:
    quantizers = _quantizers(model)
    before = [q.mode for q in quantizers]
    set_mode(model, mode, weights=weights, activations=activations)
    try:
        yield model
    finally:
        for q, m in zip(quantizers, before):
            q.mode = m


def observing(model: nn.Module, weights: bool = False) -> AbstractContextManager[nn.Module]:
    """Activation quantizers collect range statistics (and pass values through) inside the block.

    Weight quantizers keep their mode (normally "quantize", so activations are observed behind
    quantized weights, as in Q-Diffusion / ViDiT-Q); `weights=True` makes them observe too.
    """
    return _modes(model, "observe", weights=weights, activations=True)


def quantizing(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Every quantizer fake-quantizes inside the block."""
    return _modes(model, "quantize", weights=True, activations=True)


def quant_disabled(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Every quantizer is the identity inside the block: the model computes in full precision."""
    return _modes(model, "off", weights=True, activations=True)
