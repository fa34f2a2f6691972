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
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from workbench.kernels import dispatch, ops

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


def swap_ours(model: nn.Module, kind: str) -> int:
    """Replace block linears with our kernel modules (kind: w8a8, fp8, w4a8); fuse tanh-GELU where it follows."""
    from diffusers.models.activations import GELU

    make = {"w8a8": dispatch.W8A8Linear.from_linear, "fp8": dispatch.FP8Linear.from_linear,
            "w4a8": dispatch.W4A8Linear.from_linear}[kind]
    n = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, GELU) and child.approximate == "tanh" and block_linear(full + ".proj", child.proj):
                setattr(module, child_name, _FusedGELU(make(child.proj, activation="gelu_tanh")))
                n += 1
    n += dispatch.swap_linears(model, make, block_or_adaln_linear if kind == "w4a8" else block_linear)
    return n  # under torch.compile the modules trace to torch.ops.workbench.* (see kernels/ops.py): no graph breaks


def swap_torchao(model: nn.Module, kind: str) -> None:
    """torchao's dynamic int8 or fp8 row-wise quantization of the same linears."""
    from torchao.quantization import quantize_

    if kind == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig as Config

        config = Config()
    else:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and block_linear(fqn, m))


class _Routed:
    """Counts the quantized-attention kernel calls since the last reset (eager or inside compiled graphs)."""

    def __init__(self) -> None:
        self.start = ops.CALLS["quant_attention"]

    @property
    def calls(self) -> int:
        return ops.CALLS["quant_attention"] - self.start

    def reset(self) -> None:
        self.start = ops.CALLS["quant_attention"]


@contextlib.contextmanager
def quantized_attention(min_tokens: int = 1024) -> Iterator[_Routed]:
    """Route long self-attention SDPA calls (no mask, head_dim 64/128) through our quantized attention.

    The replacement calls the `workbench::quant_attention` custom op, so torch.compile traces through it
    (no graph break); the yielded object counts the kernel calls that really ran.
    """
    orig = F.scaled_dot_product_attention

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):  # noqa: ANN001
        if (attn_mask is None and not is_causal and dropout_p == 0.0 and not any(kw.values()) and query.shape[-1] in (64, 128)
                and query.shape[-2] >= min_tokens and key.shape[-2] >= min_tokens):
            return torch.ops.workbench.quant_attention(query, key, value, scale, "fp8")
        return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    torch.nn.functional.scaled_dot_product_attention = patched
    try:
        yield _Routed()
    finally:
        torch.nn.functional.scaled_dot_product_attention = orig


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Regional compilation: compile every transformer block in place (same code -> one compile)."""
    blocks = getattr(model, "transformer_blocks", None) or getattr(model, "blocks")
    for b in blocks:
        b.compile(backend=backend)


@dataclass
class Variant:
    name: str
    quant: str | None = None  # ours: w8a8 / fp8 / w4a8; torchao: ao-int8 / ao-fp8
    qattn: bool = False
    compiled: bool = False


# Ordered by what matters most when a time budget cuts the list: baselines, our best, torchao, the rest.
VARIANTS = [
    Variant("bf16 eager"),
    Variant("bf16 torch.compile", compiled=True),
    Variant("ours FP8, compiled", "fp8", compiled=True),
    Variant("ours W8A8, compiled", "w8a8", compiled=True),
    Variant("torchao fp8 row-wise, compiled", "ao-fp8", compiled=True),
    Variant("torchao int8 dynamic, compiled", "ao-int8", compiled=True),
    Variant("ours W4A8, compiled", "w4a8", compiled=True),
    Variant("ours FP8 + qattn, compiled", "fp8", qattn=True, compiled=True),
    Variant("ours W8A8 + qattn, compiled", "w8a8", qattn=True, compiled=True),
    Variant("ours W4A8 + qattn, compiled", "w4a8", qattn=True, compiled=True),
    Variant("bf16 + qattn, compiled", qattn=True, compiled=True),
    Variant("ours W8A8", "w8a8"),
    Variant("ours W8A8 + qattn", "w8a8", qattn=True),
    Variant("ours W4A8", "w4a8"),
]


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


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once): the weights a deployment keeps resident."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def run_case(case: ModelCase, variants: list[Variant], device: torch.device, dtype: torch.dtype,
             warmup: int = 2, budget_s: float | None = None, log: Callable[[str], None] = print,
             min_attn_tokens: int = 1024, on_row: Callable[[list[Row]], None] | None = None,
             compile_backend: str = "inductor") -> list[Row]:
    """Time every variant on one case; a variant that fails or runs past the budget becomes an error row.

    `on_row(rows)` is called after every variant with the rows so far, so a caller can save a run that a
    time limit cuts short in the middle of a model (a compiled variant can take minutes).
    """
    t_start = time.time()
    base = build(case, device, dtype)
    x = inputs(case, device, dtype)
    ref = base(**x)[0].float()
    rows: list[Row] = []
    for v in variants:
        row = Row(case.name, v.name)
        rows.append(row)
        if budget_s is not None and time.time() - t_start > budget_s:
            row.error = "skipped: time budget exhausted"
            continue
        model = None
        try:
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = copy.deepcopy(base)
            if v.quant in ("w8a8", "fp8", "w4a8"):
                swap_ours(model, v.quant)
            elif v.quant in ("ao-int8", "ao-fp8"):
                swap_torchao(model, v.quant[3:])
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            row.weight_gib, row.weight_source = weight_bytes(model) / 2**30, "bytes"
            if v.compiled:
                compile_blocks(model, compile_backend)
            ctx = quantized_attention(min_attn_tokens) if v.qattn else contextlib.nullcontext()
            with ctx as patched, torch.inference_mode():  # patched: the SDPA wrapper (None without qattn)
                t0 = time.time()
                for _ in range(warmup):
                    out = model(**x)[0]
                _sync(device)
                log(f"  {v.name}: warm-up {time.time() - t0:.1f}s")
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                row.times_ms = _time(lambda: model(**x), case.iters, device)
                if device.type == "cuda":
                    row.peak_gib = torch.cuda.max_memory_allocated(device) / 2**30
                if v.qattn:
                    patched.reset()  # count the routed calls of one forward
                out = model(**x)[0].float()
                if v.qattn:
                    row.qattn_calls = patched.calls
                    if patched.calls == 0:
                        raise RuntimeError("no attention call was routed to the quantized kernel")
            if not torch.isfinite(out).all():
                raise FloatingPointError("output has NaN/inf")
            row.ms = statistics.median(row.times_ms)
            row.rel_err = float((out - ref).norm() / ref.norm())
            log(f"  {v.name}: {row.ms:.1f} ms, rel err {row.rel_err:.4f}")
        except Exception as exc:  # noqa: BLE001 - one failing variant must not lose the table
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            log(f"  {v.name}: FAILED {row.error}")
            if os.environ.get("WORKBENCH_BENCH_TRACEBACK"):
                traceback.print_exc()
        finally:
            del model
            torch._dynamo.reset()
        fill_speedups(rows)
        if on_row is not None:
            on_row(rows)
    del base, x, ref
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


def markdown(rows: list[Row]) -> str:
    """The end-to-end table (one row per model x variant)."""
    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    def x(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}x"

    lines = ["| model | variant | median ms | vs bf16 eager | vs bf16 compiled | peak GiB | weights GiB | rel. error vs bf16 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    dagger = False
    for r in rows:
        if r.error:
            lines.append(f"| {r.model} | {r.variant} | {r.error} | | | | | |")
            continue
        w = f(r.weight_gib, '.3f')
        if r.weight_gib is not None and r.weight_source != "bytes":
            w, dagger = w + " †", True
        lines.append(f"| {r.model} | {r.variant} | {f(r.ms, '.1f')} | {x(r.speedup_vs_eager)} | "
                     f"{x(r.speedup_vs_compiled)} | {f(r.peak_gib, '.2f')} | {w} | {f(r.rel_err, '.4f')} |")
    if dagger:
        lines += ["", "† weights measured as the CUDA allocator's growth when the variant was built (an earlier "
                  "version of the bench); it over-counts by up to 0.1 GiB. The other rows count parameter and buffer bytes."]
    return "\n".join(lines)


def split_names(text: str, known: list[str]) -> list[str]:
    """Split a comma-separated list of variant names, some of which contain commas (longest known name wins)."""
    tokens, out, i = text.split(","), [], 0
    while i < len(tokens):
        j = next((j for j in range(len(tokens), i, -1) if ",".join(tokens[i:j]).strip() in known), i + 1)
        out.append(",".join(tokens[i:j]).strip())
        i = j
    return [n for n in out if n]


def main(argv: list[str] | None = None, on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run-cpu", action="store_true", help="tiny configs on the CPU reference path")
    p.add_argument("--models", default=None, help="comma-separated substrings of case names to run")
    p.add_argument("--variants", default=None, help="comma-separated exact variant names (default: all)")
    p.add_argument("--budget", type=float, default=None, help="seconds per model after which variants are skipped")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for bench_e2e.{md,json}")
    a = p.parse_args(argv)
    dry = a.dry_run_cpu
    if not dry and not torch.cuda.is_available():
        raise SystemExit("the end-to-end benchmark needs a CUDA GPU; use --dry-run-cpu to check its logic on the CPU")
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = True
    variants = VARIANTS
    if a.variants:
        names = split_names(a.variants, [v.name for v in VARIANTS])
        unknown = [n for n in names if n not in {v.name for v in VARIANTS}]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; known: {[v.name for v in VARIANTS]}")
        by_name = {v.name: v for v in VARIANTS}
        variants = [by_name[n] for n in dict.fromkeys(names)]  # in the order asked (a time budget cuts the tail)
    if dry:  # torchao is a GPU matter; compiled variants trace with aot_eager (Dynamo + AOT, no codegen)
        variants = [v for v in variants if not (v.quant or "").startswith("ao-")]
    rows: list[Row] = []
    for case in cases(dry):
        if a.models and not any(m.strip() in case.name for m in a.models.split(",")):
            continue
        print(f"{case.name}: {case.tokens} tokens", flush=True)
        done = list(rows)
        rows += run_case(case, variants, device, dtype, budget_s=a.budget, min_attn_tokens=16 if dry else 1024,
                         compile_backend="aot_eager" if dry else "inductor",
                         on_row=None if on_row is None else (lambda part, done=done: on_row(done + part)))
    md = markdown(rows)
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
