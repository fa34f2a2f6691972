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

from workbench.models.generator import GenerationSettings


def first_call(model, prompt: str | None = None, seed: int = 0, settings: GenerationSettings | None = None):  # noqa: ANN001, ANN201
    """(args, kwargs) of the transformer's first call when `model` generates `prompt` (its first evaluation
    prompt by default) for one step: a real input of the model's own size, for any generator."""
    from workbench.stages.calibration import recording_calls

    prompt = prompt if prompt is not None else model.eval_prompts()[0]
    calls: list[tuple[tuple, dict]] = []

    def sink(args: tuple, kwargs: dict) -> None:
        if not calls:
            calls.append((args, kwargs))

    s = GenerationSettings(steps=1) if settings is None else settings
    with recording_calls(model.transformer, sink):
        model.generate([prompt], [seed], s)
    return calls[0]


@torch.no_grad()
def forward_seconds(model, transformer: torch.nn.Module, repeats: int = 3, seed: int = 0,  # noqa: ANN001
                    call=None) -> float:  # noqa: ANN001
    """Median seconds of one transformer call on a recorded input of the model (one sampling step's call:
    with classifier-free guidance batched, a prompt and its null prompt)."""
    args, kwargs = call if call is not None else first_call(model, seed=seed)
    transformer(*args, **kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        transformer(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def video_seconds(model, transformer: torch.nn.Module, steps: int = 8, repeats: int = 1, seed: int = 0) -> float:  # noqa: ANN001
    """Median seconds to generate one video (`steps` sampling steps, the model's guidance) with `transformer`."""
    prompt = model.eval_prompts()[0]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.generate([prompt], [seed], GenerationSettings(steps=steps), transformer=transformer)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_table(model, transformers: dict[str, torch.nn.Module], steps: int = 8, repeats: int = 3) -> list[dict]:
    """One row per transformer: ms per forward (one sampling step's call), seconds per video, both relative to
    the first row."""
    rows = []
    call = first_call(model)
    for label, tr in transformers.items():
        fwd = forward_seconds(model, tr, repeats=repeats, call=call)
        vid = video_seconds(model, tr, steps=steps)
        rows.append({"model": label, "forward_ms": 1000 * fwd, "video_s": vid, "threads": torch.get_num_threads()})
    base = rows[0] if rows else None
    for r in rows:
        r["forward_vs_first"] = r["forward_ms"] / base["forward_ms"]
        r["video_vs_first"] = r["video_s"] / base["video_s"]
    return rows
