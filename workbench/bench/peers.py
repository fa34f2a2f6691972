"""The peers our kernels are measured against: SDPA with a forced backend (cuDNN, flash), torchao, SageAttention2.

SageAttention2 (thu-ml/SageAttention: int8 QK with K smoothing, fp8 PV) is called through `sageattn`, wrapped in
a `torch.library` custom op so that torch.compile treats it as one opaque kernel (no graph break, no tracing into
its Python); `sage_attention()` routes the same long self-attention SDPA calls to it that `quantized_attention`
routes to ours. A missing package is a skip row that says how to get it, never a crash.
"""
from __future__ import annotations

import contextlib
import importlib.util
from typing import Any, Iterator

import torch
import torch.nn.functional as F

SAGE_BUILD = ("git clone https://github.com/thu-ml/SageAttention && cd SageAttention && TORCH_CUDA_ARCH_LIST=9.0 "
              "EXT_PARALLEL=2 MAX_JOBS=16 python3 -m pip install --no-build-isolation .")
TORCHAO_MISSING = "skipped: torchao not importable: pip install torchao"
SAGE_MISSING = f"skipped: sageattention not importable: build SageAttention2 on the GPU machine: {SAGE_BUILD}"

CALLS = {"sageattn": 0}  # SageAttention2 kernel calls that really ran (eager or inside compiled graphs)


def importable(package: str) -> bool:
    """Whether `import package` can find it (without importing it into this process)."""
    return importlib.util.find_spec(package) is not None


def unavailable(torchao: bool, sage: bool) -> str | None:
    """The skip message of a peer whose package is not importable here; None when it can run."""
    if torchao and not importable("torchao"):
        return TORCHAO_MISSING
    if sage and not importable("sageattention"):
        return SAGE_MISSING
    return None


@torch.library.custom_op("workbench_bench::sageattn", mutates_args=())
def _sageattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    import sageattention

    CALLS["sageattn"] += 1
    out = sageattention.sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=scale)
    return out.contiguous()


@_sageattn.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(q.shape)


def routable(query: torch.Tensor, key: torch.Tensor, attn_mask: Any, dropout_p: float, is_causal: bool,
             extra: dict, min_tokens: int) -> bool:
    """A long self-attention SDPA call a quantized attention kernel can take: no mask, no dropout, not causal,
    head_dim 64 or 128, at least min_tokens queries and keys (short cross-attention stays on SDPA)."""
    return (attn_mask is None and not is_causal and dropout_p == 0.0 and not any(extra.values())
            and query.shape[-1] in (64, 128) and query.shape[-2] >= min_tokens and key.shape[-2] >= min_tokens)


class Counter:
    """Calls of one routed kernel since the last reset."""

    def __init__(self, table: dict[str, int], key: str) -> None:
        self.table, self.key = table, key
        self.start = table[key]

    @property
    def calls(self) -> int:
        return self.table[self.key] - self.start

    def reset(self) -> None:
        self.start = self.table[self.key]


@contextlib.contextmanager
def sage_attention(min_tokens: int = 1024) -> Iterator[Counter]:
    """Route long self-attention SDPA calls through SageAttention2's `sageattn` (HND layout, not causal, the
    call's scale); the yielded counter counts the kernel calls that really ran."""
    orig = F.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):  # noqa: ANN001
        if routable(query, key, attn_mask, dropout_p, is_causal, kw, min_tokens):
            return torch.ops.workbench_bench.sageattn(query, key, value,
                                                      query.shape[-1] ** -0.5 if scale is None else float(scale))
        return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield Counter(CALLS, "sageattn")
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


SDPA_BACKENDS = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION"}


def sdpa_backend(name: str, device: torch.device) -> contextlib.AbstractContextManager:
    """`sdpa_kernel` forcing one SDPA backend ("cudnn" or "flash"), for compiling and running alike (the backend
    is chosen when the graph is traced). On the CPU (dry run) MATH is allowed too: the CPU has no cuDNN attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if name not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {name!r}; known: {sorted(SDPA_BACKENDS)}")
    backends = [getattr(SDPBackend, SDPA_BACKENDS[name])]
    if device.type != "cuda":
        backends.append(SDPBackend.MATH)
    return sdpa_kernel(backends)
