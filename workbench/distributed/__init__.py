"""Several processes, one result: the same stages under torchrun (one process per GPU, or gloo on CPUs).

Distributed behaviour switches on when a process group is initialised (`init_from_env`, which `workbench
quantize` calls when torchrun started it) and is off otherwise; library code asks `active()`, `rank()`,
`world()`, `is_main()` and calls `barrier()` unconditionally. One module per kind of code:

* `group`: the process group (torchrun environment, NCCL / gloo, deadlines, barriers, agreements, shutdown);
* `data_parallel`: a training step split over ranks whose loss and gradient equal the one-process ones;
* `sharding`: FSDP2 copies of the unit being trained, and their values copied back;
* `checkpoints`: distributed checkpoints (DCP) that load on any number of ranks;
* `shards`: a folder the ranks share to exchange files (calibration's recorded calls);
* `launch`: `workbench quantize --nproc N` (torchrun on this host) and the resume command;
* `memory`: what a model needs per GPU at N ranks (README's table).

Calibration splits its sampling batches over ranks (`workbench.stages.calibration`), distillation trains each
block as an FSDP2 copy (`workbench.stages.distill.loop`); every other stage runs on every rank alike.
"""

from workbench.distributed.group import (DistributedError, TIMEOUT_ENV, active, any_rank, barrier, broadcast_object,
                                         check_same, device, init_from_env, is_main, launched_by_torchrun,
                                         local_rank, rank, rank_device, shutdown, timeout_seconds, world)

__all__ = ["DistributedError", "TIMEOUT_ENV", "active", "any_rank", "barrier", "broadcast_object", "check_same",
           "device", "init_from_env", "is_main", "launched_by_torchrun", "local_rank", "rank", "rank_device",
           "shutdown", "timeout_seconds", "world"]
