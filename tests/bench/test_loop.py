"""The sampling-loop table: classifier-free guidance as one batch of 2 and Euler steps, seconds per video for
each variant in its own process, final latents compared with the reference variant's."""
from __future__ import annotations

import pytest
import torch

from workbench.bench import e2e as bench_e2e
from workbench.bench import loop as bench_loop
from workbench.bench import peers


def test_sample_batches_cond_and_uncond_and_takes_euler_steps():
    """cond predicts 1, uncond 0: guidance g makes the velocity g, and sigma 1 -> 0 moves the latents by -g."""
    seen = []

    def model(hidden_states, encoder_hidden_states, timestep, return_dict):
        assert hidden_states.shape[0] == 2 and torch.equal(hidden_states[0], hidden_states[1])
        assert torch.equal(encoder_hidden_states, text) and not return_dict
        seen.append(timestep.tolist())
        return (torch.stack([torch.ones_like(hidden_states[0]), torch.zeros_like(hidden_states[0])]),)

    x0 = torch.randn(1, 3, 2, 4, 4)
    text = torch.randn(2, 5, 8)
    x = bench_loop.sample(model, x0, text, steps=4, guidance=6.0, dtype=torch.float32)
    assert torch.allclose(x, x0 - 6.0, atol=1e-5)
    assert seen == [[999, 999], [749, 749], [500, 500], [250, 250]]  # one call per step, sigma 1 -> 1/steps


def test_default_variants_take_the_best_peer():
    names = lambda vs: [v.name for v in vs]  # noqa: E731
    assert names(bench_loop.default_variants("bf16 torch.compile, SDPA cuDNN")) == [
        "bf16 torch.compile", "bf16 torch.compile, SDPA cuDNN", "ours FP8 + qattn, compiled",
        "ours W4A8 + qattn, compiled"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peers, "importable", lambda package: True)
        assert names(bench_loop.default_variants())[1] == "torchao fp8 + SageAttention2, compiled"
        mp.setattr(peers, "importable", lambda package: package == "torchao")
        assert names(bench_loop.default_variants())[1] == "torchao fp8 row-wise, compiled"
        mp.setattr(peers, "importable", lambda package: False)
        assert len(bench_loop.default_variants()) == 3  # no importable peer: bf16 compiled is the one to beat
    assert bench_loop.reference_of([bench_e2e.BY_NAME["ours W8A8"], bench_e2e.BY_NAME["bf16 torch.compile"]]) == \
        "bf16 torch.compile"


def test_loop_table_has_seconds_per_video_for_each_variant_in_its_own_process():
    case = bench_e2e.cases(dry=True)[1]
    variants = [bench_e2e.BY_NAME["ours W8A8 + qattn"], bench_e2e.BY_NAME["bf16 eager"]]  # reference arrives second
    seen = []
    rows = bench_loop.run_loop_case(case, variants, torch.device("cpu"), torch.float32,
                                    bench_loop.LoopSettings(steps=3, warmup_steps=1), log=lambda m: None,
                                    on_row=lambda part: seen.append(len(part)), min_attn_tokens=16,
                                    compile_backend="aot_eager", timeout_s=120)
    assert seen == [1, 2]
    q, ref = rows
    assert all(r.error is None and r.steps == 3 and r.s_per_video > 0 for r in rows), [r.error for r in rows]
    assert q.s_per_step == pytest.approx(q.s_per_video / 3) and q.wall_s > q.s_per_video
    assert ref.rel_err == 0.0 and ref.ref == "bf16 eager" and q.ref == "bf16 eager"
    assert 0 < q.rel_err < 0.1 and q.attn_calls == case.config["num_layers"]  # per transformer call, batch 2
    assert q.graphs is None and ref.graph_breaks is None  # eager variants: no compile counts
    md = bench_loop.markdown(rows)
    assert "| model | variant | steps | s / video |" in md and md.splitlines()[2].endswith("| - |")
    assert f"| Wan (tiny) | bf16 eager | 3 | {ref.s_per_video:.2f} |" in md
    assert "| Wan (tiny) | bf16 eager |" in md.split("ours vs best peer |")[1]  # the loop's best-peer table


def test_a_kept_loop_reference_gives_a_later_call_its_errors(tmp_path):
    """`--reference-dir`: a loop call keeps bf16 torch.compile's final latents; a later call of the same settings
    whose variants have no plain bf16 row compares against them."""
    case = bench_e2e.cases(dry=True)[1]
    by = bench_e2e.BY_NAME
    s = bench_loop.LoopSettings(steps=2, warmup_steps=0)
    kw = dict(min_attn_tokens=16, compile_backend="aot_eager", isolated=False, reference_dir=str(tmp_path))
    first = bench_loop.run_loop_case(case, [by["bf16 torch.compile"], by["ours W8A8 + qattn"]], torch.device("cpu"),
                                     torch.float32, s, log=lambda m: None, **kw)
    assert first[1].ref == "bf16 torch.compile" and first[1].rel_err > 0
    later = bench_loop.run_loop_case(case, [by["ours W8A8 + qattn"]], torch.device("cpu"), torch.float32, s,
                                     log=lambda m: None, **kw)
    assert later[0].ref == "bf16 torch.compile" and later[0].rel_err == pytest.approx(first[1].rel_err, rel=1e-6)
    alone = bench_loop.run_loop_case(case, [by["ours W8A8 + qattn"]], torch.device("cpu"), torch.float32,
                                     bench_loop.LoopSettings(steps=3, warmup_steps=0), log=lambda m: None, **kw)
    assert alone[0].rel_err is None and alone[0].ref is None  # 3 steps: no kept reference of those settings
