"""Recipes: one YAML file per method, an ordered list of stages with their settings plus the quant config.

    from workbench.recipes import list_recipes, load_recipe, run_recipe
    list_recipes()                                  # ['naive-w3a6', ..., 'vidit-q-w8a8']
    session = run_recipe(load_bundled(), "vidit-q-w4a8", progress=True)
    session.qtransformer                            # the quantized transformer

A recipe file:

    name: vidit-q-w4a8
    method: ViDiT-Q
    description: ...
    quant:                        # QuantConfig.from_dict data
      weight: {format: int4, granularity: channel}
      act: {format: uint8, granularity: token, dynamic: true}
    stages:                       # run in order; each item {stage name: settings mapping}
      - collect_calibration: {prompts: 8, steps: 8}
      - apply_quantization: {}
      - calibrate_ranges: {alpha_search: [0.1, 0.3, 0.5]}

Validation is strict: an unknown recipe name lists the available ones, an unknown field anywhere is an
error naming it, and every bit-width must be in 2..8.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

RECIPE_DIR = Path(__file__).parent
TOP_FIELDS = ("name", "method", "description", "quant", "stages")
BIT_RANGE = (2, 8)


class RecipeError(ValueError):
    """A recipe that cannot be read; the message names the recipe, the field and the fix."""


@dataclass
class Recipe:
    """A validated recipe: the quant section (QuantConfig data) and the ordered stages with settings."""

    name: str
    quant: dict[str, Any]
    stages: list[tuple[str, dict[str, Any]]]
    method: str = ""
    description: str = ""
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data, the inverse of `recipe_from_dict` (stored in quantized-model manifests)."""
        return {
            "name": self.name,
            "method": self.method,
            "description": self.description,
            "quant": self.quant,
            "stages": [{name: dict(settings)} for name, settings in self.stages],
        }

    def settings(self) -> list[tuple[str, Any]]:
        """(stage name, settings dataclass instance) in order."""
        from workbench.stages import STAGES

        return [(name, STAGES[name].settings(**settings)) for name, settings in self.stages]


def list_recipes() -> list[str]:
    """Names of the recipes shipped in the package."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


MAX_RECIPE_BYTES = 1 << 20


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """A shipped recipe by name, or a recipe YAML file by path; strictly validated (module docstring)."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist; shipped recipes: {', '.join(list_recipes())}")
        source = path
    else:
        source = RECIPE_DIR / f"{text}.yaml"
        if not source.is_file():
            raise RecipeError(f"unknown recipe {text!r}; available recipes: {', '.join(list_recipes())}")
    if source.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe file {source} is {source.stat().st_size} bytes, far larger than a recipe "
                          f"(at most {MAX_RECIPE_BYTES // 1024} KiB): pass a recipe YAML file")
    try:
        text_data = source.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise RecipeError(f"recipe file {source} is not UTF-8 text (a binary file?): pass a recipe YAML file") from None
    try:
        data = yaml.safe_load(text_data)
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {source} is not valid YAML: {e}") from None
    return recipe_from_dict(data, source=str(source))


def _where(recipe: str, what: str) -> str:
    return f"recipe {recipe!r}: {what}"


def _check_bits(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecipeError(f"{where}: bit-width must be an integer in {BIT_RANGE[0]}..{BIT_RANGE[1]}, got {value!r}")
    if not BIT_RANGE[0] <= value <= BIT_RANGE[1]:
        raise RecipeError(f"{where}: bit-width {value} is outside {BIT_RANGE[0]}..{BIT_RANGE[1]}")


def _spec_bits(spec: Any, where: str) -> None:
    """Check the bit-width of one QuantSpec mapping (or format string)."""
    import re

    if spec is None:
        return
    if isinstance(spec, str):
        spec = {"format": spec}
    if not isinstance(spec, dict):
        return  # from_dict reports the type error
    if "bits" in spec:
        _check_bits(spec["bits"], f"{where}.bits")
    fmt = spec.get("format")
    if isinstance(fmt, str):
        m = re.fullmatch(r"u?int(\d+)(_asym|_sym)?", fmt.strip().lower())
        if m:
            _check_bits(int(m.group(1)), f"{where}.format {fmt!r}")


def check_quant(quant: Any, where: str) -> None:
    """Validate QuantConfig data: bit-widths in range first (clear message), then QuantConfig.from_dict."""
    from workbench.quant import QuantConfig

    if not isinstance(quant, dict):
        raise RecipeError(f"{where} must be a mapping (QuantConfig fields), got {type(quant).__name__}")
    for key in ("weight", "act"):
        _spec_bits(quant.get(key), f"{where}.{key}")
    for i, r in enumerate(quant.get("rules") or []):
        if isinstance(r, dict):
            _spec_bits(r.get("weight"), f"{where}.rules[{i}].weight")
            _spec_bits(r.get("act"), f"{where}.rules[{i}].act")
    att = quant.get("attention")
    if isinstance(att, dict):
        for part, spec in att.items():
            _spec_bits(spec, f"{where}.attention.{part}")
    try:
        QuantConfig.from_dict(quant)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: {e}") from None


def _expected(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _check_value(value: Any, default: Any, where: str) -> None:
    if default is None or value is None:
        return
    ok = True
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    if not ok:
        raise RecipeError(f"{where} must be {type(default).__name__}, got {value!r}")


def check_stage(recipe: str, index: int, stage: str, settings: Any) -> dict[str, Any]:
    """Validate one stage's settings against its dataclass; returns the settings mapping."""
    from workbench.stages import STAGES

    if stage not in STAGES:
        raise RecipeError(_where(recipe, f"stages[{index}]: unknown stage {stage!r}; stages: {', '.join(STAGES)}"))
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise RecipeError(_where(recipe, f"settings of stage {stage!r} must be a mapping, got {type(settings).__name__}"))
    cls = STAGES[stage].settings
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in settings.items():
        if key not in fields:
            raise RecipeError(_where(recipe, f"unknown field {key!r} in the settings of stage {stage!r}; "
                                             f"allowed fields: {', '.join(fields)}"))
        where = _where(recipe, f"{stage}.{key}")
        _check_value(value, _expected(fields[key]), where)
        if key.endswith("bits") and value is not None and not key.startswith("avg"):
            _check_bits(value, where)
        if key == "quant" and value is not None:
            check_quant(value, where)
    try:
        cls(**settings)
    except (ValueError, TypeError) as e:
        raise RecipeError(_where(recipe, f"stage {stage!r}: {e}")) from None
    return dict(settings)


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """A validated Recipe from plain data (a parsed YAML file)."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping with fields {', '.join(TOP_FIELDS)} ({source or 'data'})")
    name = str(data.get("name") or (Path(source).stem if source else "recipe"))
    unknown = [k for k in data if k not in TOP_FIELDS]
    if unknown:
        raise RecipeError(_where(name, f"unknown field {unknown[0]!r}; allowed fields: {', '.join(TOP_FIELDS)}"))
    for required in ("quant", "stages"):
        if required not in data:
            raise RecipeError(_where(name, f"missing field {required!r}"))
    check_quant(data["quant"], _where(name, "quant"))
    stages_data = data["stages"]
    if not isinstance(stages_data, list) or not stages_data:
        raise RecipeError(_where(name, "stages must be a non-empty list of {stage name: settings}"))
    stages = []
    for i, item in enumerate(stages_data):
        if isinstance(item, str):
            stage, settings = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            stage, settings = next(iter(item.items()))
        else:
            raise RecipeError(_where(name, f"stages[{i}] must be a stage name or a one-key mapping "
                                           "{stage name: settings}"))
        stages.append((stage, check_stage(name, i, stage, settings)))
    return Recipe(
        name=name,
        quant=dict(data["quant"]),
        stages=stages,
        method=str(data.get("method") or ""),
        description=str(data.get("description") or "").strip(),
        source=source,
    )


def run_recipe(model: Any, recipe: str | Path | Recipe, progress: bool = False, seed: int = 0,
               checkpoint_dir: str | Path | None = None, restart: bool = False):
    """Run every stage of `recipe` on `model` in a new Session and return the session.

    `model`: a TinyWorldModel (or anything `Session.start` takes). Stages read the recipe's quant section
    from `session.recipe` (apply_quantization quantizes with it unless its settings carry their own).

    checkpoint_dir: make the run resumable. After every stage the session is snapshotted there
    (`workbench.io.snapshot`), and distillation stages checkpoint inside their loops; running the same
    recipe with the same seed, model and code again resumes from the last checkpoint and ends with the same
    result as an uninterrupted run. A checkpoint of another run there is an error (pass `restart=True` to
    discard it). Ctrl-C under `workbench.stages.interrupt.graceful_sigint` stops at the next checkpoint.

    Under a process group (torchrun, `workbench.distributed`) every rank runs every stage; the stages split
    their work where it pays (calibration sampling, distillation) and all ranks end each stage with the same
    session, which is checked. Rank 0 alone writes the run folder and the snapshots; every rank reads them.
    """
    from tqdm.auto import tqdm

    from workbench import distributed
    from workbench.session import Session
    from workbench.stages import STAGES, interrupt

    recipe = load_recipe(recipe)
    plan = [(name, STAGES[name], dict(settings)) for name, settings in recipe.stages]
    run = None if checkpoint_dir is None else ResumableRun(Path(checkpoint_dir), recipe, model, seed, restart)
    restored = None if run is None else run.restore(model, progress)
    if restored is not None:
        session, done = restored
    else:
        session, done = Session.start(model, seed=seed, progress=progress), 0
        session.recipe = {"name": recipe.name, "recipe": recipe.to_dict()}
    try:
        for i, (name, info, settings) in enumerate(tqdm(plan, desc=f"recipe {recipe.name}", disable=not progress)):
            if i < done:
                continue
            fields = {f.name for f in dataclasses.fields(info.settings)}
            for key in ("checkpoint_dir", "spill_dir"):  # long stages keep their files in the run's folder
                if run is not None and key in fields and settings.get(key) is None:
                    settings[key] = str(run.stage_dir(i, name))
            info.fn(session, info.settings(**settings))
            if distributed.active():
                _check_ranks_agree(session, f"stage {i + 1} ({name})")
            if run is not None:
                run.snapshot(session, i)
                if distributed.any_rank(interrupt.stop_requested()):  # ranks stop together or not at all
                    interrupt.request_stop()
                interrupt.check(where=f"after stage {i + 1}/{len(plan)} ({name})")
    except BaseException:
        if run is not None and distributed.is_main() and not run.has_progress():
            run.discard()  # nothing to resume: leave no folder that reads as an unfinished run
        raise
    return session


def _check_ranks_agree(session, where: str) -> None:  # noqa: ANN001
    """Every rank holds the same quantized model and calibration after `where` (else DistributedError)."""
    from workbench import distributed
    from workbench.io.checkpoint import fingerprint, module_fingerprint

    cal = session.calibration
    cal_key = None if cal is None else [(e.step, e.timestep, e.batch, e.path) for e in cal.entries]
    distributed.check_same(fingerprint({"model": module_fingerprint(session.qtransformer), "calibration": cal_key,
                                        "quant": None if session.quant_config is None else
                                        session.quant_config.to_dict()}),
                           f"session after {where} (quantized model, calibration, quant config)")


@dataclasses.dataclass
class ResumableRun:
    """The checkpoint folder of one resumable recipe run: `run.json` (what run it is), the latest session
    snapshot, and one folder per distillation stage for its loop checkpoints."""

    directory: Path
    recipe: Recipe
    model: Any
    seed: int
    restart: bool = False
    RUN_FILE: ClassVar[str] = "run.json"

    def __post_init__(self) -> None:
        import json

        from workbench import distributed
        from workbench.io.checkpoint import code_fingerprint, fingerprint, module_fingerprint
        from workbench.session import Session

        transformer = getattr(Session.unwrap(self.model), "transformer", Session.unwrap(self.model))
        self.key = {"recipe": self.recipe.to_dict(), "seed": self.seed, "model": module_fingerprint(transformer),
                    "code": code_fingerprint()}
        self.fp = fingerprint(self.key)
        path = self.directory / self.RUN_FILE
        fresh = False
        if distributed.is_main():  # one writer; every rank then checks the same file
            if path.is_file() and self.restart:
                self.discard()
            if not path.is_file():
                self.directory.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps({"fingerprint": self.fp, "key": self.key}, indent=1))
                fresh = True
        distributed.barrier("the run's checkpoint folder")
        if fresh:
            return
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            saved = {}
        if saved.get("fingerprint") != self.fp:
            what = [k for k in self.key if (saved.get("key") or {}).get(k) != self.key[k]]
            raise RecipeError(
                f"{self.directory} holds an unfinished run of another command (different "
                f"{', '.join(what) or 'run'}: recipe {(saved.get('key') or {}).get('recipe', {}).get('name')!r}, "
                f"seed {(saved.get('key') or {}).get('seed')}); rerun that command to resume it, or pass "
                "--restart to discard it and start this one")

    @property
    def snapshot_path(self) -> Path:
        return self.directory / "session"  # session.json + session.safetensors

    def has_progress(self) -> bool:
        """True once a snapshot or a stage checkpoint exists (something a rerun would resume)."""
        return self.snapshot_path.with_suffix(".json").is_file() or any(
            f.is_file() for d in self.directory.glob("stage[0-9][0-9]-*") for f in d.iterdir())

    def stage_dir(self, index: int, name: str) -> Path:
        return self.directory / f"stage{index + 1:02d}-{name}"

    def snapshot(self, session, index: int) -> None:  # noqa: ANN001
        """Rank 0 writes the snapshot (every rank holds the same session); the others wait for it."""
        from workbench import distributed
        from workbench.io.snapshot import save_snapshot

        if distributed.is_main():
            save_snapshot(session, self.snapshot_path, self.fp, index + 1)
        distributed.barrier(f"the snapshot after stage {index + 1}")

    def restore(self, model: Any, progress: bool):  # noqa: ANN201
        from workbench.io.snapshot import restore_snapshot

        return restore_snapshot(model, self.snapshot_path, self.fp, progress)

    def discard(self) -> None:
        """Delete what this folder holds of a resumable run (its own files only), then the folder if empty."""
        self.discard_dir(self.directory)

    @classmethod
    def discard_dir(cls, directory: Path) -> None:
        """Delete the files a resumable run writes in `directory` (snapshot, stage folders of checkpoints,
        run.json), then `directory` itself when nothing else is left in it."""
        from workbench.io.checkpoint import remove_checkpoint
        from workbench.stages.distill.checkpoint import remove_loop_checkpoints

        remove_checkpoint(directory / "session")
        for d in directory.glob("stage[0-9][0-9]-*"):
            if d.is_dir():
                remove_loop_checkpoints(d)
                for f in d.iterdir():
                    if f.is_file() and f.suffix in (".json", ".safetensors", ".tmp"):
                        f.unlink()
                if not any(d.iterdir()):
                    d.rmdir()
        (directory / cls.RUN_FILE).unlink(missing_ok=True)
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


__all__ = ["Recipe", "RecipeError", "ResumableRun", "list_recipes", "load_recipe", "recipe_from_dict", "run_recipe"]
