"""Train the bundled tiny text-to-video model on the procedural world (rectified flow, as Wan).

    python -m workbench.models.train --steps 6000 --batch 256 --seed 0 --device cuda --out runs/tiny-world

The shipped weights came from four such runs chained with `--init` (README.md lists the commands);
`--init` also inflates 1-frame-patch RGB weights to the 2-frame-patch 6-channel model (`widen_input`).

Reproducible from `--seed` (data, init and noise all come from seeded generators). `--minutes`
caps the run: after 120 steps (100 timed) the step count is fixed to fit it and logged, so the logged
`--steps` reproduces the run. Writes the bundled layout plus `train_log.json` (loss curve, timings,
held-out oracle accuracy when the metrics package is present).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from workbench.models.generator import GenerationSettings
from workbench.models.bundled import TinyWorldModel
from workbench.models.text_encoder import TextEncoder, tokenize
from workbench.models.tiny_dit import SCHEDULER_CONFIG, build_transformer, with_coordinate_channels
from workbench.world.grammar import heldout_scenes, training_scenes
from workbench.world.render import WorldConfig, render, sample_starts


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--minutes", type=float, default=None, help="cap the wall time; fixes --steps after 50 steps")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--per-scene", type=int, default=384, help="pre-rendered start positions per training scene")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-dropout", type=float, default=0.1)
    p.add_argument("--sigma-shift", type=float, default=1.0,
                   help="flow shift applied to training noise levels (s*sig/(1+(s-1)*sig)); >1 trains more at high noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--eval-steps", type=int, default=16)
    p.add_argument("--eval-seeds", type=int, default=4)
    p.add_argument("--in-channels", type=int, default=None, choices=[3, 4, 6],
                   help="RGB, + frame ramp, or + frame/row/column ramps (default: the bundled config)")
    p.add_argument("--patch-t", type=int, default=None, help="temporal patch size (default: the bundled config's)")
    p.add_argument("--init", default=None, help="start from the weights of a bundled-layout directory (resume/fine-tune)")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def widen_input(transformer, in_channels: int, patch_t: int | None = None):
    """A copy of `transformer` taking `in_channels` inputs and, optionally, a longer temporal patch.

    New input channels start with zero weights (the wider model computes what the old one did until
    training teaches it to use them). A temporal patch of `patch_t` frames is inflated as in I3D:
    the patch embedding splits each old kernel evenly over the frames of the new patch and the output
    projection repeats the old per-frame output for every frame, so the start is the old model run on
    frame-pair averages and everything past the embeddings (attention, FFN, text) carries over.
    """
    old_c = transformer.config.in_channels
    old_pt = transformer.config.patch_size[0]
    patch_t = patch_t or old_pt
    if old_c == in_channels and old_pt == patch_t:
        return transformer
    if in_channels < old_c:
        raise ValueError(f"cannot narrow the input from {old_c} to {in_channels} channels")
    if patch_t % old_pt:
        raise ValueError(f"temporal patch {patch_t} is not a multiple of the old patch {old_pt}")
    rep = patch_t // old_pt
    cfg = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
    cfg["in_channels"] = in_channels
    cfg["patch_size"] = (patch_t, *transformer.config.patch_size[1:])
    wide = type(transformer)(**cfg)
    state = transformer.state_dict()
    w = state["patch_embedding.weight"]  # (d, in, kt, kh, kw)
    pad = torch.zeros(w.shape[0], in_channels - old_c, *w.shape[2:], dtype=w.dtype)
    state["patch_embedding.weight"] = torch.cat([w, pad], dim=1).repeat(1, 1, rep, 1, 1) / rep
    if rep > 1:
        # proj_out rows are ordered (p_t, p_h, p_w, out_channels): repeat the old block over time.
        pw, pb = state["proj_out.weight"], state["proj_out.bias"]
        blk = pw.shape[0] // old_pt
        state["proj_out.weight"] = pw.view(old_pt, blk, -1).repeat_interleave(rep, dim=0).reshape(-1, pw.shape[1])
        state["proj_out.bias"] = pb.view(old_pt, blk).repeat_interleave(rep, dim=0).reshape(-1)
    wide.load_state_dict(state)
    return wide


def sample_sigmas(n: int, g: torch.Generator) -> torch.Tensor:
    """Noise levels: logit-normal (SD3/Wan practice) mixed with 20% uniform to cover the ends."""
    ln = torch.sigmoid(torch.randn(n, generator=g))
    un = torch.rand(n, generator=g)
    pick = torch.rand(n, generator=g) < 0.2
    return torch.where(pick, un, ln).clamp(1e-3, 1.0)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def evaluate(model: TinyWorldModel, steps: int, seeds_per_prompt: int) -> dict:
    """Held-out and seen-scene oracle accuracy of a model (needs workbench.metrics)."""
    try:
        from workbench.metrics.oracle import oracle_scores
    except ImportError:
        return {"note": "workbench.metrics not available; no oracle evaluation"}
    out = {}
    seen = training_scenes()[:: max(1, len(training_scenes()) // 16)][:16]
    for split, scenes in (("heldout", heldout_scenes()), ("seen", seen)):
        sc = [s for s in scenes for _ in range(seeds_per_prompt)]
        seeds = [1000 + i for i in range(len(sc))]
        videos = model.generate([s.prompt for s in sc], seeds, GenerationSettings(steps=steps)).cpu()
        r = oracle_scores(videos, sc)
        out[split] = {"oracle_accuracy": float(r.oracle_accuracy), "exact_match": float(r.exact_match),
                      "per_attribute": {k: float(v) for k, v in r.per_attribute.items()}}
    return out


FLIP = {"left": "right", "right": "left", "up": "down", "down": "up"}


@torch.no_grad()
def direction_sign_gap(transformer, text_encoder, x0, scene_list, sigma: float, seed: int = 0) -> float:
    """Relative loss increase when the prompt names the opposite direction (0 = the model ignores the sign).

    A model that learned motion only up to its sign scores the same loss for 'left' and 'right';
    this is the number to watch while training (it was ~0 for the first bundled weights).
    """
    from dataclasses import replace

    dev = x0.device
    g = torch.Generator(device=dev).manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g, device=dev)
    sig = torch.full((x0.shape[0],), sigma, device=dev)
    xt = (1 - sigma) * x0 + sigma * noise
    losses = []
    for scenes in (scene_list, [replace(s, direction=FLIP[s.direction]) for s in scene_list]):
        ids = tokenize([s.prompt for s in scenes]).to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = transformer(with_coordinate_channels(xt, transformer.config.in_channels), sig * 1000,
                               text_encoder(ids), return_dict=False)[0]
        losses.append(F.mse_loss(pred.float(), noise - x0))
    return float((losses[1] - losses[0]) / losses[0])


def main(argv=None) -> dict:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    dev = torch.device(a.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    world = WorldConfig()
    overrides = {}
    if a.in_channels:
        overrides["in_channels"] = a.in_channels
    if a.patch_t:
        overrides["patch_size"] = (a.patch_t, 4, 4)
    transformer = build_transformer(**overrides).to(dev)
    text_encoder = TextEncoder().to(dev)
    if a.init:
        from workbench.models.bundled import load_from_dir

        start = load_from_dir(a.init)
        transformer = widen_input(start.transformer, transformer.config.in_channels,
                                  transformer.config.patch_size[0]).to(dev).train()
        text_encoder.load_state_dict(start.text_encoder.state_dict())
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_t, ema_e = copy.deepcopy(transformer).eval(), copy.deepcopy(text_encoder).eval()
    g = torch.Generator().manual_seed(a.seed)
    gd = torch.Generator(device=dev).manual_seed(a.seed)
    scenes = training_scenes()
    # Pre-render the training set once (uint8 on the device): the step loop then only indexes it.
    t_data = time.time()
    clips, labels = [], []
    for i in range(0, len(scenes) * a.per_scene, 2048):
        idx = [j % len(scenes) for j in range(i, min(i + 2048, len(scenes) * a.per_scene))]
        chunk = [scenes[j] for j in idx]
        starts = sample_starts(chunk, g, world)
        clips.append((render(chunk, starts, world, device=dev) * 255).round().to(torch.uint8))
        labels.append(torch.tensor(idx))
    data, labels = torch.cat(clips), torch.cat(labels).to(dev)
    scene_ids = tokenize([s.prompt for s in scenes]).to(dev)
    null_ids = tokenize([""]).to(dev)
    print(f"rendered {len(data)} clips in {time.time() - t_data:.1f}s", flush=True)
    probe = torch.arange(0, len(data), max(1, len(data) // 128), device=dev)[:128]
    probe_x0 = data[probe].float() / 127.5 - 1
    probe_scenes = [scenes[int(i)] for i in labels[probe].cpu()]

    total = a.steps
    log = {"args": vars(a), "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
           "params_transformer": sum(p.numel() for p in transformer.parameters()),
           "params_text_encoder": sum(p.numel() for p in text_encoder.parameters()), "loss": [], "sign_gap": []}
    t0 = time.time()
    running = 0.0
    step = 0
    while step < total:
        pick = torch.randint(len(data), (a.batch,), generator=gd, device=dev)
        x0 = data[pick].float() / 127.5 - 1
        drop = torch.rand(a.batch, generator=gd, device=dev) < a.cond_dropout
        ids = torch.where(drop[:, None], null_ids, scene_ids[labels[pick]])
        noise = torch.randn(x0.shape, generator=gd, device=dev)
        sig = sample_sigmas(a.batch, g).to(dev)
        sig = a.sigma_shift * sig / (1 + (a.sigma_shift - 1) * sig)
        xt = (1 - sig)[:, None, None, None, None] * x0 + sig[:, None, None, None, None] * noise
        target = noise - x0
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, total, a.warmup, a.lr)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            emb = text_encoder(ids)
            pred = transformer(with_coordinate_channels(xt, transformer.config.in_channels), sig * 1000, emb, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(a.ema, (1 + step) / (10 + step))
            for m, e in ((transformer, ema_t), (text_encoder, ema_e)):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - d)
        running += loss.detach()
        step += 1
        if step == 20:
            t20 = time.time()
        if step == 120 and a.minutes is not None:
            per = (time.time() - t20) / 100
            total = min(total, int((a.minutes * 60 - (time.time() - t0)) / per) + step)
            log["steps_fixed_by_time_cap"] = total
            print(f"{per * 1000:.1f} ms/step -> {total} steps fit {a.minutes} min", flush=True)
        if step % 100 == 0 or step == total:
            n = 100 if step % 100 == 0 else step % 100
            running = float(running)
            log["loss"].append([step, running / n])
            print(f"step {step}/{total} loss {running / n:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
            running = 0.0
        if step % 500 == 0 or step == total:
            gaps = [direction_sign_gap(transformer, text_encoder, probe_x0, probe_scenes, sg) for sg in (0.8, 0.95)]
            transformer.train(), text_encoder.train()
            log["sign_gap"].append([step, *gaps])
            print(f"step {step} direction sign gap (sigma 0.8, 0.95): {gaps[0]:+.3f} {gaps[1]:+.3f}", flush=True)
    log["steps"] = total
    log["train_seconds"] = time.time() - t0
    model = TinyWorldModel(ema_t.float(), ema_e.float(), dict(SCHEDULER_CONFIG), world)
    out = Path(a.out)
    model.save(out)
    t1 = time.time()
    try:
        log["eval"] = evaluate(model, a.eval_steps, a.eval_seeds)
    except Exception as e:  # noqa: BLE001 - the weights are saved; the evaluation can be rerun
        log["eval"] = {"error": f"{type(e).__name__}: {e}"}
    log["eval_seconds"] = time.time() - t1
    (out / "train_log.json").write_text(json.dumps(log, indent=2))
    print(json.dumps({k: v for k, v in log.items() if k != "loss"}, indent=2))
    return log


if __name__ == "__main__":
    main()
