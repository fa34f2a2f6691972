"""scripts/attention_sweep.py: the H200 attention table's script; on a machine without CUDA it says so."""

import pytest
import torch
from script_loader import load_script



def _module():
    return load_script("attention_sweep")


def test_without_cuda_it_refuses_clearly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="needs a GPU"):
        _module().main(["ours", "--out", str(tmp_path / "rows.jsonl")])
    assert not (tmp_path / "rows.jsonl").exists()


def test_the_three_issue_shapes():
    assert [(n, h, d) for _, _, h, n, d in _module().SHAPES] == [(17776, 30, 64), (32760, 12, 128), (32768, 24, 128)]
