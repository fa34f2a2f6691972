"""torchrun worker of tests/distributed/test_torchrun.py::test_split_step_gradients_and_dcp_checkpoint.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed/dp_worker.py OUT

Runs `distributed_step.training_step` in both multi-rank modes ("fsdp": FSDP2-sharded block copy, "allreduce":
replicated block); rank 0 writes the full gradients, the loss and the parameter values after the AdamW step to
OUT/<mode>.safetensors, and all ranks write a distributed checkpoint (DCP) of the sharded block and its optimizer
to OUT/dcp, which the test loads in one process."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helpers"))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from distributed_step import full_values, training_step  # noqa: E402
from workbench import distributed  # noqa: E402
from workbench.distributed.checkpoints import model_tensors, save_tensors  # noqa: E402


def main(out: Path) -> None:
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    ok = False
    try:
        for kind in ("fsdp", "allreduce"):
            step = training_step(kind)
            if kind == "fsdp":
                save_tensors(out / "dcp", model_tensors(step.module), step.module, step.optimizer)
            values = full_values(step.module, step.names)
            if distributed.is_main():
                tensors = {**{f"grad.{k}": v for k, v in step.grads.items()},
                           **{f"value.{k}": v for k, v in values.items()}, "loss": torch.tensor(step.loss)}
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{kind}.safetensors"))
        ok = True
    finally:
        distributed.shutdown(ok)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
