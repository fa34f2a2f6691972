"""Latent error per denoising step and LatentRecorder: exact on hand-made steps, copies (no aliasing), the
same subsampled elements in both runs, clear errors."""
from __future__ import annotations

import json

import pytest
import torch

from workbench.metrics import LatentErrors, LatentRecorder, latent_errors


def _run(recorder: LatentRecorder, x0: torch.Tensor, steps: int = 4, drift: float = 0.0) -> None:
    """A sampler-like loop: updates the latents in place and calls on_step(step, timestep, latents) each step."""
    x = x0.clone()
    g = torch.Generator().manual_seed(5)
    for i in range(steps):
        x.mul_(0.9).add_(drift * torch.randn(x.shape, generator=g))
        recorder(i, 1000.0 - 250.0 * i, x)


def test_identical_runs_give_zero():
    steps = [torch.randn(2, 4, 3, 5, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    e = latent_errors(steps, [s.clone() for s in steps])
    assert e.per_step == [0.0, 0.0, 0.0] and e.mean == 0.0


def test_hand_computation():
    fp = [torch.full((2, 2), 2.0), torch.tensor([[3.0, 4.0], [0.0, 0.0]])]  # norms 4 and 5
    q = [fp[0] + torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.zeros(2, 2)]  # errors 1/4 and 5/5
    e = latent_errors(fp, q)
    assert e.per_step == pytest.approx([0.25, 1.0]) and e.mean == pytest.approx(0.625)
    assert isinstance(e, LatentErrors) and e.timesteps is None
    d = e.as_dict()
    assert d == {"latent_rel_l2_mean": pytest.approx(0.625), "latent_rel_l2_per_step": pytest.approx([0.25, 1.0])}
    json.dumps(d, allow_nan=False)


def test_recorder_keeps_cpu_float32_copies():
    rec = LatentRecorder()
    x0 = torch.randn(1, 4, 2, 6, 6, generator=torch.Generator().manual_seed(0)).to(torch.float64)
    _run(rec, x0)
    assert len(rec) == 4 and rec.steps == [0, 1, 2, 3] and rec.timesteps == [1000.0, 750.0, 500.0, 250.0]
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" and t.shape == x0.shape for t in rec.latents)
    # the loop changed its latents in place after each call; the recorded steps must still differ
    assert torch.allclose(rec.latents[1], (x0 * 0.81).float()) and not torch.allclose(rec.latents[0], rec.latents[1])
    assert not rec.subsampled
    rec.clear()
    assert len(rec) == 0 and rec.timesteps == []


def test_recorders_match_tensor_lists():
    x0 = torch.randn(1, 4, 2, 6, 6, generator=torch.Generator().manual_seed(1))
    fp, q = LatentRecorder(), LatentRecorder()
    _run(fp, x0)
    _run(q, x0, drift=0.01)
    e = latent_errors(fp, q)
    assert e.per_step == pytest.approx(latent_errors(fp.latents, q.latents).per_step)
    assert all(v > 0 for v in e.per_step) and e.timesteps == fp.timesteps
    assert e.per_step[0] < e.per_step[-1]  # the drift compounds: the latents shrink while the noise adds up


def test_recorders_pool_steps_over_batches():
    """A prompt set generated in two batches: each step index pools both batches' squared errors."""
    fp, q = LatentRecorder(), LatentRecorder()
    for batch in range(2):
        for i in range(2):
            a = torch.full((2, 2), 2.0) if batch == 0 else torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # ||a||^2 = 16, 25
            d = torch.tensor([[1.0, 0.0], [0.0, 0.0]]) * (i + batch)  # ||d||^2 = 0, 1 (batch 0); 1, 4 (batch 1)
            fp(i, 10.0 - i, a)
            q(i, 10.0 - i, a + d)
    e = latent_errors(fp, q)
    assert e.per_step == pytest.approx([(1 / 41) ** 0.5, (5 / 41) ** 0.5])
    assert e.timesteps == [10.0, 9.0]
    assert len(latent_errors(fp.latents, q.latents).per_step) == 4  # plain lists: one entry per call


def test_subsampling_keeps_the_same_elements():
    x = torch.arange(1000, dtype=torch.float32).reshape(10, 100)
    a, b, other = LatentRecorder(max_elements=50, seed=3), LatentRecorder(max_elements=50, seed=3), LatentRecorder(50, seed=4)
    a(0, 1.0, x)
    a(1, 0.5, x + 0.5)
    b(0, 1.0, 2 * x)
    other(0, 1.0, x)
    kept = a.latents[0]
    assert kept.shape == (50,) and a.shapes == [(10, 100), (10, 100)] and a.subsampled
    assert torch.equal(kept, kept.round()) and len(set(kept.tolist())) == 50  # 50 distinct original elements
    assert torch.equal(a.latents[1], kept + 0.5)  # same positions at every step
    assert torch.equal(b.latents[0], 2 * kept)  # and in another run with the same settings
    assert not torch.equal(other.latents[0], kept)  # another seed picks other elements
    small = LatentRecorder(max_elements=50)
    small(0, 1.0, x[:, :5])  # 50 elements: kept whole
    assert small.latents[0].shape == (10, 5) and not small.subsampled


def test_subsampled_error_estimates_the_full_error():
    g = torch.Generator().manual_seed(2)
    fp = torch.randn(4, 16, 20, 20, generator=g)
    q = fp + 0.1 * torch.randn(fp.shape, generator=g)
    full = latent_errors([fp], [q]).mean
    fp_rec, q_rec = LatentRecorder(max_elements=4000), LatentRecorder(max_elements=4000)
    fp_rec(0, 1.0, fp)
    q_rec(0, 1.0, q)
    assert full == pytest.approx(0.1, rel=0.05)
    assert latent_errors(fp_rec, q_rec).mean == pytest.approx(full, rel=0.05)


def test_errors():
    a = [torch.ones(2, 2)] * 3
    r, r_short = LatentRecorder(), LatentRecorder()
    for i in range(3):
        r(i, 1.0, torch.ones(2))
    r_short(0, 1.0, torch.ones(2))
    with pytest.raises(ValueError, match="different steps or shapes"):
        latent_errors(r, r_short)
    with pytest.raises(ValueError, match="3 steps but the quantized run 2"):
        latent_errors(a, a[:2])
    with pytest.raises(ValueError, match="shape"):
        latent_errors(a, [torch.ones(2, 3)] * 3)
    with pytest.raises(ValueError, match="no steps recorded"):
        latent_errors(LatentRecorder(), LatentRecorder())
    with pytest.raises(ValueError, match="NaN"):
        latent_errors(a, [torch.ones(2, 2), torch.full((2, 2), float("nan")), torch.ones(2, 2)])
    with pytest.raises(ValueError, match="all zero"):
        latent_errors([torch.zeros(2, 2)], [torch.ones(2, 2)])
    with pytest.raises(ValueError, match="LatentRecorder or a list"):
        latent_errors(torch.ones(3, 2, 2), a)
    with pytest.raises(ValueError, match="max_elements"):
        LatentRecorder(max_elements=0)
    x = torch.randn(100)
    r1, r2 = LatentRecorder(max_elements=10, seed=0), LatentRecorder(max_elements=10, seed=1)
    r1(0, 1.0, x)
    r2(0, 1.0, x)
    with pytest.raises(ValueError, match="same max_elements and seed"):
        latent_errors(r1, r2)
