"""Fault injection for tests/distributed (imported at start-up by every Python process whose PYTHONPATH holds
this folder): WORKBENCH_TEST_FAIL="RANK:UNIT:ITERATION[:hang]" makes the torchrun worker of that rank raise (or,
with ":hang", sleep for an hour without exiting) in the distillation loss of UNIT (e.g. blocks.1) at ITERATION
(1-based), as a crashing or stuck rank would; other processes (the other ranks, torchrun itself, a one-process
resume) are untouched."""
import os

_spec = os.environ.get("WORKBENCH_TEST_FAIL", "")
if _spec and os.environ.get("RANK") == _spec.split(":")[0]:
    import importlib
    import time

    # by module path: the attribute workbench.stages.distill is the `distill` stage function, not the package
    _loop = importlib.import_module("workbench.stages.distill.loop")
    _rank, _unit, _iteration, *_mode = _spec.split(":")
    _real_loss = _loop._loss

    def _failing_loss(loop, job, idx, it, split, mode):  # noqa: ANN001, ANN202
        if job.name == _unit and it + 1 == int(_iteration):
            if _mode == ["hang"]:
                time.sleep(3600)
            raise RuntimeError(f"injected failure on rank {_rank} in {_unit} at iteration {_iteration}")
        return _real_loss(loop, job, idx, it, split, mode)

    _loop._loss = _failing_loss
