"""`workbench quantize --nproc N` and the torchrun worker entry, without starting any process: the command lines,
the workers' environment, the resume command, and the errors a wrong launch gets."""
from __future__ import annotations

import pytest

from workbench import distributed
from workbench.cli.commands import main
from workbench.distributed import launch
from workbench.distributed.data_parallel import RowSplit, row_counts

TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_nproc_becomes_a_torchrun_command_without_nproc():
    argv = ["quantize", "--recipe", "r.yaml", "--nproc", "4", "--out", "o", "--nproc=2", "--force"]
    assert launch.strip_nproc(argv) == ["quantize", "--recipe", "r.yaml", "--out", "o", "--force"]
    cmd = launch.torchrun_command(4, launch.strip_nproc(argv))
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m"]
    assert cmd[6:] == ["workbench", "quantize", "--recipe", "r.yaml", "--out", "o", "--force"]
    with pytest.raises(ValueError, match="--nproc must be >= 1"):
        launch.torchrun_command(0, [])


def test_workers_get_nvlink_multicast_off_unless_set_and_the_resume_command():
    env = launch.worker_env({"NCCL_NVLS_ENABLE": "1", "PATH": "/bin"}, 2, "workbench quantize --nproc 2")
    assert env["NCCL_NVLS_ENABLE"] == "1"  # the user's choice stays
    assert env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1" and env["NVSHMEM_DISABLE_NVLS"] == "1"
    assert int(env["OMP_NUM_THREADS"]) >= 1 and env["PATH"] == "/bin"
    assert env[launch.RESUME_ENV] == "workbench quantize --nproc 2"
    assert launch.worker_env({"OMP_NUM_THREADS": "3"}, 8, "x")["OMP_NUM_THREADS"] == "3"


def test_resume_command_of_a_worker(monkeypatch):
    argv = ["quantize", "--recipe", "a b.yaml", "--out", "o"]
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(launch.RESUME_ENV, raising=False)
    assert launch.resume_command(argv) == "torchrun --standalone --nproc-per-node 2 -m workbench quantize --recipe 'a b.yaml' --out o"
    monkeypatch.setenv("WORLD_SIZE", "8")  # 4 hosts of 2
    assert launch.resume_command(argv).startswith("torchrun --nnodes 4 --nproc-per-node 2 <the same --rdzv-* flags>")
    monkeypatch.setenv(launch.RESUME_ENV, "workbench quantize --nproc 2 ...")  # set by `--nproc`
    assert launch.resume_command(argv) == "workbench quantize --nproc 2 ..."


def test_wrong_launches_are_refused_with_the_fix(monkeypatch, capsys):
    assert main(["quantize", "--recipe", "naive-w8a8", "--out", "o", "--nproc", "2", "--device", "cuda"]) == 2
    assert "needs 2 GPUs; this machine has 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--recipe", "naive-w8a8", "--out", "o", "--nproc", "0"])
    assert "--nproc must be an integer >= 1" in capsys.readouterr().err
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    assert main(["quantize", "--recipe", "naive-w8a8", "--out", "o", "--nproc", "2"]) == 2
    assert "drop --nproc when launching with torchrun" in capsys.readouterr().err
    with pytest.raises(distributed.DistributedError, match="only `workbench quantize` runs"):
        main(["eval", "somewhere", "--json"])  # would run once per rank
    assert not distributed.active()


def test_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_seconds("nccl") == 600 and distributed.timeout_seconds("gloo") == 300
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")
    assert distributed.timeout_seconds("nccl") == 42
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(distributed.DistributedError, match="WORKBENCH_DIST_TIMEOUT='soon'"):
        distributed.timeout_seconds("gloo")


def test_rows_split_into_contiguous_slices():
    assert row_counts(5, 2) == [3, 2] and row_counts(2, 4) == [1, 1, 0, 0] and sum(row_counts(17, 8)) == 17
    with pytest.raises(ValueError, match="needs a process group"):
        RowSplit("fsdp")
