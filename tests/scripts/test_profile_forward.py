"""scripts/profile_forward.py: the NOTES.md profile table's script; its logic on the tiny CPU case."""
import json

import pytest
import torch
from script_loader import load_script



def _module():
    return load_script("profile_forward")


def test_dry_run_profiles_the_tiny_case(tmp_path):
    out = tmp_path / "prof.json"
    res = _module().main(["CogVideoX", "ours W8A8", "--dry-run-cpu", "--top", "5", "--out", str(out)])
    assert json.loads(out.read_text()) == res
    assert res["case"] == "CogVideoX (tiny)" and res["ms_per_forward"] > 0 and len(res["top"]) == 5
    assert res["top"][0]["ms"] >= res["top"][-1]["ms"] > 0


def test_without_cuda_it_refuses_clearly():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="needs a GPU"):
        _module().main(["CogVideoX", "bf16 eager"])
    with pytest.raises(SystemExit, match="unknown variant"):
        _module().main(["CogVideoX", "bf16 fast", "--dry-run-cpu"])
