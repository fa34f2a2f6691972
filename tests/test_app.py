"""The Gradio app (app.py), launched for real and driven two ways: through gradio_client and in headless Chromium.

One app is launched for the module (8 sampling steps, quick calibration budget) so the W8A8 model is
quantized once. The browser test needs Debian's `chromium` and `chromium-driver` (`make test` installs
them); it saves a screenshot in the test's temporary directory, and over docs/app_screenshot.png only when
WORKBENCH_UPDATE_SCREENSHOT=1 (a test run never rewrites a tracked file on its own).
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_SCREENSHOT = ROOT / "docs" / "app_screenshot.png"
STEPS = 8
PROMPT = "a red circle moving left"

gradio = pytest.importorskip("gradio", reason="the app extra (pip install -e '.[app]') is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, budget choice) of the launched app."""
    sys.path.insert(0, str(ROOT))
    import app as app_module
    from workbench.models import load_bundled

    demo = app_module.build_app(load_bundled(), out_dir=tmp_path_factory.mktemp("app"), steps=STEPS, budget="quick")
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", next(iter(app_module.BUDGETS))
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(app):
    from gradio_client import Client

    return Client(app[0], verbose=False, download_files=False)


def _check_result(result, budget_name):
    fp, q, diff, table, plot, status = result
    for v in (fp, q, diff):
        v = v.get("video", v) if isinstance(v, dict) else v
        assert v["path"].endswith(".webm"), v
        r = httpx.get(v["url"])  # served by the app, a real WebM file (EBML magic)
        assert r.status_code == 200 and r.content[:4] == bytes.fromhex("1a45dfa3") and len(r.content) > 500
    headers, rows = table["headers"], table["data"]
    assert headers[0] == "model" and [r[0] for r in rows] == ["FP", "W8A8 (vidit-q-w8a8)"]
    q_row = dict(zip(headers, rows[1]))
    assert 0.0 <= q_row["oracle_accuracy"] <= 1.0 and 0.0 < q_row["ssim_vs_fp"] <= 1.0
    assert plot is not None and "vidit-q-w8a8" in status and budget_name in status


def test_client_compare_queue_and_errors(client, app):
    url, budget = app
    first = client.predict(PROMPT, 0, STEPS, "W8A8", budget, api_name="/compare")
    _check_result(first, budget)

    # two users at once (4 steps to keep it short): both are queued and served, neither crashes
    jobs = [client.submit(p, 1, 4, "W8A8", budget, api_name="/compare")
            for p in ("a fast blue square moving up", "a green triangle moving right")]
    for j in jobs:
        _check_result(j.result(timeout=600), budget)

    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="outside the grammar.*purple"):
        client.predict("a purple circle moving left", 0, STEPS, "W8A8", budget, api_name="/compare")
    with pytest.raises(AppError, match="exactly one of"):
        client.predict("a red moving left", 0, STEPS, "W8A8", budget, api_name="/compare")
    assert client.predict("a fast blue square moving up", api_name="/check_prompt").startswith("Reads as: a fast blue square")
    assert "Vocabulary" in client.predict("a red dog", api_name="/check_prompt")


def _chromium():
    """(browser binary, driver binary) from Debian's chromium / chromium-driver packages."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("WORKBENCH_SKIP_BROWSER") == "1":
            pytest.skip("WORKBENCH_SKIP_BROWSER=1 and no chromium / chromedriver")
        pytest.fail("the browser test needs chromium and chromedriver: `apt-get install chromium chromium-driver` "
                    "(make test installs them)")
    return browser, driver


def test_browser_generate_shows_two_videos(app, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) is not installed")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = _chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1500",
                "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=opts)
    try:
        driver.get(app[0])
        WebDriverWait(driver, 60).until(EC.element_to_be_clickable((By.ID, "generate"))).click()

        def two_videos(d):
            vids = [d.find_elements(By.CSS_SELECTOR, f"#{i} video") for i in ("fp-video", "q-video")]
            srcs = [v[0].get_attribute("src") for v in vids if v]
            return len(srcs) == 2 and all(srcs) and srcs
        srcs = WebDriverWait(driver, 480, poll_frequency=1).until(two_videos)
        assert srcs[0] != srcs[1]
        WebDriverWait(driver, 30).until(lambda d: "vidit-q-w8a8" in d.find_element(By.ID, "status").text)
        # the browser can decode and play them: a known duration and a first frame
        for i in ("fp-video", "q-video"):
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                "const v = document.querySelector(arguments[0]); return v.readyState >= 2 && v.duration > 0;",
                f"#{i} video"))
        WebDriverWait(driver, 60).until(  # the per-layer error figure is drawn
            lambda d: d.find_elements(By.CSS_SELECTOR, "#layer-errors .js-plotly-plot .bars path"))
        screenshot = DOC_SCREENSHOT if os.environ.get("WORKBENCH_UPDATE_SCREENSHOT") == "1" else tmp_path / "app.png"
        driver.save_screenshot(str(screenshot))
        table = driver.find_element(By.ID, "metrics").text
        assert "FP" in table and "W8A8 (vidit-q-w8a8)" in table and "oracle_accuracy" in table
        assert screenshot.stat().st_size > 10_000

        # a prompt outside the grammar: a message under the box as it is typed, an error when submitted
        box = driver.find_element(By.CSS_SELECTOR, "#prompt input")
        box.clear()
        box.send_keys("a purple dog moving left", Keys.TAB)
        WebDriverWait(driver, 30).until(lambda d: "Not a prompt" in d.find_element(By.ID, "prompt-help").text)
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 60).until(lambda d: "purple" in d.find_element(By.TAG_NAME, "body").text
                                        and "outside the grammar" in d.find_element(By.TAG_NAME, "body").text)
    finally:
        driver.quit()


def test_app_on_a_pipeline_folder(tmp_path_factory):
    """`python app.py --model DIR` on a tiny random Wan pipeline: the same page, metrics without an oracle."""
    from gradio_client import Client

    import app as app_module
    from workbench.models import load_generator
    from workbench.models.random_pipelines import save_random_pipeline

    folder = save_random_pipeline("wan", tmp_path_factory.mktemp("pipe") / "wan")
    model = load_generator(str(folder))
    prompts, default = app_module.prompt_choices(model)
    assert default == model.eval_prompts()[0] and set(model.calibration_prompts(32, 0)) <= set(prompts)
    demo = app_module.build_app(model, out_dir=tmp_path_factory.mktemp("app-wan"), budget="quick")
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        help_text = client.predict("a red car moving left", api_name="/check_prompt")
        assert "the text encoder takes it" in help_text
        budget = next(iter(app_module.BUDGETS))
        fp, q, diff, table, plot, status = client.predict(default, 0, 2, "W8A8", budget, api_name="/compare")
        headers, rows = table["headers"], table["data"]
        q_row = dict(zip(headers, rows[1]))
        assert "oracle_accuracy" not in headers and 20 < q_row["psnr_vs_fp"] < 100 and plot is not None
        assert "temporal_diff_error_vs_fp" in headers and "vidit-q-w8a8" in status
        with pytest.raises(Exception, match="tokens"):
            client.predict("a red car " * 40, 0, 2, "W8A8", budget, api_name="/compare")
    finally:
        demo.close()
