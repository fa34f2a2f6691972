import json
import re

import pytest

from workbench.cli.commands import main
from workbench.eval.compare import CalibrationBudget, scaled_recipe
from workbench.cli.demo import run_demo
from workbench.eval.prompt_set import EvalSettings

PROMPTS = ("a red circle moving left", "a fast cyan cross moving down")
TINY = CalibrationBudget(prompts=1, steps=2)


def _self_contained(html: str) -> None:
    markup = re.sub(r"<script[^>]*>.*?</script>", "", html, flags=re.S)  # inlined plotly.js mentions URLs in strings
    assert not re.search(r"""(src|href)=["']?https?://""", markup), "the page must not load anything from the network"
    assert not re.search(r"""<script[^>]+src=""", html), "scripts must be inlined"


def test_demo_writes_one_self_contained_page_with_fp_and_a_recipe(tmp_path):
    settings = EvalSettings(prompts=PROMPTS, steps=2)
    path = run_demo(tmp_path / "demo", settings=settings, recipes=("naive-w8a8",), budget=TINY, progress=False)
    html = path.read_text()
    assert html.count("data:image/gif;base64") == 4  # FP and naive-w8a8, two prompts each
    assert "Stages of naive-w8a8" in html and "Stage: collect_calibration" in html
    assert html.count("plotly.js v") <= 1 and "Plotly.newPlot" in html  # plotly inlined once, figures drawn
    _self_contained(html)
    rows = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert [r["model"] for r in rows] == ["FP", "naive-w8a8"]
    assert rows[1]["avg_weight_bits"] == 8.0 and rows[0]["avg_weight_bits"] == 32.0
    assert 0.0 <= rows[1]["ssim_vs_fp"] <= 1.0 and rows[1]["weight_mb"] < rows[0]["weight_mb"]
    with pytest.raises(FileExistsError, match="--force"):
        run_demo(tmp_path / "demo", settings=settings, recipes=(), progress=False)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    """Two quantized models saved as `workbench quantize` does (tiny calibration to stay fast)."""
    from workbench.io.rundir import save_quantized
    from workbench.models import load_bundled
    from workbench.recipes import run_recipe

    model = load_bundled()
    root = tmp_path_factory.mktemp("quantized")
    dirs = []
    for name in ("naive-w8a8", "naive-w4a8"):
        session = run_recipe(model, scaled_recipe(name, TINY), seed=0)
        dirs.append(str(save_quantized(session, root / name)))
    return dirs


def test_report_command_compares_saved_models(saved_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "page" / "report.html"
    args = ["report", *saved_models, "--out", str(out), "--steps", "2", "--prompts", str(prompts)]
    assert main(args) == 0
    assert str(out) in capsys.readouterr().out
    html = out.read_text()
    assert html.count("data:image/gif;base64") == 6  # FP + two recipes, two prompts each
    for name in ("naive-w8a8", "naive-w4a8"):
        assert f"Stages of {name}" in html
    _self_contained(html)
    rows = json.loads((out.parent / "metrics.json").read_text())
    assert [r["model"] for r in rows] == ["FP", "naive-w8a8", "naive-w4a8"]
    assert rows[1]["avg_weight_bits"] == 8.0 and rows[2]["avg_weight_bits"] == 4.0
    assert rows[2]["directory"] == saved_models[1]

    assert main(args) == 2  # refuses to overwrite
    assert "--force" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "x.html")]) == 2
    assert "workbench quantize" in capsys.readouterr().err
    assert main(["report", saved_models[0], "--out", str(tmp_path / "x.txt")]) == 2
    assert ".html" in capsys.readouterr().err
