#!/usr/bin/env python
"""Mutation check: do the tests fail when the code is wrong the way a user would notice?

    python scripts/mutation_check.py                      # every mutation, the default test subset
    python scripts/mutation_check.py --only floor_rounding qrange_off_by_one --jobs 2
    python scripts/mutation_check.py --tests tests/quant --out mutation.md

Each mutation is one small, plausible bug in a core function (a rounding mode, a dropped scale, a swapped zero
point, an off-by-one code range, a constant, a dropped loss weight). For each, `workbench/`, `tests/` and
`pyproject.toml` are copied to a fresh temporary directory, the copy is patched (the exact text is replaced;
the script stops if it no longer occurs as expected), and the chosen tests run there with this interpreter and
PYTHONPATH pointing at the copy (the import location is verified first). The working tree is never written.
An unmutated copy runs first: tests failing there are reported and not counted as catches.

Prints a markdown table: mutation, file, how many tests failed, which ones; a mutation no test catches is
marked SURVIVED and the script exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_TESTS = [
    "tests/quant",
    "tests/kernels/test_reference.py",
    "tests/kernels/test_dispatch.py",
    "tests/kernels/test_ops.py",
    "tests/kernels/test_triton_interpreter.py",
    "tests/stages/test_stage_distill.py",
    "tests/stages/test_stage_s2q.py",
    "tests/stages/test_stage_mpq.py",
    "tests/stages/test_stage_qvdit.py",
]


@dataclass(frozen=True)
class Mutation:
    """Replace `old` by `new` in `path` (relative to the repository), `count` occurrences exactly."""

    name: str
    path: str
    old: str
    new: str
    what: str
    count: int = 1


MUTATIONS = [
    Mutation("floor_rounding", "workbench/quant/formats.py", "torch.round(v)", "torch.floor(v)",
             "integer quantizer rounds down instead of to nearest (quantize and the fake-quant STE)", count=3),
    Mutation("dequantize_drops_scale", "workbench/quant/formats.py",
             "return ((codes.float() - zero) * scale).to(dtype)", "return (codes.float() - zero).to(dtype)",
             "dequantize ignores the (per-channel) scale of integer codes"),
    Mutation("epilogue_drops_weight_scale", "workbench/kernels/reference.py",
             "out = acc * row_scale.float()[:, None] * col_scale.float()[None, :]",
             "out = acc * row_scale.float()[:, None]",
             "kernel reference GEMM epilogue forgets the per-channel weight scale"),
    Mutation("swap_sym_asym_zero_point", "workbench/quant/formats.py",
             "    qmin, qmax = qrange(fmt)\n    if fmt.symmetric:\n",
             "    qmin, qmax = qrange(fmt)\n    if not fmt.symmetric:\n",
             "scale / zero point: symmetric formats take the asymmetric branch and vice versa"),
    Mutation("qrange_off_by_one", "workbench/quant/formats.py",
             "float(2 ** (fmt.bits - 1) - 1)", "float(2 ** (fmt.bits - 1))",
             "symmetric integer range [-2^(b-1), 2^(b-1)] (one code too many)"),
    Mutation("per_token_int8_128", "workbench/kernels/reference.py",
             '    """Symmetric per-row int8 quantization: returns (int8 codes, fp32 scale of shape x.shape[:-1])."""\n'
             "    return _quant_rows(x.float(), INT8_MAX, fp8=False)",
             '    """Symmetric per-row int8 quantization: returns (int8 codes, fp32 scale of shape x.shape[:-1])."""\n'
             "    return _quant_rows(x.float(), 128.0, fp8=False)",
             "reference.quantize_per_token_int8 scales by absmax / 128 instead of / 127"),
    Mutation("loss_drops_token_weights", "workbench/stages/distill/losses.py",
             "return (err.sum(-1) * weights).sum() / den", "return err.sum() / den",
             "distill/losses.weighted_rel_mse ignores the per-token weights"),
    Mutation("attention_ref_drops_v_mean", "workbench/kernels/reference.py",
             "out = acc / l[..., None] * vs + vm", "out = acc / l[..., None] * vs",
             "quant_attention_ref forgets to add the smoothed-away V mean back"),
    Mutation("w4a8_ref_first_group_scale", "workbench/kernels/reference.py",
             "acc = acc + part * w_scales_grouped[:, gi].float()[None, :]",
             "acc = acc + part * w_scales_grouped[:, 0].float()[None, :]",
             "W4A8 reference applies the first group's scale to every group"),
]


def _copy(dst: Path) -> None:
    """workbench/, tests/ and pyproject.toml of the repository into dst (no caches)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
    shutil.copytree(ROOT / "workbench", dst / "workbench", ignore=ignore)
    shutil.copytree(ROOT / "tests", dst / "tests", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")


def _apply(dst: Path, m: Mutation) -> None:
    """Patch the copy; refuse when the text no longer occurs exactly `count` times (the code moved on)."""
    f = dst / m.path
    text = f.read_text()
    found = text.count(m.old)
    if found != m.count:
        raise RuntimeError(f"mutation {m.name}: expected {m.count} occurrence(s) of {m.old!r} in {m.path}, "
                           f"found {found}; update scripts/mutation_check.py")
    f.write_text(text.replace(m.old, m.new))


def _env(copy: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _failed_tests(xml: Path) -> list[str]:
    """Test ids (path::name) that failed or errored in a junit XML file."""
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            cls = case.get("classname", "")
            parts = cls.split(".")
            # pytest writes module path as dotted classname (plus a class name for test classes)
            path = "/".join(parts) + ".py" if parts and parts[-1].startswith("test_") else cls
            out.append(f"{path}::{case.get('name')}")
    return out


def run(m: Mutation | None, tests: list[str], timeout: float) -> dict:
    """Copy, patch (unless m is None), check the import location, run the tests; return the failing ids."""
    with tempfile.TemporaryDirectory(prefix="mutation_") as tmp:
        dst = Path(tmp)
        _copy(dst)
        if m is not None:
            _apply(dst, m)
        env = _env(dst)
        where = subprocess.run([sys.executable, "-c", "import workbench; print(workbench.__file__)"], cwd=dst,
                               env=env, capture_output=True, text=True, check=True).stdout.strip()
        if not Path(where).resolve().is_relative_to(dst.resolve()):
            raise RuntimeError(f"the tests would import workbench from {where}, not from the mutated copy {dst}")
        xml = dst / "junit.xml"
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
                               f"--junitxml={xml}", *tests], cwd=dst, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if not xml.exists():
            raise RuntimeError(f"pytest wrote no results (rc={proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return {"failed": _failed_tests(xml), "seconds": time.time() - t0, "returncode": proc.returncode}


def table(results: dict[str, dict], baseline: dict, show: int) -> str:
    """Markdown table of which tests caught which mutation."""
    lines = ["| mutation | file | what | tests failing | caught by |", "|---|---|---|---:|---|"]
    for m in MUTATIONS:
        if m.name not in results:
            continue
        caught = [t for t in results[m.name]["failed"] if t not in baseline["failed"]]
        names = ", ".join(f"`{t}`" for t in caught[:show])
        if len(caught) > show:
            names += f" (+{len(caught) - show} more)"
        lines.append(f"| {m.name} | {m.path} | {m.what} | {len(caught)} | {names or '**SURVIVED**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="mutation names (default: all)")
    ap.add_argument("--tests", nargs="*", default=DEFAULT_TESTS, help="test paths (relative to the repository)")
    ap.add_argument("--jobs", type=int, default=1, help="mutations run in parallel (each in its own copy)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per test run")
    ap.add_argument("--show", type=int, default=6, help="catching tests named per mutation")
    ap.add_argument("--out", help="also write the table (markdown) and the raw results (.json beside it)")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = ap.parse_args(argv)
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:30s} {m.path}: {m.what}")
        return 0
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTATIONS}
    if unknown:
        ap.error(f"unknown mutation(s) {sorted(unknown)}; see --list")
    for m in chosen:  # fail fast if a mutation no longer applies, before any test runs
        if (ROOT / m.path).read_text().count(m.old) != m.count:
            raise SystemExit(f"mutation {m.name} no longer applies to {m.path}; update scripts/mutation_check.py")
    print(f"baseline: {' '.join(args.tests)}", flush=True)
    baseline = run(None, args.tests, args.timeout)
    print(f"  {len(baseline['failed'])} failing without mutation ({baseline['seconds']:.0f} s)"
          + ("".join(f"\n    {t}" for t in baseline["failed"])), flush=True)
    results: dict[str, dict] = {}

    def one(m: Mutation) -> tuple[str, dict]:
        r = run(m, args.tests, args.timeout)
        print(f"{m.name}: {len(set(r['failed']) - set(baseline['failed']))} tests fail ({r['seconds']:.0f} s)",
              flush=True)
        return m.name, r

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for name, r in pool.map(one, chosen):
            results[name] = r
    md = table(results, baseline, args.show)
    print("\n" + md)
    if args.out:
        Path(args.out).write_text(md + "\n")
        Path(args.out).with_suffix(".json").write_text(json.dumps({"tests": args.tests, "baseline": baseline,
                                                                   "mutations": results}, indent=1))
    survived = [n for n, r in results.items() if not set(r["failed"]) - set(baseline["failed"])]
    if survived:
        print(f"\nSURVIVED: {', '.join(survived)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
