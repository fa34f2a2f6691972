"""The bench page's "GPU kernel tests" section on the CPU: the dry run reports "skipped: no CUDA", the runner
counts passes / failures / skips of a real pytest run from its junit XML, and a missing test module (an
installed package) is named instead of being reported as a pass."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from workbench.bench import page


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU dry run")
def test_dry_run_page_says_gpu_tests_skipped_without_cuda(tmp_path):
    out = tmp_path / "bench.md"
    result = page.run_bench(page.BenchSettings(out=str(out), dry_run_cpu=True, skip_micro=True, skip_e2e=True,
                                                    skip_loop=True))
    assert result["gpu_tests"] == {"status": "skipped: no CUDA"}
    text = out.read_text()
    assert "## GPU kernel tests\n\nskipped: no CUDA\n" in text
    assert json.loads(out.with_suffix(".json").read_text())["gpu_tests"]["status"] == "skipped: no CUDA"


def test_runner_counts_a_real_pytest_run_and_names_the_failures(tmp_path):
    """A module with one pass, one failure, one error in a fixture and one skip, run like test_gpu.py is."""
    mod = tmp_path / "tests" / "kernels" / "test_fake_gpu.py"
    mod.parent.mkdir(parents=True)
    mod.write_text(textwrap.dedent('''
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("no device")

        def test_ok():
            assert 1 + 1 == 2

        @pytest.mark.parametrize("impl", ["tma"])
        def test_kernel_disagrees(impl):
            assert 0.5 <= 0.25, "3 bf16 ulps outside the rounding of the reference"

        def test_needs_fixture(broken):
            pass

        @pytest.mark.skip(reason="TMA needs sm_90+")
        def test_skipped():
            pass
    '''))
    res = page.run_test_module(mod, timeout_s=120)
    assert res["status"] == "ran" and res["returncode"] == 1
    assert (res["passed"], res["failed"], res["errors"], res["skipped"], res["total"]) == (1, 1, 1, 1, 4)
    names = {f["name"]: f for f in res["failures"]}
    assert set(names) == {"test_fake_gpu.py::test_kernel_disagrees[tma]", "test_fake_gpu.py::test_needs_fixture"}
    assert "3 bf16 ulps outside" in names["test_fake_gpu.py::test_kernel_disagrees[tma]"]["message"]
    assert names["test_fake_gpu.py::test_needs_fixture"]["kind"] == "error"
    md = page.gpu_tests_markdown(res)
    assert "**1 passed, 1 failed, 1 errors, 1 skipped** of 4" in md and "KERNELS DISAGREE" in md
    assert "| test_fake_gpu.py::test_kernel_disagrees[tma] | failure |" in md


def test_missing_module_and_skipped_kernel_part_are_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(page, "GPU_TEST_MODULE", tmp_path / "tests" / "kernels" / "test_gpu.py")
    status = page.gpu_kernel_tests(page.BenchSettings())["status"]
    assert status.startswith("not run:") and "source checkout" in status
    assert page.gpu_kernel_tests(page.BenchSettings(skip_micro=True))["status"].startswith("not run: the kernel part")
    assert page.gpu_kernel_tests(page.BenchSettings(dry_run_cpu=True))["status"].startswith("skipped: --dry-run-cpu")
    monkeypatch.undo()
    assert page.GPU_TEST_MODULE.exists()  # this checkout has the module the bench runs


def test_an_appended_call_that_skips_the_kernel_part_keeps_the_earlier_result():
    ran = {"status": "timed out after 60 s"}
    skipped = page.gpu_kernel_tests(page.BenchSettings(skip_micro=True))
    assert page.merge_gpu_tests(ran, skipped) is ran
    assert page.merge_gpu_tests(None, skipped) is skipped
    again = {"status": "ran", "passed": 3}
    assert page.merge_gpu_tests(ran, again) is again
