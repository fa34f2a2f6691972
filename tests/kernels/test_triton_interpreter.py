"""Each Triton kernel vs its reference, run through Triton's CPU interpreter (TRITON_INTERPRET=1).

The checks live in _interp_checks.py and run in one subprocess so that TRITON_INTERPRET never
leaks into this pytest process (other tests may want compiled Triton on a GPU machine). Their
tolerances are derived in _tolerances.py; what the interpreter can and cannot reach is listed in
_interp_checks.py's docstring.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

try:
    import triton  # noqa: F401
    TRITON_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    TRITON_ERROR = f"{type(exc).__name__}: {exc}"

pytestmark = pytest.mark.skipif(
    TRITON_ERROR is not None,
    reason=f"triton is not importable ({TRITON_ERROR}); install triton (e.g. pip install triton==3.6.0) "
           "to check the kernels in the CPU interpreter")


def _check_names():
    """Names of the registered interpreter checks (imports torch + reference only, not triton)."""
    spec = importlib.util.spec_from_file_location("_interp_checks", os.path.join(HERE, "_interp_checks.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.CHECKS)


NAMES = _check_names()


@pytest.fixture(scope="module")
def results():
    """Run every check once in a TRITON_INTERPRET=1 subprocess and parse its JSON summary."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_interp_checks.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail(f"interpreter run failed (rc={proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


@pytest.mark.parametrize("name", NAMES)
def test_kernel_matches_reference(results, name):
    r = results[name]
    assert r["error"] is None, r["error"]
    what = ("ulps outside the output rounding of the fp32 reference +- its derived bound" if r["tol"] == 0.0
            else "max |kernel - reference| / derived bound (see _tolerances.py)")
    assert r["err"] <= r["tol"], f"{name}: error {r['err']:.3g} > tolerance {r['tol']:.3g} ({what})"
