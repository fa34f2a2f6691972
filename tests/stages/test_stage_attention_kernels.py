"""choose_attention_kernels: per-module fp8 / fp16 / full-precision attention from measured errors, applied to the
model and the quant config, kept through save and load."""
from __future__ import annotations

import pytest
import torch

from stage_helpers import W4A8_DYNAMIC, tiny_world_model
from workbench.io.rundir import load_quantized, save_quantized
from workbench.models.generator import GenerationSettings
from workbench.quant.attention import AttentionSpec
from workbench.session import Session
from workbench.stages import (AttentionKernelSettings, CalibrationSettings, PTQSettings, STAGES, apply_quantization,
                              choose_attention_kernels, collect_calibration)
from workbench.stages.attention_kernels import choose


@pytest.fixture(scope="module")
def quantized():
    session = Session.start(tiny_world_model(), seed=0)
    collect_calibration(session, CalibrationSettings(prompts=1, steps=2))
    apply_quantization(session, PTQSettings(quant=W4A8_DYNAMIC))
    return session


def _fresh(quantized):
    import copy
    s = copy.copy(quantized)
    s.qtransformer = copy.deepcopy(quantized.qtransformer)
    s.reports, s.state = list(quantized.reports), dict(quantized.state)
    return s


def test_choose_takes_the_cheapest_format_within_tolerance():
    assert choose({"fp8": 0.03, "fp16": 0.01}, 0.05) == "fp8"
    assert choose({"fp8": 0.08, "fp16": 0.01}, 0.05) == "fp16"
    assert choose({"fp8": 0.08, "fp16": 0.06}, 0.05) == "bf16"
    assert choose({}, 0.05) == "bf16"  # never measured: the kernel never took a call


def test_stage_measures_chooses_and_applies(quantized, tmp_path):
    session = _fresh(quantized)
    # a tolerance between the modules' fp8 and fp16 errors gives a mixed plan; find it from a first measurement
    r = choose_attention_kernels(session, AttentionKernelSettings(tolerance=10.0, calls=2, min_tokens=0))
    rows = r.tables["modules"]
    assert len(rows) == 4 and all(row["choice"] == "fp8" and row["calls"] == 2 for row in rows)
    assert all(0 < row["err_fp16"] < row["err_fp8"] < 0.5 for row in rows)
    assert r.figures() and STAGES["choose_attention_kernels"].fn is choose_attention_kernels

    session = _fresh(quantized)
    worst = max(rows, key=lambda row: row["err_fp8"])
    tol = (worst["err_fp8"] + max(row["err_fp8"] for row in rows if row is not worst)) / 2
    tol = max(tol, worst["err_fp16"] * 1.01)
    r = choose_attention_kernels(session, AttentionKernelSettings(tolerance=tol, calls=2, min_tokens=0))
    chosen = {row["module"]: row["choice"] for row in r.tables["modules"]}
    assert chosen[worst["module"]] == "fp16" and list(chosen.values()).count("fp8") == 3
    cfg = session.quant_config
    assert cfg.attention_for(worst["module"]) == AttentionSpec.kernel_only("fp16", 0)
    for name, choice in chosen.items():
        assert session.qtransformer.get_submodule(name).quant_attention.spec.kernel == choice

    # an impossible tolerance keeps everything in full precision (keep_fp), and the model unwrapped
    strict = _fresh(quantized)
    r = choose_attention_kernels(strict, AttentionKernelSettings(tolerance=1e-9, calls=1, min_tokens=0))
    assert r.summary["bf16_modules"] == 4 and all(strict.quant_config.is_fp(n) for n in chosen)
    assert not any(hasattr(strict.qtransformer.get_submodule(n), "quant_attention") for n in chosen)

    # save -> load: the plan comes back and the loaded model generates the same video
    save_quantized(session, tmp_path / "run")
    gen, qt, _ = load_quantized(tmp_path / "run")
    assert all(qt.get_submodule(n).quant_attention.spec.kernel == c for n, c in chosen.items())
    settings = GenerationSettings(steps=2)
    want = session.fp_model.generate(["a red circle moving right"], [1], settings, transformer=session.qtransformer)
    assert torch.equal(gen.generate(["a red circle moving right"], [1], settings, transformer=qt), want)


def test_stage_errors(quantized):
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        AttentionKernelSettings(tolerance=0)
    with pytest.raises(ValueError, match="calls must be >= 1"):
        AttentionKernelSettings(calls=0)
    with pytest.raises(ValueError, match="collect_calibration"):
        choose_attention_kernels(Session.start(tiny_world_model()))
    fake = Session.start(tiny_world_model(), seed=0)
    fake.calibration = quantized.calibration
    apply_quantization(fake, PTQSettings(quant={**W4A8_DYNAMIC, "attention": {}}))
    with pytest.raises(ValueError, match="fake-quantizes attention"):
        choose_attention_kernels(fake, AttentionKernelSettings(min_tokens=0))
