"""Wall-clock timing of transformers on this machine: one sampling step's forward and one whole video.

    from workbench.eval.timing import speed_table
    rows = speed_table(model, {"FP": model.transformer, "W4A8 packed": packed}, steps=8)

On a CPU this measures the *reference* path: fake quantization and the kernels' pure-torch references
do more arithmetic than FP (they quantize activations, then multiply in float), so they are slower
than FP here; that is expected. The speed-ups come from the Triton kernels on a GPU (`workbench bench`).
Timings are medians over `repeats` runs after one warm-up, on the same seeded input for every model.
"""
from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def forward_seconds(model, transformer: torch.nn.Module, batch: int = 2, repeats: int = 3, seed: int = 0) -> float:
    """Median seconds of one transformer call on `batch` seeded latents of the model's video size
    (batch 2 = one prompt with classifier-free guidance: what one sampling step costs)."""
    from workbench.models.sampler import initial_noise
    from workbench.models.tiny_dit import with_time_channel

    x = with_time_channel(initial_noise([seed + i for i in range(batch)], model.world),
                          int(transformer.config.in_channels))
    emb = model.text_encoder.encode(["a red circle moving left"] * batch)
    t = torch.full((batch,), 500.0)
    transformer(x, t, emb, return_dict=False)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        transformer(x, t, emb, return_dict=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def video_seconds(model, transformer: torch.nn.Module, steps: int = 8, repeats: int = 1, seed: int = 0) -> float:
    """Median seconds to generate one video (`steps` sampling steps with guidance) with `transformer`."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate_many(["a red circle moving left"], [seed], steps, transformer=transformer)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_table(model, transformers: dict[str, torch.nn.Module], steps: int = 8, repeats: int = 3) -> list[dict]:
    """One row per transformer: ms per forward (batch 2), seconds per video, both relative to the first row."""
    rows = []
    for label, tr in transformers.items():
        fwd = forward_seconds(model, tr, repeats=repeats)
        vid = video_seconds(model, tr, steps=steps)
        rows.append({"model": label, "forward_ms": 1000 * fwd, "video_s": vid, "threads": torch.get_num_threads()})
    base = rows[0] if rows else None
    for r in rows:
        r["forward_vs_first"] = r["forward_ms"] / base["forward_ms"]
        r["video_vs_first"] = r["video_s"] / base["video_s"]
    return rows
