import pytest

from workbench.demo import run_demo
from workbench.evaluation import EvalSettings


def test_demo_writes_a_self_contained_report(tmp_path):
    settings = EvalSettings(prompts=("a red circle moving left", "a fast cyan cross moving down"), steps=2)
    path = run_demo(tmp_path / "demo", settings=settings)
    html = path.read_text()
    assert html.count("data:image/gif;base64") == 2
    assert "oracle_accuracy" in html and "<table>" in html
    assert (tmp_path / "demo" / "metrics.json").is_file()
    with pytest.raises(FileExistsError, match="--force"):
        run_demo(tmp_path / "demo", settings=settings)
