"""The end-to-end benchmark's logic on the CPU reference path (the GPU run uses the same code)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from workbench.bench.page import targets
from workbench.bench import e2e as bench_e2e
from workbench.kernels import dispatch


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def test_swap_ours_replaces_block_linears_and_fuses_gelu():
    case = bench_e2e.cases(dry=True)[1]  # tiny Wan
    model = bench_e2e.build(case, torch.device("cpu"), torch.float32)
    n_block = sum(1 for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and bench_e2e.block_linear(name, m))
    n = bench_e2e.swap_ours(model, "w8a8")
    assert n == n_block
    cog = bench_e2e.build(bench_e2e.cases(dry=True)[0], torch.device("cpu"), torch.float32)
    n_adaln = sum(1 for name, m in cog.named_modules() if isinstance(m, torch.nn.Linear) and "blocks." in name
                  and ".norm" in name)
    assert n_adaln == 2 * bench_e2e.cases(dry=True)[0].config["num_layers"]  # norm1/norm2 modulation per block
    n4 = bench_e2e.swap_ours(cog, "w4a8")  # memory-first W4A8 packs the AdaLN linears too
    assert not any(isinstance(m, torch.nn.Linear) and "blocks." in name for name, m in cog.named_modules())
    assert n4 == 6 * 2 + n_adaln  # q, k, v, out, ff1, ff2 per block + modulation
    fused = [m for m in model.modules() if isinstance(m, bench_e2e._FusedGELU)]
    assert len(fused) == case.config["num_layers"] and fused[0].proj.activation == "gelu_tanh"
    # the down-projection after each fused GEMM+GELU and the attention output projections quantize their input
    # with the row kernel (an opaque kernel made it), no other linear does
    flagged = [name for name, m in model.named_modules() if getattr(m, "input_from_kernel", False)]
    assert len(flagged) == 3 * case.config["num_layers"], flagged
    assert all(name.endswith(("ffn.net.2", "attn1.to_out.0", "attn2.to_out.0")) for name in flagged), flagged
    w4 = [m for m in cog.modules() if isinstance(m, dispatch.W4A8Linear)]
    assert all(m.weight_scales.shape == (m.out_features, 1) for m in w4)  # "w4a8": one int4 scale per channel
    assert not any(isinstance(m, torch.nn.Linear) and bench_e2e.block_linear(name, m) for name, m in model.named_modules())


def test_run_case_measures_error_and_routes_attention():
    case = bench_e2e.cases(dry=True)[1]
    variants = [v for v in bench_e2e.VARIANTS
                if v.name in ("bf16 eager", "ours W8A8 + qattn", "ours W4A8", "ours FP8 + qattn, compiled")]
    seen: list[list[str]] = []
    rows = bench_e2e.run_case(case, variants, torch.device("cpu"), torch.float32, warmup=1, log=lambda m: None,
                              min_attn_tokens=16, on_row=lambda part: seen.append([r.variant for r in part]),
                              compile_backend="aot_eager", isolated=False)  # the measurement itself, in this process
    assert seen == [[v.name for v in variants[:i + 1]] for i in range(len(variants))]  # saved after every variant
    by = {r.variant: r for r in rows}
    assert all(r.error is None for r in rows), [r.error for r in rows]
    assert by["bf16 eager"].rel_err == 0.0 and by["bf16 eager"].speedup_vs_eager == pytest.approx(1.0)
    assert 0 < by["ours W8A8 + qattn"].rel_err < 0.05 and by["ours W8A8 + qattn"].qattn_calls == case.config["num_layers"]  # self-attention only
    assert by["ours W8A8 + qattn"].rel_err < by["ours W4A8"].rel_err  # 4-bit weights cost more than 8-bit
    assert by["ours W4A8"].weight_gib < 0.5 * by["bf16 eager"].weight_gib
    compiled = by["ours FP8 + qattn, compiled"]  # traced through the custom ops: attention still routed
    assert compiled.qattn_calls == case.config["num_layers"] and 0 < compiled.rel_err < 0.05
    # compiled whole: Wan's blocks all take the same input layout, so one graph serves every block, no breaks
    assert (compiled.graphs, compiled.graph_breaks) == (1, 0)
    assert by["bf16 eager"].graphs is None and by["ours W4A8"].graph_breaks is None
    md = bench_e2e.markdown(rows)
    table = md.split("\n\n")[0]
    assert table.count("\n") == len(rows) + 1 and "ours W4A8" in md
    assert "| 1 (0) |" in table and table.splitlines()[2].endswith("| - |") and "graphs (breaks): for compiled" in md


def test_quantized_attention_context_restores_sdpa():
    orig = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(1, 2, 32, 64)
    with bench_e2e.quantized_attention(min_tokens=16) as patched:
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        short = torch.nn.functional.scaled_dot_product_attention(q[:, :, :8], q[:, :, :8], q[:, :, :8])
    assert torch.nn.functional.scaled_dot_product_attention is orig
    assert patched.calls == 1  # the 8-token call stayed on SDPA
    ref = orig(q, q, q)
    assert (out - ref).norm() / ref.norm() < 0.03
    assert torch.equal(short, orig(q[:, :, :8], q[:, :, :8], q[:, :, :8]))


def test_targets_compare_against_the_right_baselines():
    shape = "attn B=1 H=12 N=32760 D=128"
    micro = [
        dict(group="M", shape=shape, method="SDPA bf16 (backend torch picks)", ms=11.5, rel_err=0.002),
        dict(group="M", shape=shape, method="SageAttention2 sageattn (int8 QK, fp8 PV)", ms=8.4, rel_err=0.038),
        dict(group="M", shape=shape, method="ours int8 QK / fp8 PV", ms=7.9, rel_err=0.037),  # 1.063x, less error
        dict(group="M", shape="attn B=1 H=30 N=17776 D=64", method="ours int8 QK / fp8 PV", ms=5.0, rel_err=0.04),
        dict(group="M", shape="attn B=1 H=30 N=17776 D=64", method="SageAttention2 sageattn", ms=5.1, rel_err=0.038),
    ]
    e2e = [dict(model="X", variant="bf16 eager", ms=100.0, weight_gib=4.0, weight_source="bytes"),
           dict(model="X", variant="bf16 torch.compile", ms=90.0, weight_gib=4.0, weight_source="bytes"),
           dict(model="X", variant="bf16 + SageAttention2, compiled", ms=70.0, weight_gib=4.0),
           dict(model="X", variant="ours W4A8", ms=56.0, weight_gib=0.9),  # allocator-measured (older run): not used
           dict(model="X", variant="ours W4A8 + qattn, compiled", ms=85.0, weight_gib=1.1, weight_source="bytes"),
           dict(model="X", variant="ours FP8 + qattn, compiled", ms=60.0, weight_gib=2.0)]
    loop = [dict(model="X", variant="bf16 torch.compile", s_per_video=30.0),
            dict(model="X", variant="ours FP8 + qattn, compiled", s_per_video=25.0)]
    tg = targets(micro, e2e, loop)
    wan = next(x for x in tg if shape in x["target"])
    assert wan["met"] and "1.063x" in wan["measured"]
    near = [dict(r, ms=8.04) if r["method"].startswith("ours") and r["shape"] == shape else r for r in micro]
    miss = next(x for x in targets(near, []) if shape in x["target"])
    assert not miss["met"] and "1.045x" in miss["measured"]  # 8.4 / 8.04: shown so that "no" does not read as 1.05x
    cog = next(x for x in tg if "D=64" in x["target"])
    assert not cog["met"]  # 5.1 / 5.0 = 1.02x < 1.05x, and more error than SageAttention2
    fwd = next(x for x in tg if "forward >= 1.4x" in x["target"])
    assert fwd["met"] and "best peer bf16 + SageAttention2" in fwd["measured"]  # 90 / 60 = 1.5x, 60 < 70 ms
    w4 = next(x for x in tg if "W4A8 weights" in x["target"])
    assert w4["met"] and "0.275x" in w4["measured"] and "1.06x" in w4["measured"]  # 1.1 / 4.0 GiB; 90 / 85
    assert next(x for x in tg if "sampling loop" in x["target"])["met"]
    slow = [dict(r, ms=95.0) if r["variant"].startswith("ours W4A8 +") else r for r in e2e]
    assert not next(x for x in targets(micro, slow) if "W4A8 weights" in x["target"])["met"]  # slower than compiled
    beaten = e2e + [dict(model="X", variant="torchao fp8 + SageAttention2, compiled", ms=55.0)]
    assert not next(x for x in targets(micro, beaten) if "forward" in x["target"])["met"]  # a peer is faster
    unmeasured = [dict(r, ms=None) if r["method"].startswith("ours") else r for r in micro]
    rows = [x for x in targets(unmeasured, e2e) if "attention" in x["target"]]
    assert len(rows) == 2 and not any(x["met"] for x in rows) and "not measured" in rows[0]["measured"]


def test_bench_needs_a_gpu_or_dry_run(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from workbench.cli.commands import main

    assert main(["bench", "--skip-micro"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_merge_keeps_measured_rows_and_replaces_same_named_ones():
    from workbench.bench.page import merge_e2e

    old = [dict(model="A", variant="bf16 eager", ms=10.0), dict(model="A", variant="ours FP8, compiled", ms=5.0)]
    new = [dict(model="A", variant="ours FP8, compiled", ms=None, error="skipped: time budget exhausted"),
           dict(model="A", variant="bf16 eager", ms=9.0), dict(model="B", variant="bf16 eager", ms=20.0)]
    merged = {(r["model"], r["variant"]): r["ms"] for r in merge_e2e(old, new)}
    assert merged == {("A", "bf16 eager"): 9.0, ("A", "ours FP8, compiled"): 5.0, ("B", "bf16 eager"): 20.0}


def test_bench_append_joins_two_calls_and_refuses_another_gpu(tmp_path):
    import json

    from workbench.bench.page import BenchSettings, run_bench

    out = tmp_path / "bench.md"
    kw = dict(out=str(out), skip_micro=True, dry_run_cpu=True, e2e_variants="bf16 eager,ours W4A8")
    # the first call as `workbench bench` runs: one worker process per variant, and the sampling-loop table
    first = run_bench(BenchSettings(models="Wan", loop_variants="bf16 eager", loop_steps=2, **kw))
    assert [(r["variant"], r["steps"], r["s_per_video"] > 0) for r in first["loop"]] == [("bf16 eager", 2, True)]
    with pytest.raises(FileNotFoundError, match="--append needs"):
        run_bench(BenchSettings(models="CogVideoX", append=True, **{**kw, "out": str(tmp_path / "other.md")}))
    result = run_bench(BenchSettings(models="CogVideoX", append=True, in_process=True, skip_loop=True, **kw))
    assert {r["model"] for r in result["e2e"]} == {"Wan (tiny)", "CogVideoX (tiny)"}
    assert len(result["parts"]) == 2 and all(r["ms"] for r in result["e2e"])
    assert all(r["speedup_vs_eager"] for r in result["e2e"])  # each against its own model's baseline
    assert [r["model"] for r in result["loop"]] == ["Wan (tiny)"]  # the first call's loop rows are kept
    page = out.read_text()
    assert "Wan (tiny) | ours W4A8" in page and "CogVideoX (tiny) | ours W4A8" in page and "joins calls" in page
    assert "## End-to-end sampling loop (2 steps" in page and "| Wan (tiny) | bf16 eager | 2 |" in page
    best = next(r for r in result["e2e"] if r["model"] == "Wan (tiny)" and r["variant"] == "bf16 eager")
    assert f"| Wan (tiny) | bf16 eager | {best['ms']:.3g} | ours W4A8 |" in page  # the best peer, ours vs it
    data = json.loads(out.with_suffix(".json").read_text())
    data["env"]["gpu"] = "NVIDIA H200"
    out.with_suffix(".json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cannot share one page"):
        run_bench(BenchSettings(models="Wan", append=True, **kw))


def test_each_variant_in_its_own_process_a_crash_costs_its_row_only():
    """A worker that exits, one that raises, and the others measured, their errors against bf16 eager's output
    computed across processes (the same numbers as in this process: same seeded model and inputs)."""
    case, cpu = bench_e2e.cases(dry=True)[1], torch.device("cpu")
    qattn = bench_e2e.BY_NAME["ours W8A8 + qattn"]
    variants = [bench_e2e.BY_NAME["bf16 eager"], bench_e2e.Variant("test: exits", fault="exit"),
                bench_e2e.Variant("test: raises", fault="raise"), qattn]
    seen, log = [], []
    rows = bench_e2e.run_case(case, variants, cpu, torch.float32, warmup=1, log=log.append, min_attn_tokens=16,
                              on_row=lambda part: seen.append(len(part)), timeout_s=120)
    assert seen == [1, 2, 3, 4]  # saved after every variant
    by = {r.variant: r for r in rows}
    assert by["test: exits"].error == "worker exited with code 3: nothing on stderr"
    assert by["test: raises"].error == "worker exited with code 1: RuntimeError: injected fault (isolation check)"
    assert any(m.startswith("  test: raises: worker exited") and "\n    | RuntimeError: injected fault" in m
               for m in log)  # the worker's stderr tail is logged
    assert by["bf16 eager"].rel_err == 0.0 and by["bf16 eager"].ms > 0
    _, ref = bench_e2e.measure(case, variants[0], cpu, torch.float32, log=lambda m: None, timed=False)
    _, out = bench_e2e.measure(case, qattn, cpu, torch.float32, min_attn_tokens=16, log=lambda m: None, timed=False)
    assert by[qattn.name].error is None and by[qattn.name].ms > 0 and by[qattn.name].qattn_calls == 2
    assert by[qattn.name].rel_err == pytest.approx(float((out.double() - ref.double()).norm() / ref.double().norm()),
                                                   rel=1e-9)
    assert by[qattn.name].speedup_vs_eager and by[qattn.name].wall_s > 1  # the worker's wall time, imports included
    md = bench_e2e.markdown(rows)
    assert "| Wan (tiny) | test: exits | worker exited with code 3: nothing on stderr |" in md


def test_without_bf16_eager_the_reference_still_comes_from_it(monkeypatch):
    """A variant list without bf16 eager: one untimed bf16 eager run (no row) gives the reference."""
    ran = []

    def fake_measure(case, v, device, dtype, log=print, timed=True, **kw):
        ran.append((v.name, timed))
        out = torch.ones(3) * (1.0 if v.name == "bf16 eager" else 1.5)
        return bench_e2e.Row(case.name, v.name, ms=1.0 if timed else None), out

    monkeypatch.setattr(bench_e2e, "measure", fake_measure)
    rows = bench_e2e.run_case(bench_e2e.cases(dry=True)[1], [bench_e2e.BY_NAME["ours W8A8"]], torch.device("cpu"),
                              torch.float32, log=lambda m: None, isolated=False)
    assert ran == [("bf16 eager", False), ("ours W8A8", True)]
    assert [(r.variant, r.rel_err) for r in rows] == [("ours W8A8", pytest.approx(0.5))]


def test_variants_cover_the_peers_in_budget_order_and_the_best_peer_is_named():
    names = [v.name for v in bench_e2e.VARIANTS]
    for peer in ("bf16 eager", "bf16 torch.compile", "bf16 torch.compile, SDPA cuDNN", "bf16 torch.compile, SDPA flash",
                 "torchao fp8 row-wise, compiled", "torchao int8 dynamic, compiled", "bf16 + SageAttention2, compiled",
                 "torchao fp8 + SageAttention2, compiled"):
        assert peer in names and not bench_e2e.is_ours(peer)
    assert names[:4] == ["bf16 eager", "bf16 torch.compile", "ours FP8 + qattn, compiled",
                         "torchao fp8 + SageAttention2, compiled"]  # a time budget cuts ablations, not these
    assert bench_e2e.BY_NAME["bf16 torch.compile, SDPA cuDNN"].sdpa == "cudnn"
    assert bench_e2e.is_ours("bf16 + qattn, compiled") and bench_e2e.is_ours("ours W4A8 + qattn, compiled")
    Row = bench_e2e.Row
    rows = [Row("M", "bf16 eager", ms=100.0), Row("M", "bf16 torch.compile, SDPA flash", ms=80.0),
            Row("M", "torchao fp8 + SageAttention2, compiled", ms=50.0), Row("M", "bf16 + qattn, compiled", ms=45.0),
            Row("M", "ours FP8 + qattn, compiled", ms=40.0), Row("M", "bf16 + SageAttention2, compiled", error="x"),
            Row("N", "bf16 eager", ms=10.0), Row("N", "ours W8A8", ms=20.0)]
    peer, ours = bench_e2e.best_rows(rows, "M")
    assert (peer.variant, ours.variant) == ("torchao fp8 + SageAttention2, compiled", "ours FP8 + qattn, compiled")
    md = bench_e2e.best_peer_markdown(rows)
    assert "| M | torchao fp8 + SageAttention2, compiled | 50 | ours FP8 + qattn, compiled | 40 | 1.25x faster |" in md
    assert "| N | bf16 eager | 10 | ours W8A8 | 20 | 2.00x slower |" in md


def test_bench_flags_reach_the_settings(monkeypatch):
    from workbench.bench import page
    from workbench.cli.commands import main

    got = []
    monkeypatch.setattr(page, "run_bench", lambda s: got.append(s) or {"targets": []})
    assert main(["bench", "--dry-run-cpu", "--out", "x.md", "--loop-variants", "bf16 eager", "--loop-steps", "7",
                 "--loop-budget", "30", "--variant-timeout", "90", "--skip-loop", "--in-process"]) == 0
    s = got[0]
    assert (s.loop_variants, s.loop_steps, s.loop_budget_s, s.variant_timeout_s, s.skip_loop, s.in_process) == (
        "bf16 eager", 7, 30.0, 90.0, True, True)
    assert s.reference_dir is None
    assert main(["bench", "--dry-run-cpu", "--reference-dir", "refs"]) == 0 and got[-1].reference_dir == "refs"
    with pytest.raises(SystemExit):
        main(["bench", "--loop-steps", "0"])


def test_a_failing_variant_logs_where_it_failed(monkeypatch):
    """A variant that raises gets its error cell and, in the log (a worker's stdout reaches the parent's log, its
    stderr does not), the innermost lines of the traceback."""
    def broken(*a, **k):
        raise RuntimeError("invalid python storage, say")

    monkeypatch.setattr(bench_e2e, "prepare", broken)
    lines: list[str] = []
    case = bench_e2e.cases(dry=True)[0]
    row, out = bench_e2e.measure(case, bench_e2e.BY_NAME["bf16 eager"], torch.device("cpu"), torch.float32,
                                 log=lines.append)
    assert out is None and row.error == "RuntimeError: invalid python storage, say"
    trace = [ln for ln in lines if ln.startswith("    | ")]
    assert trace[-1] == "    | RuntimeError: invalid python storage, say"
    assert any("in broken" in ln for ln in trace)


def _page(gpu: str, date: str, e2e: list[dict], loop: list[dict], micro: list[dict] | None = None,
          code: str | None = "c0de5a1e0000") -> dict:
    """A `workbench bench` JSON as one call writes it (only the fields `page.join` / `page.render` read)."""
    return {"env": {"gpu": gpu, "date": date, "torch": "2.11", "triton": "3.6", "diffusers": "0.42",
                    "torchao": "0.18", "code": code},
            "gpu_tests": {"status": "not run: the kernel part was skipped (--skip-micro)"},
            "micro": micro or [], "micro_md": "kernel tables" if micro else None, "e2e": e2e, "loop": loop,
            "parts": [{"date": date, "what": "a call", "wall_s": 300.0, **({"code": code} if code else {})}]}


def test_a_page_says_whether_its_calls_ran_one_version_of_the_code(tmp_path, capsys):
    """Every call records a hash of the workbench sources; a joined page says whether they all match."""
    import json

    from workbench.bench import page

    state = page.code_state()
    assert len(state) == 12 and int(state, 16) >= 0 and page.code_state() == state
    page.main(["--code-state"])
    assert capsys.readouterr().out.strip() == state
    assert page.environment()["code"] == state

    def joined(*codes: str | None) -> str:
        paths = []
        for i, code in enumerate(codes):
            paths.append(tmp_path / f"c{i}.json")
            paths[-1].write_text(json.dumps(_page("NVIDIA H200", f"2026-11-30 0{i}:00 UTC",
                                                  [dict(model="M", variant=f"v{i}", ms=10.0 + i)], [], code=code)))
        out = tmp_path / "joined.md"
        page.main([str(p) for p in paths] + ["--out", str(out), "--force"])
        return out.read_text()

    same = joined("aaaaaaaaaaaa", "aaaaaaaaaaaa")
    assert "All calls ran one version of the workbench sources (code aaaaaaaaaaaa" in same
    assert "(5.0 min, code aaaaaaaaaaaa)" in same
    assert "The calls ran 2 versions of the workbench sources (code aaaaaaaaaaaa, bbbbbbbbbbbb)" in joined(
        "aaaaaaaaaaaa", "bbbbbbbbbbbb")
    assert "Some calls predate the code-state record (the others ran code aaaaaaaaaaaa)" in joined("aaaaaaaaaaaa", None)
    with pytest.raises(SystemExit):
        page.main([])  # neither pages nor --code-state


def test_join_pages_of_two_gpus_of_one_host(tmp_path, capsys):
    """Calls run at once on two GPUs of one host join into one page: both calls' rows, speed-ups against the joined
    page's baselines, the calls in date order; pages of two GPU models are refused; an unrelated page is not
    overwritten."""
    import json

    from workbench.bench import page

    a = _page("NVIDIA H200", "2026-11-30 00:20 UTC",
              [dict(model="M", variant="bf16 torch.compile", ms=200.0), dict(model="M", variant="ours FP8", ms=140.0)],
              [], micro=[{"group": "g"}])
    b = _page("NVIDIA H200", "2026-11-30 00:10 UTC",
              [dict(model="M", variant="ours FP8", ms=None, error="worker exited"),
               dict(model="N", variant="bf16 torch.compile", ms=50.0)],
              [dict(model="M", variant="bf16 torch.compile", steps=50, s_per_video=20.0),
               dict(model="M", variant="ours FP8", steps=50, s_per_video=14.0)])
    paths = []
    for name, data in (("a", a), ("b", b)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "page.md"
    page.main([str(p) for p in paths] + ["--out", str(out)])
    joined = json.loads(out.with_suffix(".json").read_text())
    ms = {(r["model"], r["variant"]): r["ms"] for r in joined["e2e"]}
    assert ms == {("M", "bf16 torch.compile"): 200.0, ("M", "ours FP8"): 140.0, ("N", "bf16 torch.compile"): 50.0}
    ours = next(r for r in joined["e2e"] if r["variant"] == "ours FP8")
    assert ours["speedup_vs_compiled"] == pytest.approx(200.0 / 140.0)
    loop = {r["variant"]: r for r in joined["loop"]}
    assert loop["ours FP8"]["speedup_vs_compiled"] == pytest.approx(20.0 / 14.0)
    assert [p["date"] for p in joined["parts"]] == ["2026-11-30 00:10 UTC", "2026-11-30 00:20 UTC"]
    assert joined["micro"] == [{"group": "g"}]
    text = out.read_text()
    assert "joins calls on one GPU model" in text and "the calls took 10.0 min" in text
    assert "| M | ours FP8 | 140.0 |" in text and "## End-to-end sampling loop (50 steps" in text

    other = tmp_path / "other.json"
    other.write_text(json.dumps(_page("NVIDIA H100 80GB HBM3", "2026-11-30 00:30 UTC", [], [])))
    with pytest.raises(SystemExit, match="different GPUs"):
        page.main([str(paths[0]), str(other), "--out", str(tmp_path / "x.md")])
    (tmp_path / "kept.md").write_text("a page of mine")
    with pytest.raises(SystemExit, match="exists and is not one of the inputs"):
        page.main([str(paths[0]), str(paths[1]), "--out", str(tmp_path / "kept.md")])
    assert (tmp_path / "kept.md").read_text() == "a page of mine"
    with pytest.raises(SystemExit, match="not a `workbench bench` result"):
        page.main([str(paths[0]), str(out.with_suffix(".md")), "--out", str(tmp_path / "y.md")])


def test_join_lists_only_the_kernel_call_whose_tables_the_page_shows():
    """A later call's kernel tables replace an earlier call's whole, so the earlier kernel call leaves the page's
    list of calls; its end-to-end rows (another part) stay with their call."""
    from workbench.bench import page

    old = _page("NVIDIA H200", "2026-11-30 01:00 UTC", [dict(model="M", variant="ours FP8", ms=140.0)], [],
                micro=[{"group": "old"}])
    old["parts"] = [{"date": "2026-11-30 01:00 UTC", "what": "end to end M", "wall_s": 100.0},
                    {"date": "2026-11-30 01:05 UTC", "what": "kernels", "wall_s": 200.0}]
    new = _page("NVIDIA H200", "2026-11-30 03:00 UTC", [], [], micro=[{"group": "new"}])
    new["parts"] = [{"date": "2026-11-30 03:00 UTC", "what": "kernels", "wall_s": 250.0}]
    joined = page.join([old, new])
    assert joined["micro"] == [{"group": "new"}]
    assert [(p["date"], p["what"]) for p in joined["parts"]] == [("2026-11-30 01:00 UTC", "end to end M"),
                                                                 ("2026-11-30 03:00 UTC", "kernels")]
    assert page.join([new, _page("NVIDIA H200", "2026-11-30 04:00 UTC", [], [])])["micro"] == [{"group": "new"}]


def test_weight_bytes_counts_wrapper_subclass_weights_by_their_inner_tensors():
    """torchao keeps quantized weights in wrapper tensor subclasses with no storage of their own (their data_ptr
    raises): the weights are counted through their inner tensors, each shared storage once."""
    from torch.testing._internal.two_tensor import TwoTensor

    lin = nn.Linear(64, 32, bias=False)
    codes = torch.zeros(32, 64, dtype=torch.int8)
    scales = torch.zeros(32, 64, dtype=torch.int8)
    lin.weight = nn.Parameter(TwoTensor(codes, scales), requires_grad=False)
    with pytest.raises(RuntimeError):
        lin.weight.untyped_storage().data_ptr()  # what failed the torchao rows
    model = nn.Sequential(lin, nn.Linear(64, 8))
    model.register_buffer("shared", model[1].weight.data)  # same storage as a parameter: counted once
    assert bench_e2e.weight_bytes(model) == 2 * 32 * 64 + (8 * 64 + 8) * 4


def test_bench_on_two_gpus_runs_the_parts_at_once_and_joins_them(tmp_path, capsys):
    """`--gpus 0,1`: the kernel part and each model's tables run as sub-processes, one per GPU at a time, all GPUs at
    once (the dry run on the CPU checks the scheduling and the join; CUDA_VISIBLE_DEVICES names each part's GPU);
    every row of a model comes from one part; bad GPU lists are refused by name."""
    import json

    from workbench.bench import parallel
    from workbench.bench.page import BenchSettings, run_bench

    out = tmp_path / "bench.md"
    s = BenchSettings(out=str(out), skip_micro=True, dry_run_cpu=True, e2e_variants="bf16 eager,ours W4A8",
                      loop_variants="bf16 eager", loop_steps=2, gpus="0,1")
    result = run_bench(s)
    log = capsys.readouterr().out
    assert "[GPU 0]" in log and "[GPU 1]" in log
    parts = {p["label"]: p for p in result["gpu_parts"]}
    assert set(parts) == {"CogVideoX (tiny)", "Wan (tiny)"} and {p["gpu"] for p in parts.values()} == {"0", "1"}
    assert all(p["returncode"] == 0 for p in parts.values())
    assert {(r["model"], r["variant"]) for r in result["e2e"] if r["ms"]} == \
        {(m, v) for m in parts for v in ("bf16 eager", "ours W4A8")}
    assert {r["model"] for r in result["loop"] if r["s_per_video"]} == set(parts)
    whats = [p["what"] for p in result["parts"]]
    assert len(whats) == 2 and all("(GPU " in w for w in whats)
    assert "joins calls on one GPU model" in out.read_text()
    assert sorted(p.name for p in parallel.parts_dir(out).glob("part?.*")) == \
        [f"part{i}.{ext}" for i in (0, 1) for ext in ("json", "log", "md", "settings.json")]

    with pytest.raises(ValueError, match="distinct GPU indices"):
        parallel.parse_gpus("0,0", dry_run=True)
    with pytest.raises(ValueError, match="distinct GPU indices"):
        parallel.parse_gpus("gpu0", dry_run=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="has 0 CUDA GPU"):
            parallel.parse_gpus("1", dry_run=False)
    kernels = parallel.parts_of(BenchSettings(out=str(out), dry_run_cpu=True), ["A", "B"])
    assert [label for label, _ in kernels] == ["kernels", "A", "B"]
    assert kernels[0][1].skip_e2e and kernels[0][1].skip_loop and kernels[1][1].skip_micro
    argv = parallel.argv_of(kernels[1][1], tmp_path / "p.md", tmp_path / "p.settings.json")
    written = json.loads((tmp_path / "p.settings.json").read_text())
    assert argv[-1] == str(tmp_path / "p.settings.json") and argv[-2] == "workbench.bench.parallel"
    assert written["models"] == "A" and written["skip_micro"] and written["gpus"] is None
    assert written["out"] == str(tmp_path / "p.md") and written["force"]


def test_the_inductor_norms_ablation_leaves_diffusers_block_forwards_in_place():
    """"ours FP8 + qattn, compiled, Inductor norms" is ours minus the fused block producers: same linears and
    attention, every block keeps diffusers' forward; in fp32 the two agree up to the rounding of the LayerNorm
    statistics (computed in another order)."""
    from workbench.kernels.fused_blocks import FUSED_ATTR

    case = bench_e2e.cases(dry=True)[1]
    fused_v = bench_e2e.BY_NAME["ours FP8 + qattn, compiled"]
    plain_v = bench_e2e.BY_NAME["ours FP8 + qattn, compiled, Inductor norms"]
    assert fused_v.fuse_norms and not plain_v.fuse_norms and bench_e2e.is_ours(plain_v.name)
    cpu = torch.device("cpu")
    outs = []
    for v in (fused_v, plain_v):
        model, _ = bench_e2e.prepare(case, v, cpu, torch.float32, compile_backend="aot_eager")
        n_fused = sum(hasattr(m, FUSED_ATTR) for m in model.modules())
        assert n_fused == (case.config["num_layers"] if v.fuse_norms else 0)
        with torch.no_grad(), bench_e2e.attention_context(v, 16, cpu):
            outs.append(model(**bench_e2e.inputs(case, cpu, torch.float32))[0])
    from workbench.kernels.reference import rel_error
    assert rel_error(outs[1], outs[0]) < 1e-5  # 6e-8 measured: fp32 rounding only


def test_a_kept_reference_gives_a_later_call_its_errors_without_recomputing_it(tmp_path):
    """`--reference-dir`: the first call keeps bf16 eager's output, a later call without bf16 eager reads it (same
    errors, no reference run), a call with another seed does not."""
    case = bench_e2e.cases(dry=True)[1]
    by = bench_e2e.BY_NAME
    kw = dict(warmup=1, min_attn_tokens=16, compile_backend="aot_eager", isolated=False,
              reference_dir=str(tmp_path / "refs"))
    first = bench_e2e.run_case(case, [by["bf16 eager"], by["ours W4A8"]], torch.device("cpu"), torch.float32,
                               log=lambda m: None, **kw)
    kept = list((tmp_path / "refs").glob("forward-*.safetensors"))
    assert len(kept) == 1
    logs: list[str] = []
    later = bench_e2e.run_case(case, [by["ours W4A8"]], torch.device("cpu"), torch.float32, log=logs.append, **kw)
    assert any("kept from an earlier call" in m for m in logs), logs
    assert later[0].rel_err == pytest.approx(first[1].rel_err, rel=1e-6) and later[0].rel_err > 0
    logs.clear()
    other = bench_e2e.run_case(case, [by["ours W4A8"]], torch.device("cpu"), torch.float32, log=logs.append,
                               seed=1, **kw)
    assert not any("kept from" in m for m in logs) and other[0].rel_err > 0
    assert len(list((tmp_path / "refs").glob("forward-*.safetensors"))) == 2  # the seed-1 reference is kept too
    assert not list((tmp_path / "refs").glob("*.tmp"))
