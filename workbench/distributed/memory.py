"""What block-wise distillation of a model needs per GPU at N ranks (the README's "Several GPUs" table).

    python -m workbench.distributed.memory              # Wan2.1-T2V-14B, 81 frames at 480 x 832, a batch of 8 rows

Per GPU, in bytes, while a block trains (the peak), with the models in bf16 on every GPU (`--device cuda`;
P: parameters, b = 2 bytes per value, T: trainable values of a block, B: rows of a step, S: tokens per row):

    resident   2 b (P_transformer) + b (P_text_encoder + P_vae)     FP and quantized transformer, the sampler's parts
    block      b P_block (1 / N + 1)                               the FSDP2-sharded student block copy, plus its
                                                                   gathered parameters while it runs (the sharded
                                                                   teacher copy lives only while it makes the
                                                                   targets, before training, with no activations)
    trainable  16 T / N + 8 T                                      fp32 value, gradient and AdamW's two moments,
                                                                   sharded; value and gradient gathered in backward
    weights    c0                                                  what autograd keeps of the fake-quantized weights
                                                                   of the block for one forward (not sharded)
    rows       ceil(B / N) S a                                     activations of this rank's rows of the step
    loss       B S l                                               every rank computes the whole batch's loss on the
                                                                   gathered outputs

`c0`, `a` (bytes per token of the block's saved activations) and `l` (of the loss) are measured here on the
CPU: a real block of the model's config is quantized (W4A6: int4 weights per channel with learnable scales,
dynamic per-token uint6 activations), run forward with 64 and 128 tokens under flash attention while
`torch.autograd.graph.saved_tensors_hooks` counts every tensor autograd keeps, and the two counts give the
constant and the per-token part. Everything else is computed from parameter counts of the config (built on the
meta device). Not counted: the CUDA context and allocator slack (a few GB), the calibration cache and block
targets (kept in host memory), and recipe extras that store one value per weight (MPQ-DMv2's binary residual
keeps an int8 sign per weight of the quantized model: +1 byte per parameter).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch

W4A6 = {"weight": {"format": "int4", "granularity": "channel"},
        "act": {"format": "uint6", "granularity": "token", "dynamic": True}}


@dataclass(frozen=True)
class Footprint:
    """The measured and counted quantities of the formula (module docstring)."""

    transformer: int  # parameters
    block: int
    text_encoder: int
    vae: int
    trainable: int  # trainable values of one block (learnable weight scales)
    weights_bytes: int  # c0
    bytes_per_token: float  # a
    loss_bytes_per_token: float  # l
    dtype_bytes: int = 2


def wan14b_counts() -> dict[str, int]:
    """Parameter counts of Wan2.1-T2V-14B: transformer, one block, text encoder (umT5-XXL), VAE."""
    from workbench.models.random_pipelines import count_parameters, wan_14b_transformer_config

    cfg = wan_14b_transformer_config()
    one = count_parameters("wan", config={**cfg, "num_layers": 1})
    two = count_parameters("wan", config={**cfg, "num_layers": 2})
    return {"transformer": count_parameters("wan", config=cfg), "block": two - one,
            "text_encoder": count_parameters("wan", size="full", component="text_encoder"),
            "vae": count_parameters("wan", size="full", component="vae")}


def _saved_bytes(fn) -> int:  # noqa: ANN001
    """Bytes of the distinct storages autograd keeps for backward while `fn()` runs."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(kept.values())


def measure_block(config: dict[str, Any], quant: dict[str, Any] = W4A6, dtype: torch.dtype = torch.bfloat16,
                  sizes: tuple[tuple[int, int], tuple[int, int]] = ((16, 16), (16, 32)), text_tokens: int = 512,
                  seed: int = 0) -> tuple[int, int, float, float]:
    """(trainable values, c0, a, l) of block 0 of a WanTransformer3DModel `config` (module docstring); the two
    `sizes` are latent (height, width) of one frame, i.e. config's patch area times the token counts."""
    from diffusers import WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from workbench.quant import QuantConfig, quantize_model
    from workbench.stages.distill import DistillSettings
    from workbench.stages.distill.loop import trainable_names
    from workbench.stages.distill.losses import weighted_rel_mse

    with torch.device("meta"):
        model = WanTransformer3DModel(**{**config, "num_layers": 1})
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model = model.to(dtype)
    quantize_model(model, QuantConfig.from_dict(quant))
    block = model.blocks[0]
    names = trainable_names(block, DistillSettings(train=["scales"]))
    for n, p in block.named_parameters():
        p.requires_grad_(n in names)
    trainable = sum(p.numel() for n, p in block.named_parameters() if n in names)

    counts = []
    for h, w in sizes:
        call: dict[str, Any] = {}

        def stop(module, args, kwargs):  # noqa: ANN001
            call.update(args=args, kwargs=kwargs)
            raise StopIteration

        handle = block.register_forward_pre_hook(stop, with_kwargs=True)
        x = torch.randn(1, config["in_channels"], 1, h, w, generator=g).to(dtype)
        text = torch.randn(1, text_tokens, config["text_dim"], generator=g).to(dtype)
        try:
            model(x, torch.tensor([500]), text, return_dict=False)
        except StopIteration:
            pass
        finally:
            handle.remove()
        tokens = call["args"][0].shape[1]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            block_bytes = _saved_bytes(lambda: block(*call["args"], **call["kwargs"]))
        pred = torch.randn(1, tokens, config["num_attention_heads"] * config["attention_head_dim"],
                           generator=g).to(dtype).requires_grad_(True)
        target = torch.randn(pred.shape, generator=g).to(dtype)
        loss_bytes = _saved_bytes(lambda: weighted_rel_mse(pred, target)) + 2 * pred.numel() * pred.element_size()
        counts.append((tokens, block_bytes, loss_bytes))
    (s1, b1, l1), (s2, b2, l2) = counts
    a = (b2 - b1) / (s2 - s1)
    return trainable, int(b1 - a * s1), a, (l2 - l1) / (s2 - s1)


def wan14b_footprint() -> Footprint:
    """The Footprint of Wan2.1-T2V-14B under W4A6 block-wise distillation (measured; takes ~1 minute)."""
    from workbench.models.random_pipelines import wan_14b_transformer_config

    counts = wan14b_counts()
    trainable, c0, a, loss = measure_block(wan_14b_transformer_config())
    return Footprint(counts["transformer"], counts["block"], counts["text_encoder"], counts["vae"], trainable, c0, a,
                     loss)


def per_gpu(f: Footprint, ranks: int, tokens: int, batch: int) -> dict[str, float]:
    """Bytes per GPU of each term of the formula and their total, at `ranks` ranks (module docstring)."""
    b = f.dtype_bytes
    parts = {
        "resident": b * (2 * f.transformer + f.text_encoder + f.vae),
        "block": b * f.block * (1 / ranks + 1),
        "trainable": 16 * f.trainable / ranks + 8 * f.trainable,
        "weights": f.weights_bytes,
        "rows": math.ceil(batch / ranks) * tokens * f.bytes_per_token,
        "loss": batch * tokens * f.loss_bytes_per_token,
    }
    return {**parts, "total": sum(parts.values())}


def wan_tokens(frames: int = 81, height: int = 480, width: int = 832) -> int:
    """Tokens of one Wan2.1 video: VAE 4x temporal / 8x spatial compression, patches of 1 x 2 x 2."""
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)


def table(f: Footprint, ranks: Iterable[int] = (1, 2, 4, 8), tokens: int | None = None, batch: int = 8) -> str:
    """The markdown table of per-GPU GiB at each rank count."""
    tokens = wan_tokens() if tokens is None else tokens
    gib = 2**30
    rows = ["| N | resident models | block (sharded + gathered) | trainable + AdamW | fake-quant weights | "
            "activations (rows/rank) | whole-batch loss | **total** |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in ranks:
        p = per_gpu(f, n, tokens, batch)
        rows.append(f"| {n} | {p['resident'] / gib:.1f} | {p['block'] / gib:.2f} | {p['trainable'] / gib:.3f} | "
                    f"{p['weights'] / gib:.1f} | {p['rows'] / gib:.1f} ({math.ceil(batch / n)}) | "
                    f"{p['loss'] / gib:.1f} | **{p['total'] / gib:.0f}** |")
    return "\n".join(rows)


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    f = wan14b_footprint()
    print("Footprint:", {k: (round(v, 1) if isinstance(v, float) else v) for k, v in asdict(f).items()})
    print(f"tokens per video (81 frames, 480 x 832): {wan_tokens()}; global batch 8 rows\n")
    print(table(f))


if __name__ == "__main__":
    main()
