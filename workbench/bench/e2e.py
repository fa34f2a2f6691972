"""End-to-end transformer forward benchmark: bf16 eager/compiled, torchao, and our kernels, side by side.

    python -m workbench.bench.e2e                     # GPU: CogVideoX-2B and Wan2.1-1.3B configs
    python -m workbench.bench.e2e --dry-run-cpu       # tiny configs on the CPU reference path

Every variant runs the same randomly initialised transformer (one seed) on the same inputs, so the
output error against bf16 eager measures the quantization alone. "ours" swaps the blocks' linears for
`W8A8Linear` / `FP8Linear` / `W4A8Linear` (GELU fused into the first FFN GEMM's epilogue) and, with
"+qattn", routes self-attention through the SageAttention-style `quant_attention`. Compiled variants
compile each transformer block (regional compilation: one compile serves all identical blocks); our
kernels are `torch.library` custom ops (kernels/ops.py), so each block traces to one graph and Inductor
can fuse the per-token activation quantization into the norm / modulation that produces it.

Each variant runs in its own process (`--worker`, `workbench.bench.isolate`): a variant that crashes, hangs
or leaks memory becomes an error row saying what happened (exit code, signal, timeout) and the others are
measured as before. Every worker builds the same seeded model and inputs and writes its output, and the
parent computes each row's error against the bf16 eager output. `--in-process` runs them all in this process.
The peers: SDPA with the backend forced to cuDNN or flash, torchao fp8 row-wise / int8 dynamic, SageAttention2
(`workbench.bench.peers`); a peer whose package is missing is a skip row saying how to get it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import statistics
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.bench import isolate, peers
from workbench.kernels import dispatch, ops
from workbench.kernels.fused_blocks import fuse_block_norms

# Public configs of the two reference models (transformer/config.json of THUDM/CogVideoX-2b and
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers); weights are random, shapes and FLOPs are the real ones.
COGVIDEOX_2B = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, flip_sin_to_cos=True,
    freq_shift=0, time_embed_dim=512, text_embed_dim=4096, num_layers=30, dropout=0.0, attention_bias=True,
    sample_width=90, sample_height=60, sample_frames=49, patch_size=2, temporal_compression_ratio=4,
    max_text_seq_length=226, activation_fn="gelu-approximate", timestep_activation_fn="silu",
    norm_elementwise_affine=True, norm_eps=1e-5, spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0, use_rotary_positional_embeddings=False,
    use_learned_positional_embeddings=False,
)
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)


@dataclass
class ModelCase:
    """One end-to-end case: diffusers class, config and input shapes (latent space, batch 1)."""

    name: str
    cls: str
    config: dict
    latent: tuple[int, ...]  # CogVideoX: (B, F, C, H, W); Wan: (B, C, F, H, W)
    text_tokens: int
    tokens: int
    iters: int = 8


def cases(dry: bool = False) -> list[ModelCase]:
    """The two benchmark cases; tiny versions of the same classes for the CPU dry run."""
    if dry:
        cog = {**COGVIDEOX_2B, "num_attention_heads": 2, "attention_head_dim": 64, "num_layers": 2,
               "text_embed_dim": 128, "time_embed_dim": 128, "sample_frames": 5, "sample_height": 8,
               "sample_width": 8, "max_text_seq_length": 8}
        wan = {**WAN_1_3B, "num_attention_heads": 2, "attention_head_dim": 64, "num_layers": 2, "text_dim": 128,
               "freq_dim": 32, "ffn_dim": 256, "rope_max_seq_len": 64}
        return [ModelCase("CogVideoX (tiny)", "CogVideoXTransformer3DModel", cog, (1, 2, 16, 8, 8), 8, 2 * 16 + 8, 2),
                ModelCase("Wan (tiny)", "WanTransformer3DModel", wan, (1, 16, 2, 8, 8), 8, 2 * 16, 2)]
    return [
        ModelCase("CogVideoX-2B 49x480x720", "CogVideoXTransformer3DModel", COGVIDEOX_2B, (1, 13, 16, 60, 90), 226,
                  13 * 30 * 45 + 226, 8),
        ModelCase("Wan2.1-1.3B 81x480x832", "WanTransformer3DModel", WAN_1_3B, (1, 16, 21, 60, 104), 512,
                  21 * 30 * 52, 5),
    ]


def case_by_name(name: str) -> tuple[ModelCase, bool]:
    """The case of that name and whether it is a dry-run (tiny) case; how a worker finds its case."""
    for dry in (False, True):
        for c in cases(dry):
            if c.name == name:
                return c, dry
    raise KeyError(f"unknown benchmark case {name!r}; known: {[c.name for d in (False, True) for c in cases(d)]}")


def build(case: ModelCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """The case's transformer with seeded random weights, in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(diffusers, case.cls)(**case.config)
    return model.to(dtype).eval().requires_grad_(False)


def inputs(case: ModelCase, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded latents, text states and a mid-trajectory timestep."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    text_dim = case.config.get("text_embed_dim", case.config.get("text_dim"))
    x = torch.randn(case.latent, generator=g).to(device, dtype)
    text = torch.randn(1, case.text_tokens, text_dim, generator=g).to(device, dtype)
    return {"hidden_states": x, "encoder_hidden_states": text,
            "timestep": torch.tensor([500], device=device, dtype=torch.long), "return_dict": False}


def block_linear(name: str, linear: nn.Linear) -> bool:
    """The linears we quantize: those inside transformer blocks, except AdaLN modulation (one row per video)."""
    return "blocks." in name and ".norm" not in name and linear.in_features % 128 == 0


def block_or_adaln_linear(name: str, linear: nn.Linear) -> bool:
    """W4A8's set: block linears plus the blocks' AdaLN modulation linears. Those run on one row per video
    (no compute to save) but hold a fifth of CogVideoX-2B's weights, so a memory-first format packs them too."""
    return "blocks." in name and linear.in_features % 128 == 0


class _FusedGELU(nn.Module):
    """diffusers `GELU(approximate='tanh')` as one quantized GEMM with GELU in its epilogue."""

    def __init__(self, qlinear: nn.Module):
        super().__init__()
        self.proj = qlinear

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.proj(x)


def swap_ours(model: nn.Module, kind: str, fuse_norms: bool = True) -> int:
    """Replace block linears with our kernel modules (kind: w8a8, fp8, w4a8 with one int4 scale per output channel as
    in ViDiT-Q, w4a8-g128 with one per 128 input channels); fuse tanh-GELU where it follows, and (fuse_norms) each
    block's residual + LayerNorm + modulation + quantization into one kernel (`fuse_block_norms`)."""
    from diffusers.models.activations import GELU

    make = {"w8a8": dispatch.W8A8Linear.from_linear, "fp8": dispatch.FP8Linear.from_linear,
            "w4a8": functools.partial(dispatch.W4A8Linear.from_linear, group_size=None),
            "w4a8-g128": dispatch.W4A8Linear.from_linear}[kind]
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, GELU) and child.approximate == "tanh" and block_linear(full + ".proj", child.proj):
                setattr(module, child_name, _FusedGELU(make(child.proj, activation="gelu_tanh")))
                n += 1
    n += dispatch.swap_linears(model, make, block_or_adaln_linear if kind.startswith("w4a8") else block_linear)
    mark_kernel_inputs(model)
    if fuse_norms:  # residual + LayerNorm + modulation + quantization in one kernel per block input
        fuse_block_norms(model)
    return n  # under torch.compile the modules trace to torch.ops.workbench.* (see kernels/ops.py): no graph breaks


def mark_kernel_inputs(model: nn.Module) -> int:
    """Flag the quantized linear that follows a fused GEMM+GELU in a feed-forward (diffusers' FeedForward.net:
    act, dropout, linear) to quantize its input with the one-pass row kernel (`input_from_kernel`); returns how many."""
    n = 0
    for module in model.modules():
        children = list(module.children())
        for i, child in enumerate(children):
            if not isinstance(child, _FusedGELU):
                continue
            nxt = next((c for c in children[i + 1:] if not isinstance(c, (nn.Dropout, nn.Identity))), None)
            if isinstance(nxt, dispatch.KERNEL_LINEARS):
                nxt.input_from_kernel = True
                n += 1
    return n


def swap_torchao(model: nn.Module, kind: str) -> None:
    """torchao's dynamic int8 or fp8 row-wise quantization of the same linears."""
    try:
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise ImportError(f"torchao not importable ({exc}): pip install torchao") from exc

    if kind == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Config

        config = Config()
    else:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and block_linear(fqn, m))


@contextlib.contextmanager
def quantized_attention(min_tokens: int = 1024) -> Iterator[peers.Counter]:
    """Route long self-attention SDPA calls (no mask, head_dim 64/128) through our quantized attention.

    The replacement calls the `workbench::quant_attention` custom op, so torch.compile traces through it
    (no graph break); the yielded object counts the kernel calls that really ran.
    """
    orig = F.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):  # noqa: ANN001
        if peers.routable(query, key, attn_mask, dropout_p, is_causal, kw, min_tokens):
            return torch.ops.workbench.quant_attention(query, key, value, scale, "fp8")
        return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield peers.Counter(ops.CALLS, "quant_attention")
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Regional compilation: compile every transformer block in place (same code -> one compile)."""
    blocks = getattr(model, "transformer_blocks", None) or getattr(model, "blocks")
    for b in blocks:
        b.compile(backend=backend)


OURS_QUANT = ("w8a8", "fp8", "w4a8", "w4a8-g128")


@dataclass
class Variant:
    """One row of the table: how the linears are quantized, how attention runs, whether blocks are compiled."""

    name: str
    quant: str | None = None  # ours: w8a8 / fp8 / w4a8 (per channel) / w4a8-g128; torchao: ao-int8 / ao-fp8
    qattn: bool = False  # our quantized attention for long self-attention
    compiled: bool = False
    sdpa: str | None = None  # SDPA backend forced while compiling and running: "cudnn" / "flash"
    sage: bool = False  # SageAttention2's sageattn for long self-attention
    fuse_norms: bool = True  # ours: the fused block producers (False: Inductor compiles diffusers' norms + our quant)
    fault: str | None = None  # isolation checks only (tests, dry run): the worker "exit"s (code 3), "hang"s, "raise"s

    @property
    def ours(self) -> bool:
        """Whether the row measures our kernels (else it is a peer: bf16, torchao, SageAttention2)."""
        return self.quant in OURS_QUANT or self.qattn


# Ordered by what matters most when a time budget cuts the list: the bf16 baselines, our best against the best
# peer combination, the other peers, our other formats, then eager and single-kernel ablations.
VARIANTS = [
    Variant("bf16 eager"),
    Variant("bf16 torch.compile", compiled=True),
    Variant("ours FP8 + qattn, compiled", "fp8", qattn=True, compiled=True),
    Variant("torchao fp8 + SageAttention2, compiled", "ao-fp8", sage=True, compiled=True),
    Variant("bf16 + SageAttention2, compiled", sage=True, compiled=True),
    Variant("torchao fp8 row-wise, compiled", "ao-fp8", compiled=True),
    Variant("bf16 torch.compile, SDPA cuDNN", compiled=True, sdpa="cudnn"),
    Variant("bf16 torch.compile, SDPA flash", compiled=True, sdpa="flash"),
    Variant("ours W4A8 + qattn, compiled", "w4a8", qattn=True, compiled=True),
    Variant("ours W8A8 + qattn, compiled", "w8a8", qattn=True, compiled=True),
    Variant("torchao int8 dynamic, compiled", "ao-int8", compiled=True),
    Variant("ours FP8, compiled", "fp8", compiled=True),
    Variant("ours W8A8, compiled", "w8a8", compiled=True),
    Variant("ours W4A8, compiled", "w4a8", compiled=True),
    Variant("bf16 + qattn, compiled", qattn=True, compiled=True),
    Variant("ours W8A8", "w8a8"),
    Variant("ours W8A8 + qattn", "w8a8", qattn=True),
    Variant("ours W4A8", "w4a8"),
    Variant("ours W4A8 g128, compiled", "w4a8-g128", compiled=True),
    Variant("ours FP8 + qattn, compiled, Inductor norms", "fp8", qattn=True, compiled=True, fuse_norms=False),
]
REFERENCE = "bf16 eager"  # every row's error is measured against this variant's output
BY_NAME = {v.name: v for v in VARIANTS}
# The CPU dry run: one row per mechanism (workers, compile, forced SDPA backend, our formats and attention,
# peers' skip rows) plus a worker that crashes, so the isolation is exercised too.
DRY_RUN_CRASH = Variant("dry-run check: worker exits with code 3", fault="exit")
DRY_VARIANTS = [BY_NAME[n] for n in (
    "bf16 eager", "bf16 torch.compile", "ours FP8 + qattn, compiled", "torchao fp8 + SageAttention2, compiled",
    "bf16 + SageAttention2, compiled", "torchao fp8 row-wise, compiled", "bf16 torch.compile, SDPA cuDNN",
    "ours W4A8 + qattn, compiled", "ours W8A8")] + [DRY_RUN_CRASH]


def is_ours(name: str) -> bool:
    """Whether a row (by variant name, also of an older page) measures our kernels."""
    v = BY_NAME.get(name)
    return v.ours if v is not None else (name.startswith("ours") or "qattn" in name)


def skip_reason(v: Variant, device: torch.device) -> str | None:
    """Why a variant cannot run here (its peer package is missing, or it needs a GPU in a dry run); None if it can."""
    torchao = (v.quant or "").startswith("ao-")
    missing = peers.unavailable(torchao=torchao, sage=v.sage)
    if missing:
        return missing
    if device.type != "cuda" and torchao:
        return "skipped: torchao's fp8 / int8 kernels need a CUDA GPU (dry run)"
    if device.type != "cuda" and v.sage:
        return "skipped: SageAttention2 needs a CUDA GPU (dry run)"
    return None


@dataclass
class Row:
    model: str
    variant: str
    ms: float | None = None
    peak_gib: float | None = None
    weight_gib: float | None = None
    rel_err: float | None = None
    speedup_vs_eager: float | None = None
    speedup_vs_compiled: float | None = None
    error: str | None = None
    qattn_calls: int = 0
    times_ms: list[float] = field(default_factory=list)
    weight_source: str | None = None  # "bytes": weight_bytes(); None: an older run's CUDA allocator difference
    wall_s: float | None = None  # the variant's whole run (its worker: imports, build, compile, timing)
    graphs: int | None = None  # compiled variants: graphs Dynamo compiled (one per distinct block input layout)
    graph_breaks: int | None = None  # compiled variants: graph breaks (0 when every block ran as one graph)


def compile_counts() -> tuple[int, int]:
    """Graphs Dynamo compiled and graph breaks it took since its counters were last cleared: whether a compiled
    variant (ours or a peer) really ran as compiled blocks, not partly eager."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def compile_cell(graphs: int | None, breaks: int | None) -> str:
    """The table cell of `compile_counts` ("-" for an eager variant or an older run's row)."""
    return "-" if graphs is None else f"{graphs} ({breaks})"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], Any], iters: int, device: torch.device) -> list[float]:
    out = []
    for _ in range(iters):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding a tensor's data: itself, or a wrapper subclass's inner tensors (torchao's fp8 /
    int8 weights keep codes and scales inside a wrapper without storage of its own), recursively."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [leaf for name in names for leaf in _plain_tensors(getattr(t, name))]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once): the weights a deployment keeps resident."""
    seen, total = set(), 0
    for t in [leaf for p in list(model.parameters()) + list(model.buffers()) for leaf in _plain_tensors(p)]:
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def prepare(case: ModelCase, v: Variant, device: torch.device, dtype: torch.dtype, compile_backend: str = "inductor",
            seed: int = 0) -> tuple[nn.Module, float]:
    """The variant's model (seeded random weights, its linears quantized, its blocks compiled) and its weight GiB."""
    model = build(case, device, dtype, seed)
    if v.quant in OURS_QUANT:
        swap_ours(model, v.quant, v.fuse_norms)
    elif v.quant in ("ao-int8", "ao-fp8"):
        swap_torchao(model, v.quant[3:])
    elif v.quant is not None:
        raise ValueError(f"unknown quantization {v.quant!r} in variant {v.name!r}; "
                         f"known: {OURS_QUANT} and ao-int8 / ao-fp8")
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    weight_gib = weight_bytes(model) / 2**30
    if v.compiled:
        compile_blocks(model, compile_backend)
    return model, weight_gib


@contextlib.contextmanager
def attention_context(v: Variant, min_tokens: int, device: torch.device) -> Iterator[peers.Counter | None]:
    """The variant's attention: a forced SDPA backend, and/or long self-attention routed to our quantized kernel or
    to SageAttention2; yields the routed kernel's call counter (None when nothing is routed)."""
    if v.qattn and v.sage:
        raise ValueError(f"variant {v.name!r} asks for two attention kernels (qattn and sage); pick one")
    with contextlib.ExitStack() as stack:
        if v.sdpa:
            stack.enter_context(peers.sdpa_backend(v.sdpa, device))
        counter = None
        if v.qattn:
            counter = stack.enter_context(quantized_attention(min_tokens))
        elif v.sage:
            counter = stack.enter_context(peers.sage_attention(min_tokens))
        yield counter


def check_routed(v: Variant, routed: peers.Counter | None) -> int:
    """The routed attention kernel's calls since its last reset; an error when the variant routes and none ran
    (a silent fallback to SDPA would be timed as the quantized kernel)."""
    if routed is None:
        return 0
    if routed.calls == 0:
        raise RuntimeError(f"no attention call was routed to {'SageAttention2' if v.sage else 'the quantized kernel'}")
    return routed.calls


def log_traceback(log: Callable[[str], None], frames: int = 6) -> None:
    """The innermost lines of the exception being handled, through `log` (a worker's stdout reaches the parent's
    log, its stderr does not); the whole traceback on stderr with WORKBENCH_BENCH_TRACEBACK=1."""
    lines = traceback.format_exc().rstrip().splitlines()
    for line in lines[-2 * frames - 1:]:
        log(f"    | {line}")
    if os.environ.get("WORKBENCH_BENCH_TRACEBACK"):
        traceback.print_exc()


def error_text(exc: BaseException) -> str:
    """An exception as one table cell: its type and the first line of its message."""
    msg = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {msg}"


def measure(case: ModelCase, v: Variant, device: torch.device, dtype: torch.dtype, warmup: int = 2,
            min_attn_tokens: int = 1024, compile_backend: str = "inductor", log: Callable[[str], None] = print,
            seed: int = 0, timed: bool = True) -> tuple[Row, torch.Tensor | None]:
    """Build, quantize, compile and time one variant in this process: its row (without the error against bf16,
    which the caller computes) and its output in float32 (None when it failed). timed=False: the output only."""
    from torch._dynamo.utils import counters

    row, out, model = Row(case.name, v.name), None, None
    t0 = time.time()
    counters.clear()
    try:
        model, row.weight_gib = prepare(case, v, device, dtype, compile_backend, seed)
        row.weight_source = "bytes"
        x = inputs(case, device, dtype, seed)
        with attention_context(v, min_attn_tokens, device) as routed, torch.inference_mode():
            if timed:
                t = time.time()
                for _ in range(warmup):
                    model(**x)
                _sync(device)
                log(f"  {v.name}: warm-up {time.time() - t:.1f}s")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                row.times_ms = _time(lambda: model(**x), case.iters, device)
                if device.type == "cuda":
                    row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
            if routed is not None:
                routed.reset()  # count the routed calls of one forward
            out = model(**x)[0].float()
            row.qattn_calls = check_routed(v, routed)
            if v.compiled:
                row.graphs, row.graph_breaks = compile_counts()
        if not torch.isfinite(out).all():
            raise FloatingPointError("output has NaN/inf")
        if timed:
            row.ms = statistics.median(row.times_ms)
    except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the table
        row.error, out = error_text(exc), None
        log(f"  {v.name}: FAILED {row.error}")
        log_traceback(log)
    finally:
        del model
        torch._dynamo.reset()
    row.wall_s = time.time() - t0
    return row, out


def _worker(spec: dict[str, Any]) -> dict[str, Any]:
    """`--worker SPEC`: one variant of one case, measured in this fresh process; the output goes to a file."""
    v = Variant(**spec["variant"])
    isolate.inject_fault(v.fault)
    case, _ = case_by_name(spec["case"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    row, out = measure(case, v, device, dtype, warmup=spec["warmup"], min_attn_tokens=spec["min_attn_tokens"],
                       compile_backend=spec["compile_backend"], seed=spec["seed"], timed=spec["timed"])
    return {"row": asdict(row), "out": None if out is None else isolate.save_tensor(out, Path(spec["out"]))}


def run_case(case: ModelCase, variants: list[Variant], device: torch.device, dtype: torch.dtype,
             warmup: int = 2, budget_s: float | None = None, log: Callable[[str], None] = print,
             min_attn_tokens: int = 1024, on_row: Callable[[list[Row]], None] | None = None,
             compile_backend: str = "inductor", isolated: bool = True, timeout_s: float = 600.0,
             seed: int = 0, reference_dir: str | None = None) -> list[Row]:
    """Time every variant on one case, each in its own process (isolated=False: all in this one).

    A variant that fails, crashes, runs past timeout_s or would start after budget_s becomes an error row; a
    peer whose package is missing a skip row. Every row's rel. error is against bf16 eager's output (computed
    once, untimed, when bf16 eager is not among the variants, unless `reference_dir` keeps it from an earlier
    call). `on_row(rows)` is called after every variant with the rows so far, so a caller can save a run that a
    time limit cuts short in the middle of a model.
    """
    t_start = time.time()
    common = dict(warmup=warmup, min_attn_tokens=min_attn_tokens, compile_backend=compile_backend, seed=seed)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="workbench-e2e-") as tmp:

        def run(v: Variant, name: str, timed: bool) -> tuple[Row, str | None]:
            path = Path(tmp) / f"{name}.safetensors"
            if isolated:
                spec = dict(case=case.name, device=str(device), dtype=str(dtype).removeprefix("torch."),
                            variant=asdict(v), out=str(path), timed=timed, **common)
                res = isolate.run_worker("workbench.bench.e2e", spec, Path(tmp), name, timeout_s, log, v.name)
                if res.result is None:
                    return Row(case.name, v.name, error=res.error, wall_s=res.seconds), None
                return Row(**{**res.result["row"], "wall_s": res.seconds}), res.result["out"]
            if v.fault:
                return Row(case.name, v.name, error="skipped: fault injection needs worker processes"), None
            row, out = measure(case, v, device, dtype, log=log, timed=timed, **common)
            return row, None if out is None else isolate.save_tensor(out, path)

        errors = isolate.ErrorsAgainst(REFERENCE)
        kept = isolate.ReferenceStore(reference_dir, "forward", case.name, seed, dtype, device)
        need_ref = all(v.name != REFERENCE for v in variants)
        for i, v in enumerate(variants):
            row = Row(case.name, v.name)
            skip = skip_reason(v, device)
            if skip:
                row.error = skip
            elif budget_s is not None and time.time() - t_start > budget_s:
                row.error = "skipped: time budget exhausted"
            else:
                if need_ref:  # before the first variant that runs
                    need_ref = False
                    ref_path = kept.get()
                    if ref_path is not None:
                        log(f"  {REFERENCE} (the reference of the errors): kept from an earlier call, {ref_path}")
                    else:
                        ref_row, ref_path = run(Variant(REFERENCE), "reference", timed=False)
                        if ref_path is None:
                            log(f"  {REFERENCE} (the reference of the errors) failed: {ref_row.error}")
                        kept.put(ref_path)
                    errors.add(REFERENCE, ref_path)
                row, path = run(v, f"variant{i:02d}", timed=True)
                if v.name == REFERENCE:
                    kept.put(path)
                for name, err in errors.add(v.name, path).items():
                    for r in rows + [row]:
                        if r.variant == name:
                            r.rel_err = err
                if row.ms is not None:
                    err = "-" if row.rel_err is None else format(row.rel_err, ".4f")
                    log(f"  {v.name}: {row.ms:.1f} ms, rel err {err}"
                        + ("" if row.wall_s is None else f", {row.wall_s:.0f} s in all"))
            rows.append(row)
            fill_speedups(rows)
            if on_row is not None:
                on_row(rows)
    return rows


def ordered(rows: list[Row]) -> list[Row]:
    """Rows grouped by model (first seen first), variants in VARIANTS order: a merged page reads like one run."""
    models = list(dict.fromkeys(r.model for r in rows))
    rank = {v.name: i for i, v in enumerate(VARIANTS)}
    return sorted(rows, key=lambda r: (models.index(r.model), rank.get(r.variant, len(rank))))


def fill_speedups(rows: list[Row]) -> None:
    """Fill each timed row's speedup over its model's bf16 eager and bf16 torch.compile (where those ran)."""
    for model in {r.model for r in rows}:
        same = [r for r in rows if r.model == model]
        eager = next((r.ms for r in same if r.variant == "bf16 eager" and r.ms), None)
        compiled = next((r.ms for r in same if r.variant == "bf16 torch.compile" and r.ms), None)
        for r in same:
            if r.ms:
                r.speedup_vs_eager = eager / r.ms if eager else None
                r.speedup_vs_compiled = compiled / r.ms if compiled else None


def cell(text: str) -> str:
    """Text safe inside a markdown table cell (one line, no column separators)."""
    return " ".join(str(text).split()).replace("|", "/")


def best_rows(rows: list[Any], model: str, key: str = "ms") -> tuple[Any | None, Any | None]:
    """The model's fastest measured peer row (not ours; bf16 eager included) and its fastest row of ours, by
    `key` (ms for the forward table, s_per_video for the sampling loop)."""
    timed = [r for r in rows if r.model == model and getattr(r, key)]
    peer = min((r for r in timed if not is_ours(r.variant)), key=lambda r: getattr(r, key), default=None)
    ours = min((r for r in timed if is_ours(r.variant)), key=lambda r: getattr(r, key), default=None)
    return peer, ours


def best_peer_markdown(rows: list[Any], key: str = "ms", unit: str = "ms") -> str:
    """Per model: the best peer (fastest row that is not ours), our fastest row, and ours vs it."""
    lines = [f"| model | best peer (fastest non-ours row) | {unit} | best of ours | {unit} | ours vs best peer |",
             "|---|---|---:|---|---:|---:|"]
    for model in dict.fromkeys(r.model for r in rows):
        peer, ours = best_rows(rows, model, key)
        if peer is None and ours is None:
            continue
        pv, ov = (None if r is None else getattr(r, key) for r in (peer, ours))
        ratio = f"{pv / ov:.2f}x faster" if pv and ov and pv >= ov else f"{ov / pv:.2f}x slower" if pv and ov else "-"
        lines.append(f"| {model} | {peer.variant if peer else '-'} | {'-' if pv is None else f'{pv:.3g}'} | "
                     f"{ours.variant if ours else '-'} | {'-' if ov is None else f'{ov:.3g}'} | {ratio} |")
    return "\n".join(lines)


def markdown(rows: list[Row]) -> str:
    """The end-to-end table (one row per model x variant)."""
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    lines = ["| model | variant | median ms | vs bf16 eager | vs bf16 compiled | peak GiB | weights GiB | rel. error vs bf16 "
             "| graphs (breaks) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    dagger = False
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.variant} | {cell(r.error)} | | | | | | |")
            continue
        w = f(r.weight_gib, '.3f')
        if r.weight_gib is not None and r.weight_source != "bytes":
            w, dagger = w + " †", True
        lines.append(f"| {r.model} | {r.variant} | {f(r.ms, '.1f')} | {x(r.speedup_vs_eager)} | "
                     f"{x(r.speedup_vs_compiled)} | {f(r.peak_gib, '.2f')} | {w} | {f(r.rel_err, '.4f')} | "
                     f"{compile_cell(r.graphs, r.graph_breaks)} |")
    if dagger:
        lines += ["", "† weights measured as the CUDA allocator's growth when the variant was built (an earlier "
                  "version of the bench); it over-counts by up to 0.1 GiB. The other rows count parameter and buffer bytes."]
    if any(r.graphs is not None for r in rows):
        lines += ["", "graphs (breaks): for compiled variants, the graphs torch.compile built and the graph breaks it "
                  "took (every block is compiled on its own; a block whose input is laid out differently, such as the "
                  "first, gets a graph of its own). No breaks: no part of a block ran eager."]
    return "\n".join(lines)


def split_names(text: str, known: list[str]) -> list[str]:
    """Split a comma-separated list of variant names, some of which contain commas (longest known name wins)."""
    tokens, out, i = text.split(","), [], 0
    while i < len(tokens):
        j = next((j for j in range(len(tokens), i, -1) if ",".join(tokens[i:j]).strip() in known), i + 1)
        out.append(",".join(tokens[i:j]).strip())
        i = j
    return [n for n in out if n]


def select_variants(text: str | None, default: list[Variant]) -> list[Variant]:
    """The variants a comma-separated list of exact names asks for, in the order asked (a time budget cuts the
    tail); `default` when text is empty."""
    if not text:
        return list(default)
    known = {v.name: v for v in VARIANTS + [DRY_RUN_CRASH]}
    names = split_names(text, list(known))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {list(known)}")
    return [known[n] for n in dict.fromkeys(names)]


def main(argv: list[str] | None = None, on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="tiny configs on the CPU reference path (one variant per mechanism and a crashing worker)")
    p.add_argument("--models", default=None, help="comma-separated substrings of case names to run")
    p.add_argument("--variants", default=None, help="comma-separated exact variant names (default: all)")
    isolate.add_run_args(p, "bench_e2e")
    a = p.parse_args(argv)
    if a.worker:
        isolate.worker_main(a.worker, _worker)
        return []
    dry = a.dry_run_cpu
    if not dry and not torch.cuda.is_available():
        raise SystemExit("the end-to-end benchmark needs a CUDA GPU; use --dry-run-cpu to check its logic on the CPU")
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = True
    # compiled variants trace with aot_eager in a dry run (Dynamo + AOT, no codegen)
    variants = select_variants(a.variants, DRY_VARIANTS if dry else VARIANTS)
    timeout = a.variant_timeout or (300.0 if dry else 600.0)
    rows: list[Row] = []
    for case in cases(dry):
        if a.models and not any(m.strip() in case.name for m in a.models.split(",")):
            continue
        print(f"{case.name}: {case.tokens} tokens", flush=True)
        done = list(rows)
        rows += run_case(case, variants, device, dtype, budget_s=a.budget, min_attn_tokens=16 if dry else 1024,
                         compile_backend="aot_eager" if dry else "inductor", isolated=not a.in_process,
                         timeout_s=timeout, reference_dir=a.reference_dir,
                         on_row=None if on_row is None else (lambda part, done=done: on_row(done + part)))
    md = markdown(rows) + "\n\n" + best_peer_markdown(rows)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_e2e.md"), "w") as fh:
            fh.write(md + "\n")
        with open(os.path.join(a.out, "bench_e2e.json"), "w") as fh:
            json.dump([asdict(r) for r in rows], fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
