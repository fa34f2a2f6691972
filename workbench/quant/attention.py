"""Quantized attention for diffusers models: the Q K^T and P V matmuls on fake-quantized operands.

How it hooks in (each model keeps its own processor, with its rope, norms and masks):
- `wrap_attention(attn, spec)` adds a `QuantAttention` child (`attn.quant_attention`) and replaces
  `attn.processor` by `QuantAttnProcessor(inner, quant)`, which calls the inner processor unchanged
  while a context variable names the active `QuantAttention`.
- The attention function the inner processor's module calls is patched once, in that module only:
  `dispatch_attention_fn` (Wan, HunyuanVideo, LTX; (B, S, H, D) layout) or `F` whose
  `scaled_dot_product_attention` is replaced (CogVideoX, Latte, Mochi, HunyuanVideo's token refiner
  via diffusers.models.attention_processor; (B, H, S, D) layout). The patched function computes
  attention explicitly through the active `QuantAttention` when one is set and active, and otherwise
  calls the original, so everything else runs exactly as before.
`QuantAttention` can also record, per call, the attention each key token receives (the column mean of
P per head), which S2Q-VDiT uses to weight tokens.
"""

from __future__ import annotations

import inspect
import math
import threading
import types
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .quantizer import QuantSpec, Quantizer

ATTENTION_PARTS = ("q", "k", "v", "p")
KERNEL_PV = ("fp8", "fp16")  # P.V formats of workbench.kernels' quantized attention
KERNEL_HEAD_DIMS = (16, 32, 64, 128)


@dataclass(frozen=True)
class AttentionSpec:
    """Quantizers of Q and K (the Q K^T matmul) and of P and V (the P V matmul); None = full precision.

    Defaults are kernel friendly: Q, K per-token dynamic (scales factor out of the D reduction), V per
    tensor dynamic, P (softmax probabilities in [0, 1]) unsigned with the fixed range 0..1.
    kernel: "fp8" / "fp16" runs the call through workbench.kernels' quantized attention instead (int8 Q.K^T
    with K smoothing, that P.V format: the GPU kernel where one runs, its exact CPU reference elsewhere), so
    calibration, evaluation and the exported model all see the deployed numerics; q, k, v, p are then unset.
    Calls the kernel cannot take (a mask, dropout, causal, head_dim outside 16-128, fewer than
    `kernel_min_tokens` queries or keys, e.g. short cross-attention) stay full precision.
    """

    q: QuantSpec | None = QuantSpec("int8", "token", dynamic=True)
    k: QuantSpec | None = QuantSpec("int8", "token", dynamic=True)
    v: QuantSpec | None = QuantSpec("int8", "tensor", dynamic=True)
    p: QuantSpec | None = QuantSpec("uint8", "tensor", fixed_range=(0.0, 1.0))
    kernel: str | None = None
    kernel_min_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.kernel is None:
            return
        if self.kernel not in KERNEL_PV:
            raise ValueError(f"attention kernel {self.kernel!r}: use one of {KERNEL_PV} (the P.V format) or null")
        if any(getattr(self, n) is not None for n in ATTENTION_PARTS):
            raise ValueError("attention.kernel runs the kernel's own quantization: set q, k, v and p to null "
                             "(or drop 'kernel' to fake-quantize attention with those specs)")
        if int(self.kernel_min_tokens) < 0:
            raise ValueError(f"attention.kernel_min_tokens must be >= 0, got {self.kernel_min_tokens}")

    @classmethod
    def kernel_only(cls, pv: str = "fp8", min_tokens: int = 1024) -> AttentionSpec:
        """Attention through the quantized attention kernel with P.V in `pv`, for calls of >= min_tokens."""
        return cls(q=None, k=None, v=None, p=None, kernel=pv, kernel_min_tokens=min_tokens)

    @classmethod
    def uniform(cls, bits: int = 8, p_bits: int | None = None) -> AttentionSpec:
        """Default layout with `bits` for Q, K, V and `p_bits` (default: bits) for P."""
        d = cls()
        p_bits = bits if p_bits is None else p_bits
        return cls(
            q=d.q.with_(format=f"int{bits}"),
            k=d.k.with_(format=f"int{bits}"),
            v=d.v.with_(format=f"int{bits}"),
            p=d.p.with_(format=f"uint{p_bits}"),
        )

    @classmethod
    def capture_only(cls) -> AttentionSpec:
        """No quantization: wrap attention only to record attention statistics."""
        return cls(q=None, k=None, v=None, p=None)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {n: None if getattr(self, n) is None else getattr(self, n).to_dict()
                               for n in ATTENTION_PARTS}
        if self.kernel is not None:
            out.update(kernel=self.kernel, kernel_min_tokens=int(self.kernel_min_tokens))
        return out


def chunk_budget(chunk_elements: int | None, device: torch.device) -> int:
    """Score elements per query chunk: the explicit setting, else 2**26 on the CPU and, on a GPU, a 32nd of its free
    memory (fp32 scores, fp32 and low-precision P and the softmax's temporaries take about 16 bytes an element),
    at most 2**28: 4 GiB of temporaries, already 48 launches a call at 32,760 tokens x 12 heads x 16 rows."""
    if chunk_elements is not None:
        return int(chunk_elements)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(2**28, max(2**26, free // 32)))
    return 2**26


class QuantAttention(nn.Module):
    """softmax(fq(Q) fq(K)^T * scale + mask) -> fq(P) fq(V), in (B, H, S, D) layout like F.sdpa.

    Queries are processed in chunks so the (B, H, Sq, Sk) score matrix stays below `chunk_elements` (None: 2**26 on
    the CPU; on a GPU a 32nd of its free memory in elements, at most 2**28, since each chunk is a separate matmul
    and softmax launch: at 32,760 tokens x 12 heads x 16 rows a fixed 2**26 meant 3,276 chunks a call).
    capture: append, per call, the column mean of P over queries, shape (B, H, Sk), to `captured`.
    explicit: compute explicitly even when every quantizer is off (checks the math against SDPA).
    """

    def __init__(self, spec: AttentionSpec) -> None:
        super().__init__()
        self.spec = spec
        self.q_quantizer = None if spec.q is None else Quantizer(spec.q)
        self.k_quantizer = None if spec.k is None else Quantizer(spec.k)
        self.v_quantizer = None if spec.v is None else Quantizer(spec.v)
        self.p_quantizer = None if spec.p is None else Quantizer(spec.p)
        self.capture = False
        self.captured: list[torch.Tensor] = []
        self.explicit = False
        self.chunk_elements: int | None = None
        # the kernel's on/off switch, set with the activation quantizers' modes (`quant.context`): the kernel
        # runs only in "quantize"; "observe" and "off" give full-precision attention, like a pass-through quantizer
        self.mode = "quantize"
        # kernel P.V format -> relative error of each call against full precision (set by the stage
        # `choose_attention_kernels`); while set, the module passes full-precision attention on
        self.measure: dict[str, list[float]] | None = None

    is_weight = False  # for quant.context's mode switches: the kernel quantizes activations

    def quantizers(self) -> dict[str, Quantizer]:
        return {n: q for n in ATTENTION_PARTS if (q := getattr(self, f"{n}_quantizer")) is not None}

    @property
    def active(self) -> bool:
        """Whether attention must be computed here (else the original attention function runs)."""
        return (self.capture or self.explicit or self.measure is not None
                or (self.spec.kernel is not None and self.mode == "quantize")
                or any(q.mode != "off" for q in self.quantizers().values()))

    def kernel_applies(self, query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None, dropout_p: float,
                       is_causal: bool) -> bool:
        """Whether the quantized attention kernel takes this call: no mask, dropout or causality, equal head
        counts, head_dim 16-128, at least `kernel_min_tokens` queries and keys."""
        n = self.spec.kernel_min_tokens
        return (attn_mask is None and dropout_p == 0.0 and not is_causal and query.shape[-1] in KERNEL_HEAD_DIMS
                and key.shape[-3] == query.shape[-3] and min(query.shape[-2], key.shape[-2]) >= max(1, n))

    def _kernel(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
        """The quantized attention kernel where it applies (`AttentionSpec.kernel`), else full precision."""
        if self.kernel_applies(query, key, attn_mask, dropout_p, is_causal):
            return _kernel_call(query, key, value, scale, self.spec.kernel)
        return _full_precision(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    def _measure_kernels(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float | None,
                         enable_gqa: bool) -> torch.Tensor:
        """Full-precision attention (returned), and each kernel P.V format's relative error against it."""
        fp = _full_precision(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if self.kernel_applies(query, key, attn_mask, dropout_p, is_causal):
            ref = fp.double()
            for pv in KERNEL_PV:
                out = _kernel_call(query, key, value, scale, pv).double()
                self.measure.setdefault(pv, []).append(float((out - ref).norm() / ref.norm().clamp_min(1e-30)))
        return fp

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if self.measure is not None:
            return self._measure_kernels(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if self.spec.kernel is not None and self.mode == "quantize" and not (self.capture or self.explicit):
            return self._kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        q = query if self.q_quantizer is None else self.q_quantizer(query)
        k = key if self.k_quantizer is None else self.k_quantizer(key)
        v = value if self.v_quantizer is None else self.v_quantizer(value)
        scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
        s_q, s_k = query.shape[-2], key.shape[-2]
        if is_causal:
            causal = torch.ones(s_q, s_k, dtype=torch.bool, device=query.device).tril()
            attn_mask = causal if attn_mask is None else _merge_masks(attn_mask, causal)
        rows = max(1, chunk_budget(self.chunk_elements, query.device) // max(1, query[..., 0, 0].numel() * s_k))
        # With gradients, autograd would keep every chunk's scores and P (the whole S x S matrix, several bytes an
        # element: 30+ GiB at 32k tokens); each chunk is then recomputed in the backward pass instead, so one
        # chunk's temporaries are alive at a time. Not while the P quantizer observes (it would see P twice).
        recompute = (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
                     and (self.p_quantizer is None or self.p_quantizer.mode != "observe"))
        outs, col_sum = [], None
        for start in range(0, s_q, rows):
            stop = min(start + rows, s_q)
            mask = None
            if attn_mask is not None:
                mask = attn_mask if attn_mask.dim() < 2 or attn_mask.shape[-2] == 1 else attn_mask[..., start:stop, :]
            q_chunk = q[..., start:stop, :]
            if recompute:
                out, part = checkpoint(self._chunk, q_chunk, k, v, mask, scale, dropout_p, use_reentrant=False)
            else:
                out, part = self._chunk(q_chunk, k, v, mask, scale, dropout_p)
            if part is not None:
                col_sum = part if col_sum is None else col_sum + part
            outs.append(out)
        if self.capture and col_sum is not None:
            self.captured.append(col_sum / s_q)
        return torch.cat(outs, dim=-2)

    def _chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
               dropout_p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One query chunk: fq(P) V, and (capture) the column sums of P over its queries."""
        scores = (q @ k.transpose(-2, -1)).float() * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        p = scores.softmax(-1)
        if dropout_p > 0.0:
            p = F.dropout(p, dropout_p)
        part = p.detach().sum(-2) if self.capture else None
        p = p.to(v.dtype)
        if self.p_quantizer is not None:
            p = self.p_quantizer(p)
        return p @ v, part

    def extra_repr(self) -> str:
        return f"capture={self.capture}" if self.capture else ""


def _full_precision(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                    dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    """torch's own SDPA (not a patched one): the kernel modes' full-precision path."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _kernel_call(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None,
                 pv: str) -> torch.Tensor:
    """workbench.kernels' quantized attention (the GPU kernel, or its CPU reference) as a custom op."""
    import workbench.kernels.ops  # noqa: F401 - registers torch.ops.workbench.quant_attention

    return torch.ops.workbench.quant_attention(query, key, value, scale, pv)


def _merge_masks(mask: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


# ---------------------------------------------------------------------------------------------------
# routing diffusers' attention calls

_ACTIVE: ContextVar[QuantAttention | None] = ContextVar("workbench_active_quant_attention", default=None)
# How many wrapped processor calls are running, in any thread. The patched attention functions read this plain int
# first: torch.compile traces it (and guards on it), while it cannot trace ContextVar.get, so a model compiled with no
# QuantAttention running has no graph break at the patched function.
_RUNNING = 0
_RUNNING_LOCK = threading.Lock()
_PATCHES: list[tuple[dict, str, Any]] = []  # (module globals, name, original) for unpatching


def _sdpa_arguments(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> dict[str, Any]:
    return dict(
        query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
        is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
    )


def _quant_sdpa(original: Callable) -> Callable:
    """F.scaled_dot_product_attention that defers to the active QuantAttention ((B, H, S, D) layout)."""

    def scaled_dot_product_attention(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not _RUNNING:
            return original(*args, **kwargs)
        qa = _ACTIVE.get()
        if qa is None or not qa.active:
            return original(*args, **kwargs)
        return qa(**_sdpa_arguments(*args, **kwargs))

    scaled_dot_product_attention._quant_original = original  # type: ignore[attr-defined]
    return scaled_dot_product_attention


def _quant_dispatch(original: Callable) -> Callable:
    """diffusers' dispatch_attention_fn that defers to the active QuantAttention ((B, S, H, D) layout)."""
    signature = inspect.signature(original)

    def dispatch_attention_fn(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not _RUNNING:
            return original(*args, **kwargs)
        qa = _ACTIVE.get()
        if qa is None or not qa.active:
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a.get("parallel_config") is not None:
            raise NotImplementedError("quantized attention does not support context parallelism")
        query, key, value, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        if mask is not None and mask.dim() == 2 and mask.shape == (query.shape[0], key.shape[1]):
            mask = mask[:, None, None, :]  # (B, Sk) -> (B, 1, 1, Sk), as diffusers' native backend does
        out = qa(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), mask,
            a["dropout_p"], a["is_causal"], a["scale"], a["enable_gqa"],
        )
        return out.transpose(1, 2)

    dispatch_attention_fn._quant_original = original  # type: ignore[attr-defined]
    return dispatch_attention_fn


def _functional_with(sdpa: Callable) -> types.ModuleType:
    """A stand-in for torch.nn.functional: everything forwards to it except scaled_dot_product_attention."""
    proxy = types.ModuleType("torch.nn.functional")
    proxy.scaled_dot_product_attention = sdpa  # type: ignore[attr-defined]
    proxy.__getattr__ = lambda name: getattr(F, name)  # type: ignore[method-assign]
    proxy._quant_proxy = True  # type: ignore[attr-defined]
    return proxy


def patch_attention_function(processor: Any) -> None:
    """Route the attention call of `processor`'s class through the active QuantAttention (once per module)."""
    call = inspect.unwrap(type(processor).__call__)
    code, module_globals = call.__code__, call.__globals__
    if "dispatch_attention_fn" in code.co_names:
        current = module_globals["dispatch_attention_fn"]
        if not hasattr(current, "_quant_original"):
            module_globals["dispatch_attention_fn"] = _quant_dispatch(current)
            _PATCHES.append((module_globals, "dispatch_attention_fn", current))
    elif "scaled_dot_product_attention" in code.co_names and "F" in code.co_names:
        current = module_globals["F"]
        if not getattr(current, "_quant_proxy", False):
            module_globals["F"] = _functional_with(_quant_sdpa(current.scaled_dot_product_attention))
            _PATCHES.append((module_globals, "F", current))
    else:
        raise ValueError(
            f"{type(processor).__name__} calls neither dispatch_attention_fn nor F.scaled_dot_product_attention; "
            "its attention cannot be quantized"
        )


def unpatch_attention_functions() -> None:
    """Restore every patched attention function (wrapped processors then run in full precision)."""
    while _PATCHES:
        module_globals, name, original = _PATCHES.pop()
        module_globals[name] = original


class QuantAttnProcessor:
    """Runs a diffusers attention processor unchanged while `quant` is the active QuantAttention.

    Attribute reads and writes it does not own go to the inner processor (diffusers sets
    `_attention_backend` and `_parallel_config` on processors).
    """

    def __init__(self, inner: Any, quant: QuantAttention) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "quant", quant)
        patch_attention_function(inner)

    @property
    def __call__(self) -> Callable:
        # diffusers filters the kwargs it passes by inspect.signature(processor.__call__): expose the inner one.
        def call(attn: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            global _RUNNING
            token = _ACTIVE.set(self.quant)
            with _RUNNING_LOCK:
                _RUNNING += 1
            try:
                return self.inner(attn, hidden_states, *args, **kwargs)
            finally:
                with _RUNNING_LOCK:
                    _RUNNING -= 1
                _ACTIVE.reset(token)

        call.__signature__ = inspect.signature(self.inner.__call__)  # type: ignore[attr-defined]
        return call

    def __getattr__(self, name: str) -> Any:
        if name in ("inner", "quant"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("inner", "quant"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __setstate__(self, state: dict) -> None:
        # unpickled in a fresh process: the attention function patch must be in place again
        self.__dict__.update(state)
        patch_attention_function(self.inner)

    def __repr__(self) -> str:
        return f"QuantAttnProcessor({type(self.inner).__name__})"


def attention_types() -> tuple[type, ...]:
    """The diffusers attention classes (`Attention`, `AttentionModuleMixin` subclasses such as `WanAttention`
    and `LTXAttention`, and `MochiAttention`)."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    return (Attention, AttentionModuleMixin, MochiAttention)


def is_attention_module(module: nn.Module) -> bool:
    """True for a diffusers attention module (one of `attention_types()`)."""
    return isinstance(module, attention_types())


def _set_processor(module: nn.Module, processor: Any) -> None:
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def wrap_attention(module: nn.Module, spec: AttentionSpec) -> QuantAttention:
    """Quantize `module`'s attention matmuls per `spec` (re-wrapping replaces the previous spec)."""
    processor = module.processor
    if isinstance(processor, QuantAttnProcessor):
        processor = processor.inner
    quant = QuantAttention(spec)
    device = next((t.device for t in module.parameters()), None)
    if device is not None:
        quant.to(device)
    module.quant_attention = quant
    _set_processor(module, QuantAttnProcessor(processor, quant))
    return quant


def unwrap_attention(module: nn.Module) -> None:
    """Undo `wrap_attention`: the original processor back, the QuantAttention child removed."""
    if isinstance(module.processor, QuantAttnProcessor):
        _set_processor(module, module.processor.inner)
    if "quant_attention" in module._modules:
        del module._modules["quant_attention"]


@contextmanager
def capturing_attention(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record, for every wrapped attention module, the column mean of P (B, H, Sk) of each call.

    Yields {attention module name: list of tensors, one per attention call}, filled as the block runs.
    """
    quants = {
        name.removesuffix(".quant_attention").removesuffix("quant_attention"): m
        for name, m in model.named_modules()
        if isinstance(m, QuantAttention)
    }
    before = {name: m.capture for name, m in quants.items()}
    for m in quants.values():
        m.capture, m.captured = True, []
    try:
        yield {name: m.captured for name, m in quants.items()}
    finally:
        for name, m in quants.items():
            m.capture = before[name]
