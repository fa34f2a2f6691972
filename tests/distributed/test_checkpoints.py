"""Distributed checkpoints (DCP) in one process: a round trip, and a hostile `.metadata` (DCP pickles it) is
refused without running anything."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from workbench.distributed.checkpoints import load_model, load_optimizer, model_tensors, save_tensors
from workbench.io.checkpoint import CheckpointError


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))


def test_round_trip_of_model_and_optimizer_without_a_group(tmp_path):
    m = _model(0)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.randn(5, 4)).sum().backward()
    opt.step()
    save_tensors(tmp_path / "ck", model_tensors(m), m, opt)
    fresh = _model(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_model(tmp_path / "ck", fresh)
    load_optimizer(tmp_path / "ck", fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), fresh.parameters()))
    for a, b in zip(m.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[a]["exp_avg_sq"], fresh_opt.state[b]["exp_avg_sq"])
    with pytest.raises(CheckpointError, match="holds 'nope', which this Sequential does not have"):
        load_model(tmp_path / "ck", fresh, ["nope"])
    with pytest.raises(CheckpointError, match="cannot be read into this run .* --restart"):
        load_model(tmp_path / "ck", nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2)))  # other shapes


class _Payload:
    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (os.environ["WORKBENCH_TEST_MARKER"],))


def test_a_hostile_metadata_file_is_refused_unrun(tmp_path, monkeypatch):
    m = _model(0)
    save_tensors(tmp_path / "ck", model_tensors(m))
    marker = tmp_path / "the payload ran"
    monkeypatch.setenv("WORKBENCH_TEST_MARKER", str(marker))
    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match="metadata names posix.mkdir"):
        load_model(tmp_path / "ck", _model(1))
    assert not marker.exists()
