"""Calibration data: full-precision sampling trajectories whose transformer calls later stages replay.

`collect_calibration(session, settings)` samples videos for a prompt set drawn from the training
scenes (`workbench.world.grammar.training_scenes()`, never the held-out evaluation prompts) with the
FP model, and stores, per sampling step, the exact inputs of the transformer call: the latents (with
the time channel), the timestep and the text embeddings (conditional and, with guidance, the null
prompt's). `CalibrationCache.replay(transformer)` feeds them to any transformer, so range
calibration, channel balancing and error analysis all see the inputs the FP model sees on its way
from noise to video.

Memory: the cache holds `n_prompts x 2 (guidance) x steps` latents of C x F x H x W float32 values plus
text embeddings; the bundled model needs about 0.26 MB per prompt and step (8 prompts x 8 steps = 17 MB).
`max_mb` bounds it: when the planned cache would exceed it, fewer, evenly spaced steps are kept
(reported in the stage summary as `kept_steps`). Optional per-layer input activations
(`layer_inputs=True`) keep at most `layer_rows` random token rows per layer (all steps together), so
they cost `layer_rows x in_features x 4` bytes per layer and also count against `max_mb`.

Several ranks (torchrun, `workbench.distributed`): the sampling batches (`batch_size` prompts each, the very
batches one process makes, with the same per-prompt seeds) are dealt round-robin to the ranks; each rank writes
its recorded calls to the shared spill folder, and every rank then assembles the same cache in the one-process
order, keeping in memory what one process would keep. The cache therefore equals the one-process cache bit for
bit (sampling a prompt in another batch would change it by float noise). With fewer batches than ranks some
ranks have nothing to sample: lower `batch_size` to spread the prompts.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from workbench import distributed
from workbench.models.generator import GenerationSettings
from workbench.session import Session

SPILL_FINGERPRINT = "calibration-entry"
from workbench.stages.registry import stage
from workbench.stages.report import StageReport
from workbench.viz.stage_figures import calibration_figures


# ----------------------------------------------------------------------------------------------------
# the cache


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(v) for v in x)
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu").clone()
    if isinstance(x, tuple):
        return tuple(_to_cpu(v) for v in x)
    if isinstance(x, list):
        return [_to_cpu(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x


def to_device(x: Any, device: torch.device) -> Any:
    """Every tensor in nested tuples / lists / dicts moved to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(to_device(v, device) for v in x)
    if isinstance(x, list):
        return [to_device(v, device) for v in x]
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    return x


def _rows(x: Any, batch: int, idx: torch.Tensor) -> Any:
    """x with its batch dimension (dim 0 of size `batch`) reduced to rows `idx`; other values unchanged."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch:
        return x[idx]
    if isinstance(x, tuple):
        return tuple(_rows(v, batch, idx) for v in x)
    if isinstance(x, list):
        return [_rows(v, batch, idx) for v in x]
    if isinstance(x, dict):
        return {k: _rows(v, batch, idx) for k, v in x.items()}
    return x


@dataclass
class CalibrationEntry:
    """One recorded transformer call: positional args and kwargs exactly as the sampler passed them.

    A spilled entry (`path` set) keeps its tensors in `<path>.safetensors` + `<path>.json` and reads them
    back each time `args` / `kwargs` are used, so a cache larger than memory costs disk, not RAM."""

    step: int  # sampling step index within its trajectory
    timestep: float
    _args: tuple | None
    _kwargs: dict | None
    batch: int  # rows in the call (prompts x 2 with classifier-free guidance batched into one call)
    prompt_ids: list[int] | None = None  # row -> index into the cache's prompts (None: unknown)
    path: str | None = None  # where a spilled entry's tensors are (None: in memory)

    @property
    def args(self) -> tuple:
        return self._args if self.path is None else self._load()[0]

    @property
    def kwargs(self) -> dict:
        return self._kwargs if self.path is None else self._load()[1]

    def _load(self) -> tuple[tuple, dict]:
        from workbench.io.checkpoint import load_checkpoint

        saved = load_checkpoint(Path(self.path), SPILL_FINGERPRINT)
        if saved is None:
            raise FileNotFoundError(f"spilled calibration entry {self.path}.json is gone; collect calibration again")
        return tuple(saved["args"]), dict(saved["kwargs"])

    def in_memory(self) -> CalibrationEntry:
        """This call with its tensors in memory (a spilled entry is read back once)."""
        if self.path is None:
            return self
        args, kwargs = self._load()
        return CalibrationEntry(self.step, self.timestep, args, kwargs, self.batch, self.prompt_ids)

    def spill(self, path: Path) -> CalibrationEntry:
        """Write the tensors to `path` (.safetensors + .json) and keep only the reference in memory."""
        from workbench.io.checkpoint import save_checkpoint

        if self.path is None:
            save_checkpoint(path, SPILL_FINGERPRINT, {"args": self._args, "kwargs": self._kwargs})
            self._args, self._kwargs, self.path = None, None, str(path)
        return self

    @property
    def nbytes(self) -> int:
        """Bytes this entry holds in memory (0 once spilled)."""
        return 0 if self.path is not None else _nbytes(self._args) + _nbytes(self._kwargs)

    @property
    def disk_bytes(self) -> int:
        """Bytes of a spilled entry's tensor file (0 in memory)."""
        return 0 if self.path is None else Path(self.path).with_suffix(".safetensors").stat().st_size

    def rows(self, n: int | None) -> CalibrationEntry:
        """This call restricted to n rows spread evenly over the batch (None or >= batch: all rows).

        With guidance the batch is [conditional..., unconditional...], so two rows give one of each.
        """
        if n is None or n >= self.batch:
            return self
        return self.take(torch.linspace(0, self.batch - 1, n).round().long().unique())

    def take(self, idx: torch.Tensor) -> CalibrationEntry:
        """This call restricted to rows `idx` (in that order)."""
        ids = None if self.prompt_ids is None else [self.prompt_ids[int(i)] for i in idx]
        return CalibrationEntry(self.step, self.timestep, _rows(self.args, self.batch, idx),
                                _rows(self.kwargs, self.batch, idx), int(idx.numel()), ids)


@dataclass
class CalibrationCache:
    """Recorded transformer inputs along FP sampling trajectories (see module docstring)."""

    entries: list[CalibrationEntry] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    steps: int = 0
    guidance: float = 0.0
    layer_inputs: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> (rows, in_features)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (spilled entries count 0; see `disk_bytes`)."""
        return sum(e.nbytes for e in self.entries) + _nbytes(self.layer_inputs)

    @property
    def disk_bytes(self) -> int:
        return sum(e.disk_bytes for e in self.entries)

    @property
    def timesteps(self) -> list[float]:
        """Distinct recorded timesteps, largest (noisiest) first."""
        return sorted({e.timestep for e in self.entries}, reverse=True)

    def select(self, n: int | None = None, rows: int | None = None) -> list[CalibrationEntry]:
        """n entries spread evenly over the recorded timesteps (None: all), each cut to `rows` rows."""
        entries = sorted(self.entries, key=lambda e: (-e.timestep, e.step))
        if n is not None and n < len(entries):
            idx = torch.linspace(0, len(entries) - 1, n).round().long().unique().tolist()
            entries = [entries[i] for i in idx]
        return [e.rows(rows) for e in entries]

    @torch.no_grad()
    def replay(
        self,
        transformer: nn.Module,
        entries: list[CalibrationEntry] | None = None,
        progress: bool = False,
        desc: str = "replaying calibration",
    ) -> list[torch.Tensor]:
        """Run `transformer` on the recorded inputs; returns its first output per entry (on the CPU)."""
        entries = self.entries if entries is None else entries
        device = next(transformer.parameters()).device
        outs = []
        for e in tqdm(entries, desc=desc, disable=not progress, leave=False):
            out = transformer(*to_device(e.args, device), **to_device(e.kwargs, device))
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            outs.append(out.detach().float().cpu())
        return outs

    def to_tree(self) -> dict[str, Any]:
        """The cache as nested plain data and tensors (what `workbench.io.checkpoint.pack` stores)."""
        return {"entries": [{"step": e.step, "timestep": e.timestep, "batch": e.batch, "prompt_ids": e.prompt_ids,
                             **({"path": e.path} if e.path is not None else {"args": e.args, "kwargs": e.kwargs})}
                            for e in self.entries],
                "prompts": list(self.prompts), "seeds": list(self.seeds), "steps": self.steps,
                "guidance": self.guidance, "layer_inputs": dict(self.layer_inputs)}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> CalibrationCache:
        """Inverse of `to_tree`."""
        entries = [CalibrationEntry(int(e["step"]), float(e["timestep"]), None if "path" in e else tuple(e["args"]),
                                    None if "path" in e else dict(e["kwargs"]), int(e["batch"]), e.get("prompt_ids"),
                                    e.get("path")) for e in tree["entries"]]
        return cls(entries, list(tree["prompts"]), [int(x) for x in tree["seeds"]], int(tree["steps"]),
                   float(tree["guidance"]), dict(tree["layer_inputs"]))

    def runner(self, transformer: nn.Module, entries: list[CalibrationEntry] | None = None) -> Callable[[], None]:
        """A no-argument function replaying the cache through `transformer` (for `calibrate_model`)."""
        return lambda: self.replay(transformer, entries)

    def __repr__(self) -> str:
        spilled = f" + {self.disk_bytes / 2**20:.1f} MB on disk" if self.disk_bytes else ""
        return (f"CalibrationCache({len(self.prompts)} prompts, {len(self.entries)} calls, "
                f"{len(self.timesteps)} timesteps, {self.nbytes / 2**20:.1f} MB{spilled}"
                + (f", layer inputs of {len(self.layer_inputs)} layers" if self.layer_inputs else "") + ")")


# ----------------------------------------------------------------------------------------------------
# hooks


@contextmanager
def recording_calls(transformer: nn.Module, sink: Callable[[tuple, dict], None]) -> Iterator[None]:
    """Call `sink(args, kwargs)` with every forward call's inputs of `transformer` while the block runs."""

    def hook(module, args, kwargs):  # noqa: ANN001
        sink(args, kwargs)

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capturing_inputs(model: nn.Module, names: list[str], fn: Callable[[str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Call `fn(name, input, output)` for every forward of the named submodules while the block runs."""
    handles = []
    for name in names:
        module = model.get_submodule(name)

        def hook(mod, args, output, name=name):  # noqa: ANN001
            fn(name, args[0], output)

        handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------
# prompts


def calibration_prompts(model, n: int, seed: int = 0) -> list[str]:  # noqa: ANN001
    """n calibration prompts of the model (`Generator.calibration_prompts`: disjoint from its evaluation set)."""
    return model.calibration_prompts(n, seed)


def _check_prompts(model, prompts: list[str]) -> None:  # noqa: ANN001
    model.check_prompts(prompts)
    held = set(model.eval_prompts())
    bad = [p for p in prompts if p in held or _scene_key(model, p) in {_scene_key(model, h) for h in held}]
    if bad:
        raise ValueError(
            f"calibration prompts must not come from the held-out evaluation set; {bad[0][:80]!r} is held out. "
            "Leave prompt_list unset (the model's calibration prompts) or pass prompts of your own")


def _scene_key(model, prompt: str):  # noqa: ANN001, ANN202
    """What makes two prompts the same for the model: its oracle's scene when it has one, else the text."""
    scenes = model.oracle_scenes([prompt])
    return scenes[0] if scenes else prompt


# ----------------------------------------------------------------------------------------------------
# the stage


@dataclass
class CalibrationSettings:
    """Which trajectories to record.

    prompts: number of the model's calibration prompts (ignored when `prompt_list` is given).
    prompt_list: explicit prompts (must not be held-out ones).
    steps / guidance: sampler settings of the trajectories (None: the model's defaults).
    frames / height / width: video size of the trajectories (None: what the model was made for).
    batch_size: prompts per sampling call.
    max_mb: memory bound of the cache (see module docstring).
    spill: what happens past max_mb: True writes further calls to `spill_dir` (read back when replayed: a
        cache larger than memory costs disk), False keeps fewer, evenly spaced steps.
    spill_dir: folder of spilled calls (None: a temporary folder; a resumable run uses its checkpoint folder).
    layer_inputs: also keep a bounded sample of every quantizable linear layer's input activations.
    layer_rows: rows (tokens) kept per layer when layer_inputs is set.
    seed_offset: trajectory i starts from noise seed `session.seed + seed_offset + i` (the held-out
        evaluation uses seeds 0..N-1, so the default keeps them apart).
    """

    prompts: int = 8
    prompt_list: list[str] | None = None
    steps: int | None = 8
    guidance: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    batch_size: int = 8
    max_mb: float = 256.0
    spill: bool = True
    spill_dir: str | None = None
    layer_inputs: bool = False
    layer_rows: int = 1024
    seed_offset: int = 10_000

    def __post_init__(self) -> None:
        if self.prompt_list is None and self.prompts < 1:
            raise ValueError(f"prompts must be >= 1, got {self.prompts}")
        self.generation()  # steps / guidance / sizes checked by GenerationSettings
        if self.max_mb <= 0:
            raise ValueError(f"max_mb must be > 0, got {self.max_mb}")
        if self.batch_size < 1 or self.layer_rows < 1:
            raise ValueError("batch_size and layer_rows must be >= 1")


    def generation(self) -> GenerationSettings:
        """The sampler settings of the trajectories (None fields: the model's defaults)."""
        return GenerationSettings(steps=self.steps, guidance=self.guidance, frames=self.frames, height=self.height,
                                  width=self.width)


def _kept_steps(steps: int, keep: int) -> set[int]:
    if keep >= steps:
        return set(range(steps))
    return set(torch.linspace(0, steps - 1, keep).round().long().tolist())


@stage(CalibrationSettings, figures=calibration_figures)
def collect_calibration(session: Session, settings: CalibrationSettings | None = None) -> StageReport:
    """Record FP sampling trajectories (transformer inputs per step) into `session.calibration`."""
    s = settings or CalibrationSettings()
    session.require_generator("collect_calibration")
    t0 = time.perf_counter()
    model = session.fp_model
    gen = s.generation().resolved(model.defaults())
    model.check_settings(gen)
    prompts = list(s.prompt_list) if s.prompt_list is not None else calibration_prompts(model, s.prompts, session.seed)
    _check_prompts(model, prompts)
    seeds = [session.seed + s.seed_offset + i for i in range(len(prompts))]
    cache = CalibrationCache(prompts=prompts, seeds=seeds, steps=gen.steps, guidance=gen.guidance)
    budget = int(s.max_mb * 2**20)
    batch_size = 1 if getattr(model, "one_prompt_per_call", False) else s.batch_size
    n_batches = math.ceil(len(prompts) / batch_size)
    keep: set[int] = set(range(gen.steps))
    notes: list[str] = []
    seen = {"t": None, "step": -1, "first": 0, "n": 0, "batch": 0}  # the current generate call's step counter
    spill_root: list[Path] = []
    sharded = distributed.active()
    recorded: list = [] if sharded else cache.entries  # sharded: (batch, call, nbytes, spilled entry) per call
    shards = None
    plan_here = True  # whether this process plans the kept steps (spill=False) from its first call

    def spill_dir() -> Path:
        if not spill_root:
            root = Path(s.spill_dir) if s.spill_dir else Path(tempfile.mkdtemp(prefix="workbench-calibration-"))
            root.mkdir(parents=True, exist_ok=True)
            spill_root.append(root)
            notes.append(f"calls past max_mb={s.max_mb} were written to {root} (read back when replayed)")
        return spill_root[0]

    def sink(args: tuple, kwargs: dict) -> None:
        nonlocal keep
        entry = CalibrationEntry(0, 0.0, _to_cpu(args), _to_cpu(dict(kwargs)), 0)
        entry.timestep = _find_timestep(entry)
        entry.batch = _batch_of(entry)
        if entry.timestep != seen["t"]:  # a new denoising step (a model may call its transformer twice a step)
            seen["t"], seen["step"] = entry.timestep, seen["step"] + 1
        entry.step = seen["step"]
        ids = list(range(seen["first"], seen["first"] + seen["n"]))
        entry.prompt_ids = ids * (entry.batch // len(ids)) if entry.batch % len(ids) == 0 else None
        if not recorded and entry.step == 0 and not s.spill and plan_here:
            # plan the memory: every batch records `steps` steps of about this size
            per = max(entry.nbytes, 1)
            fit = max(1, budget // (per * n_batches))
            if fit < gen.steps:
                keep = _kept_steps(gen.steps, fit)
                notes.append(f"max_mb={s.max_mb} keeps {len(keep)} of {gen.steps} steps per trajectory")
        if entry.step not in keep:
            return
        if sharded:  # every call goes to a file; the merge decides what stays in memory
            nbytes, name = entry.nbytes, f"b{seen['batch']:05d}-c{len(recorded):05d}"
            recorded.append((seen["batch"], len(recorded), nbytes, entry.spill(shards.part(name))))
        elif cache.nbytes + entry.nbytes <= budget:
            cache.entries.append(entry)
        elif s.spill:
            cache.entries.append(entry.spill(spill_dir() / f"entry-{len(cache.entries):06d}"))

    transformer = session.fp_transformer
    starts = list(range(0, len(prompts), batch_size))
    if sharded:  # this rank's sampling batches (round-robin) and the folder all ranks share
        from workbench.distributed.shards import ShardFolder

        shards = ShardFolder.open(s.spill_dir, {"prompts": prompts, "seeds": seeds, "generation": repr(gen),
                                                "batch_size": batch_size, "spill": s.spill, "max_mb": s.max_mb},
                                  what="calibration")
        mine = list(range(distributed.rank(), n_batches, distributed.world()))
        # a rank plans like one process only from a full first batch (the last batch may hold fewer prompts)
        plan_here = bool(mine) and len(prompts[starts[mine[0]]:starts[mine[0]] + batch_size]) == len(prompts[:batch_size])
    else:
        mine = list(range(n_batches))
    for b in tqdm(mine, desc="calibration trajectories", disable=not session.progress, leave=False):
        i = starts[b]
        seen.update(t=None, step=-1, first=i, n=len(prompts[i:i + batch_size]), batch=b)
        with recording_calls(transformer, sink):
            model.generate(prompts[i:i + batch_size], seeds[i:i + batch_size], gen)
    if sharded:
        keep, notes = _merge_shards(shards, recorded, keep if plan_here else None, cache, budget, s, gen.steps)
        if n_batches < distributed.world():
            notes.append(f"{n_batches} sampling batch(es) of {batch_size} prompts for {distributed.world()} ranks: "
                         "some ranks had no trajectories to sample; lower batch_size to spread the prompts")
    if s.layer_inputs:
        collect_layer_inputs(session, rows=s.layer_rows, cache=cache, max_bytes=budget - cache.nbytes)
    session.calibration = cache

    # statistics of what was recorded, per timestep
    per_step: dict[float, list[CalibrationEntry]] = {}
    for e in cache.entries:
        per_step.setdefault(e.timestep, []).append(e)
    rows = []
    for t in sorted(per_step, reverse=True):
        es = per_step[t]
        x = torch.cat([hidden_states_of(e).float().flatten() for e in es])
        rows.append({
            "step": es[0].step, "timestep": float(t), "calls": len(es), "rows": sum(e.batch for e in es),
            "latent_std": float(x.std()), "latent_absmax": float(x.abs().max()),
            "mb": sum(e.nbytes for e in es) / 2**20,
        })
    report = StageReport(
        name="collect_calibration",
        settings=asdict(s),
        summary={
            "prompts": len(prompts), "calls": len(cache.entries), "timesteps": len(cache.timesteps),
            "kept_steps": len(keep), "mb": cache.nbytes / 2**20, "disk_mb": cache.disk_bytes / 2**20,
            "layers_with_inputs": len(cache.layer_inputs),
        },
        tables={"timesteps": rows, "prompts": [{"prompt": p, "seed": sd} for p, sd in zip(prompts, seeds)]},
        notes=notes,
        seconds=time.perf_counter() - t0,
    )
    return session.add(report)


def _merge_shards(shards, recorded: list, keep: set[int] | None, cache: CalibrationCache, budget: int,  # noqa: ANN001
                  s: CalibrationSettings, steps: int) -> tuple[set[int], list[str]]:
    """Every rank's recorded calls (files in the shared folder) into `cache.entries`, on every rank, as one
    process would have recorded them: in sampling-batch order, only the steps rank 0 planned to keep (rank 0
    samples the first batch, which is what one process plans from), in memory up to max_mb and spilled (or,
    with spill=False, dropped) past it. Returns (kept steps, notes)."""
    index = {"calls": [{"batch": b, "call": c, "nbytes": n, "step": e.step, "timestep": e.timestep, "rows": e.batch,
                        "prompt_ids": e.prompt_ids, "path": e.path} for b, c, n, e in recorded],
             "keep": None if keep is None else sorted(keep)}
    indexes = shards.exchange(index)
    kept = set(indexes[0]["keep"]) if indexes[0]["keep"] is not None else set(range(steps))
    calls = sorted((c for ix in indexes for c in ix["calls"]), key=lambda c: (c["batch"], c["call"]))
    still_needed: set[str] = set()
    for c in calls:
        if c["step"] not in kept:
            continue
        entry = CalibrationEntry(int(c["step"]), float(c["timestep"]), None, None, int(c["rows"]), c["prompt_ids"],
                                 c["path"])
        if cache.nbytes + c["nbytes"] <= budget:
            cache.entries.append(entry.in_memory())
        elif s.spill:
            cache.entries.append(entry)
            still_needed.add(c["path"])
    shards.cleanup(keep=still_needed)
    notes = []
    if len(kept) < steps:
        notes.append(f"max_mb={s.max_mb} keeps {len(kept)} of {steps} steps per trajectory")
    if still_needed:
        notes.append(f"calls past max_mb={s.max_mb} were written to {shards.root} (read back when replayed)")
    return kept, notes


def calibration_from_inputs(session: Session, inputs: list[dict[str, Any]], timestep_arg: str = "timestep") -> CalibrationCache:
    """A calibration cache from explicit forward kwargs (models that cannot sample here, e.g. a bare
    diffusers transformer); each dict is one call `transformer(**kwargs)`."""
    cache = CalibrationCache(steps=len(inputs))
    for i, kw in enumerate(inputs):
        kw = _to_cpu(dict(kw))
        entry = CalibrationEntry(i, 0.0, (), kw, 0)
        t = kw.get(timestep_arg)
        entry.timestep = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t or 0.0)
        entry.batch = _batch_of(entry)
        cache.entries.append(entry)
    session.calibration = cache
    return cache


def hidden_states_of(e: CalibrationEntry) -> torch.Tensor:
    """The latents of a recorded call: its first positional argument or `hidden_states`."""
    if e.args:
        return e.args[0]
    return e.kwargs.get("hidden_states", next(v for v in e.kwargs.values() if isinstance(v, torch.Tensor)))


def _batch_of(e: CalibrationEntry) -> int:
    return int(hidden_states_of(e).shape[0])


def _find_timestep(e: CalibrationEntry) -> float:
    t = e.kwargs.get("timestep", e.args[1] if len(e.args) > 1 else None)
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0])
    return float(t) if t is not None else 0.0


def quantizable_layers(session: Session) -> list[str]:
    """Names of the FP transformer's nn.Linear layers (adapter order)."""
    from workbench.models.adapters import linear_layers

    return list(linear_layers(session.fp_transformer))


@torch.no_grad()
def collect_layer_inputs(
    session: Session,
    names: list[str] | None = None,
    rows: int = 1024,
    cache: CalibrationCache | None = None,
    max_bytes: int | None = None,
) -> dict[str, torch.Tensor]:
    """Replay the calibration through the FP transformer and keep, per layer, `rows` random input rows
    (tokens, all timesteps pooled; a uniform reservoir sample). Stored in `cache.layer_inputs`."""
    cache = cache or session.calibration
    if cache is None or not cache.entries:
        raise ValueError("no calibration data: run collect_calibration(session) first")
    names = names or quantizable_layers(session)
    g = session.rng(7)
    kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def fn(name: str, x: torch.Tensor, out: torch.Tensor) -> None:
        m = x.detach().reshape(-1, x.shape[-1])
        keys = torch.rand(m.shape[0], generator=g)
        if m.shape[0] > rows:  # only rows that can survive the reservoir leave the device
            keys, idx = keys.topk(rows, largest=False)
            m = m[idx.to(m.device)]
        m = m.float().cpu()
        if name in kept:
            old, old_keys = kept[name]
            m, keys = torch.cat([old, m]), torch.cat([old_keys, keys])
        if m.shape[0] > rows:
            keys, idx = keys.topk(rows, largest=False)
            m = m[idx]
        kept[name] = (m, keys)

    with capturing_inputs(session.fp_transformer, names, fn):
        cache.replay(session.fp_transformer, progress=session.progress, desc="layer inputs")
    out = {n: v[0] for n, v in kept.items()}
    if max_bytes is not None and _nbytes(out) > max_bytes:
        raise ValueError(
            f"layer inputs need {_nbytes(out) / 2**20:.1f} MB, more than the {max_bytes / 2**20:.1f} MB left under "
            "max_mb; lower layer_rows or raise max_mb"
        )
    cache.layer_inputs.update(out)
    return out
