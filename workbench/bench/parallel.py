"""`workbench bench --gpus 0,1`: the benchmark's parts at once on several GPUs of one host, joined into one page.

The parts are the kernel part (microbenchmarks and the GPU kernel tests) and one part per model (its forward table,
then its sampling loop, which picks its peer from that table). Every row of a model is measured on one GPU, so its
speed-ups never mix two devices; each part is a `workbench bench` sub-process with `CUDA_VISIBLE_DEVICES` set to
its GPU, writing its own page, and the pages are joined (`page.join`) as they would be by hand. A part that fails
or times out costs its own rows only (its page is written after every variant, so what it measured is kept).
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

def parse_gpus(text: str, dry_run: bool) -> list[str]:
    """The GPU indices of `--gpus` ("0,1" or "all"); refuses indices this machine does not have (a dry run on the
    CPU takes any, to check the logic)."""
    count = torch.cuda.device_count()
    if text.strip() == "all":
        if count == 0:
            raise ValueError("--gpus all: this machine has no CUDA GPU")
        return [str(i) for i in range(count)]
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus takes distinct GPU indices separated by commas (e.g. 0,1) or 'all', got {text!r}")
    if not dry_run and any(int(g) >= count for g in gpus):
        raise ValueError(f"--gpus {text}: this machine has {count} CUDA GPU(s), indices 0..{count - 1}")
    return gpus


def argv_of(settings: Any, out: Path, settings_path: Path) -> list[str]:
    """The command that runs one part: its settings (page at `out`) written to `settings_path` as JSON, read back
    by this module's `__main__` (no flag list to keep in step with the CLI's)."""
    settings_path.write_text(json.dumps({**asdict(settings), "out": str(out), "force": True}))
    return [sys.executable, "-m", "workbench.bench.parallel", str(settings_path)]


def parts_of(settings: Any, models: list[str]) -> list[tuple[str, Any]]:
    """(label, settings) of each part: the kernel part (unless skipped), then one part per model with both its
    tables (unless both are skipped)."""
    parts = []
    if not settings.skip_micro:
        parts.append(("kernels", replace(settings, skip_e2e=True, skip_loop=True, gpus=None, append=False)))
    if not (settings.skip_e2e and settings.skip_loop):
        parts += [(model, replace(settings, skip_micro=True, models=model, gpus=None, append=False))
                  for model in models]
    return parts


def parts_dir(out: Path) -> Path:
    """Where a parallel run keeps its parts' pages and logs: `<page>_parts/` beside the page."""
    return out.with_name(out.stem + "_parts")


def run_parts(settings: Any, models: list[str], gpus: list[str], work: Path,
              log=print) -> list[dict[str, Any]]:  # noqa: ANN001 - a print-like callable
    """Run the parts, one at a time per GPU, all GPUs at once; returns each part's record (label, gpu, return
    code, start / end times, its page's JSON path when it wrote one)."""
    todo: queue.Queue = queue.Queue()
    for i, (label, part) in enumerate(parts_of(settings, models)):
        todo.put((i, label, part))
    done: list[dict[str, Any]] = []
    lock = threading.Lock()

    def worker(gpu: str) -> None:
        while True:
            try:
                i, label, part = todo.get_nowait()
            except queue.Empty:
                return
            out = work / f"part{i}.md"
            rec: dict[str, Any] = {"index": i, "label": label, "gpu": gpu, "start": time.time()}
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1"}
            with lock:
                log(f"[GPU {gpu}] {label}: started")
            with open(work / f"part{i}.log", "w") as fh:
                rec["returncode"] = subprocess.run(argv_of(part, out, work / f"part{i}.settings.json"), env=env,
                                                   stdout=fh,
                                                   stderr=subprocess.STDOUT).returncode
            rec["end"] = time.time()
            rec["json"] = str(out.with_suffix(".json")) if out.with_suffix(".json").exists() else None
            rec["log"] = str(work / f"part{i}.log")
            with lock:
                done.append(rec)
                log(f"[GPU {gpu}] {label}: exit code {rec['returncode']} after {rec['end'] - rec['start']:.0f} s"
                    + ("" if rec["json"] else " without a page") + f"; its log: {rec['log']}")
                if rec["returncode"]:
                    tail = Path(rec["log"]).read_text(errors="replace").splitlines()[-15:]
                    log("\n".join(f"    | {line}" for line in tail))

    threads = [threading.Thread(target=worker, args=(g,), daemon=True) for g in gpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(done, key=lambda r: r["index"])


def run_parallel(settings: Any, models: list[str], previous: dict | None = None) -> dict[str, Any]:
    """Run the parts on `settings.gpus` and write the joined page (after `previous`, an appended page's JSON)."""
    from workbench.bench import page

    gpus = parse_gpus(settings.gpus, settings.dry_run_cpu)
    out = Path(settings.out)
    work = parts_dir(out)
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("part*.*"):  # this folder holds only the parts of the last parallel run of this page
        old.unlink()
    records = run_parts(settings, models, gpus, work)
    pages = [] if previous is None else [previous]
    for rec in records:
        if rec["json"] is None:
            continue
        data = json.loads(Path(rec["json"]).read_text())
        for p in data.get("parts", []):
            p["what"] = f"{p['what']} (GPU {rec['gpu']})"
        pages.append(data)
    if len(pages) == (0 if previous is None else 1):
        logs = "; ".join(f"{r['label']}: exit code {r['returncode']}" for r in records)
        raise RuntimeError(f"no part of the benchmark wrote a page ({logs}; logs in {work}); rerun without --gpus "
                           "to see why")
    data = page.join(pages)
    data["settings"] = asdict(settings)
    data["gpu_parts"] = [{"label": r["label"], "gpu": r["gpu"], "returncode": r["returncode"],
                          "seconds": round(r["end"] - r["start"], 1)} for r in records]
    return page.render(out, data)


if __name__ == "__main__":  # one part: `python -m workbench.bench.parallel SETTINGS.json` (written by argv_of)
    from workbench.bench.page import BenchSettings, run_bench

    part = BenchSettings(**json.loads(Path(sys.argv[1]).read_text()))
    for t in run_bench(part)["targets"]:
        print(f"[{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['measured']}")
