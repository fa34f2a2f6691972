from __future__ import annotations

import pytest
import torch

from stage_helpers import PROMPTS, tiny_world_model
from workbench.session import Session
from workbench.stages import CalibrationSettings, calibration_prompts, collect_calibration, collect_layer_inputs
from workbench.world.grammar import heldout_scenes, parse_prompt


def test_cache_holds_replayable_trajectories(pipeline):
    session, reports = pipeline
    cal = session.calibration
    assert len(cal.entries) == 3 and len(cal.prompts) == 2
    assert cal.timesteps == sorted(cal.timesteps, reverse=True) and len(cal.timesteps) == 3
    e = cal.entries[0]
    assert e.batch == 4  # 2 prompts x (conditional, unconditional)
    assert e.rows(2).batch == 2
    a = cal.replay(session.fp_transformer, cal.entries[:1])[0]
    b = cal.replay(session.fp_transformer, cal.entries[:1])[0]
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert reports["collect_calibration"].summary["mb"] == pytest.approx(cal.nbytes / 2**20)


def test_calibration_prompts_avoid_held_out_set():
    held = set(heldout_scenes())
    model = tiny_world_model()
    prompts = calibration_prompts(model, 12, seed=3)
    assert len(set(prompts)) == 12
    assert not any(parse_prompt(p) in held for p in prompts)
    assert calibration_prompts(model, 12, seed=3) == prompts  # seeded


def test_entries_know_their_prompts_and_steps(pipeline):
    """Every recorded row names its prompt (CFG batches are [cond..., uncond...]) and its denoising step."""
    session, _ = pipeline
    cal = session.calibration
    assert [e.step for e in cal.entries] == [0, 1, 2]
    assert all(e.prompt_ids == [0, 1, 0, 1] for e in cal.entries)
    assert cal.entries[0].take(torch.tensor([3, 0])).prompt_ids == [1, 0]


def test_held_out_prompt_is_refused():
    session = Session.start(tiny_world_model())
    with pytest.raises(ValueError, match="held-out"):
        collect_calibration(session, CalibrationSettings(prompt_list=[heldout_scenes()[0].prompt], steps=1))


def test_calls_past_the_memory_bound_spill_to_disk(tmp_path):
    """A cache larger than max_mb keeps every call: the rest on disk, read back bit for bit when replayed,
    and through a session snapshot (what a resumed run restores)."""
    from workbench.io.snapshot import restore_snapshot, save_snapshot

    kw = dict(prompt_list=PROMPTS, steps=3)
    ref = Session.start(tiny_world_model())
    collect_calibration(ref, CalibrationSettings(**kw))
    s = Session.start(tiny_world_model())
    r = collect_calibration(s, CalibrationSettings(**kw, max_mb=0.25, spill_dir=str(tmp_path / "spill")))
    cal = s.calibration
    assert len(cal.entries) == len(ref.calibration.entries) == 3 and cal.nbytes <= 0.25 * 2**20
    assert any(e.path for e in cal.entries) and r.summary["disk_mb"] > 0 and list((tmp_path / "spill").glob("*.json"))
    a, b = (c.replay(s.fp_transformer) for c in (cal, ref.calibration))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    save_snapshot(s, tmp_path / "snap", "fp", 0)
    back, _ = restore_snapshot(tiny_world_model(), tmp_path / "snap", "fp")
    assert [e.path for e in back.calibration.entries] == [e.path for e in cal.entries]
    assert torch.equal(back.calibration.replay(s.fp_transformer)[2], b[2])


def test_memory_bound_keeps_fewer_steps():
    session = Session.start(tiny_world_model())
    r = collect_calibration(session, CalibrationSettings(prompt_list=PROMPTS[:1], steps=4, guidance=1.0, max_mb=0.3,
                                                         spill=False))
    cal = session.calibration
    assert cal.nbytes <= 0.3 * 2**20
    assert 1 <= len(cal.entries) < 4 and r.summary["kept_steps"] == len(cal.entries)
    assert r.notes


def test_layer_inputs_are_bounded(pipeline):
    session, _ = pipeline
    got = collect_layer_inputs(session, ["blocks.0.attn1.to_q", "blocks.1.ffn.net.2"], rows=50)
    assert got["blocks.0.attn1.to_q"].shape == (50, 128)
    assert got["blocks.1.ffn.net.2"].shape == (50, 512)
    assert "blocks.0.attn1.to_q" in session.calibration.layer_inputs


def test_bad_settings():
    with pytest.raises(ValueError, match="steps"):
        CalibrationSettings(steps=0)
