"""The evaluation report: its content, and the page opened in a real headless Chromium (Selenium)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from policies.report import write_report
from policies.video import DEFAULT, FAILURE_RGB, SUCCESS_RGB, VideoConfig, compose_frame, write_episode_video

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",  # needed as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
WAIT_S = 20.0  # deadline for the page's videos and image to load


def _results(task: str = "pointmaze") -> dict[str, Any]:
    """Results shaped like tools/eval.py's results.json."""
    return {
        "episodes": 2,
        "success_rate": 0.5,
        "mean_final_distance": 0.125,
        "mean_max_score": None,
        "planning_seconds_per_replan_per_episode": 0.05,
        "planning_seconds_per_step": 0.0123,
        "action_seconds_per_step": 0.0150,
        "wall_seconds": 12.5,
        "per_episode": [
            {"seed": 1000, "success": True, "steps": 40, "final_distance": 0.02, "max_score": None},
            {"seed": 1001, "success": False, "steps": 100, "final_distance": 0.23, "max_score": None},
        ],
        "task": task,
        "controller": "policy",
        "checkpoint": "runs/dp",
        "inference": {"sampler": "edm", "sampler_steps": 3, "precision": "bf16"},
        "seeds": [1000, 1001],
    }


def _videos(tmp_path: Path, cfg: VideoConfig = DEFAULT) -> list[Path]:
    rng = np.random.default_rng(0)
    frames = [compose_frame(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), cfg=cfg) for _ in range(6)]
    return [
        write_episode_video(
            tmp_path / "videos" / f"episode_{s:04d}.mp4", frames, 10, s == 1000, seed=s, cfg=cfg
        )
        for s in (1000, 1001)
    ]


def _plot(tmp_path: Path) -> Path:
    path = tmp_path / "success_vs_budget.png"
    Image.new("RGB", (160, 120), (40, 90, 200)).save(path)
    return path


def test_report_content_is_escaped_and_self_contained(tmp_path: Path) -> None:
    results = _results(task="<b>maze</b> & co")
    results["budgets"] = [{"iterations": 5, "success_rate": 0.25, "planning_seconds_per_step": 0.004}]
    path = write_report(tmp_path, results, _videos(tmp_path), _plot(tmp_path))
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    assert "&lt;b&gt;maze&lt;/b&gt; &amp; co" in page and "<b>maze" not in page
    assert "50.0 % (1 / 2)" in page and "12.3 ms" in page and "bf16" in page
    assert "mean max score" not in page  # None: the row is left out
    assert page.count("<video ") == 2 and page.count('src="data:video/mp4;base64,') == 2
    assert 'src="data:image/png;base64,' in page and "episode 1001 failure" in page
    assert re.search(r"(src|href)=\"(?!data:)", page) is None  # nothing loaded from outside the file
    assert re.search(r"<td[^>]*>\s*25\.0 %", page)  # the budget table


def test_report_says_which_episodes_were_stopped_and_why(tmp_path: Path) -> None:
    results = _results()
    results["errors"] = 1
    results["per_episode"][1]["error"] = "non-finite action at step 3: [nan, nan]"
    page = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert re.search(r"episodes stopped \(non-finite action, a failure\)</th><td>1<", page)
    assert "<th>error</th>" in page and "<td>non-finite action at step 3: [nan, nan]</td>" in page
    page = write_report(tmp_path, _results()).read_text(encoding="utf-8")
    assert "episodes stopped" not in page and "<th>error</th>" not in page
    assert "cut short" not in page


def test_report_counts_the_steps_the_task_cut_short(tmp_path: Path) -> None:
    results = _results()
    results["clipped_steps"] = 7
    page = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert re.search(r"steps cut short by the task \(action limits, workspace\)</th><td>7<", page)


def test_report_without_videos_or_plot(tmp_path: Path) -> None:
    results = {"success_rate": 0.0, "episodes": 1, "mean_max_score": 0.75, "per_episode": []}
    page = write_report(tmp_path, results).read_text(encoding="utf-8")
    assert "<video" not in page and "<img" not in page and "0.750" in page and "0.0 %" in page


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Headless Debian Chromium through chromedriver; every command has a deadline; quit on teardown."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"needs Chromium ({CHROMIUM}) and chromedriver ({CHROMEDRIVER}): "
            "apt-get install -y chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    # explicit paths: Selenium Manager (which would download drivers) is never run;
    # starting is bounded by the service's connect loop and the connection's 120 s HTTP timeout
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.command_executor.client_config.timeout = 60  # seconds per WebDriver HTTP command
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(10)
        yield driver
    finally:
        driver.quit()


_VIDEO_STATE = """return Array.from(document.querySelectorAll('video')).map(v => ({
    ready: v.readyState, width: v.videoWidth, height: v.videoHeight, error: v.error && v.error.code}));"""
# the decoded first frame drawn to a canvas: the pixel (x, y) as [r, g, b, a]
_PIXEL = """const v = document.querySelectorAll('video')[arguments[0]];
const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
const g = c.getContext('2d'); g.drawImage(v, 0, 0);
return Array.from(g.getImageData(arguments[1], arguments[2], 1, 1).data);"""


def _open_and_wait(driver: Any, page: Path, n_videos: int) -> list[dict]:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.as_uri())

    def decoded(d: Any) -> list[dict] | bool:
        state = d.execute_script(_VIDEO_STATE)
        if any(s["error"] for s in state):
            raise AssertionError(f"Chromium could not play a video: {state}")
        ready = len(state) == n_videos and all(s["ready"] >= 2 and s["width"] > 0 for s in state)
        return state if ready else False

    # readyState >= 2 (HAVE_CURRENT_DATA): a frame has been decoded, not just the header parsed
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(
        decoded, message=f"videos not decoded within {WAIT_S} s: {driver.execute_script(_VIDEO_STATE)}"
    )


def _assert_banner(driver: Any, index: int, rgb: tuple[int, int, int]) -> None:
    pixel = driver.execute_script(_PIXEL, index, 4, 4)
    assert np.abs(np.array(pixel[:3]) - rgb).max() < 20, (index, pixel, rgb)


def test_report_plays_in_chromium(tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    videos = _videos(tmp_path)
    page = write_report(tmp_path, _results(task="<maze>"), videos, _plot(tmp_path))
    state = _open_and_wait(browser, page, n_videos=2)

    cell = browser.find_element(By.XPATH, "//th[text()='success rate']/following-sibling::td")
    assert cell.text == "50.0 % (1 / 2)"
    assert browser.find_element(By.TAG_NAME, "h1").text == "<maze>: policy"  # escaped, shown literally
    assert len(browser.find_elements(By.TAG_NAME, "video")) == 2
    with Image.open(_plot(tmp_path)) as img:
        expected = img.size
    assert [(s["width"], s["height"]) for s in state] == [_video_size(v) for v in videos]
    _assert_banner(browser, 0, SUCCESS_RGB)  # the decoded pixels, not only the metadata
    _assert_banner(browser, 1, FAILURE_RGB)
    plot = browser.execute_script(
        "const i = document.getElementById('plot'); return [i.complete, i.naturalWidth, i.naturalHeight];"
    )
    assert plot == [True, *expected]
    rows = browser.find_elements(By.CSS_SELECTOR, "#episodes tr")
    assert [r.text.split()[:2] for r in rows[1:]] == [["1000", "success"], ["1001", "failure"]]


def test_webm_vp9_plays_in_chromium(tmp_path: Path, browser: Any) -> None:
    videos = _videos(tmp_path, VideoConfig(codec="vp9"))
    assert [v.suffix for v in videos] == [".webm", ".webm"]
    page = write_report(tmp_path, _results(), videos, None)
    _open_and_wait(browser, page, n_videos=2)
    _assert_banner(browser, 0, SUCCESS_RGB)
    _assert_banner(browser, 1, FAILURE_RGB)


def _video_size(path: Path) -> tuple[int, int]:
    import imageio.v2 as imageio

    with imageio.get_reader(path) as reader:
        return tuple(reader.get_meta_data()["size"])


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_a_missing_or_nan_figure_is_a_dash_not_a_crash(tmp_path, missing):
    """A success rate stored as null (results.json has no NaN) raised a TypeError; a NaN one read
    "nan %"."""
    results = {
        "task": "t",
        "success_rate": missing,
        "wall_seconds": missing,
        "planning_seconds_per_step": missing,
        "budgets": [{"iterations": 5, "success_rate": missing, "planning_seconds_per_step": None}],
    }
    page = write_report(tmp_path, results).read_text()
    assert "nan" not in page.lower()
    assert "<tr><th>success rate</th><td>-</td></tr>" in page and "<tr><td>5</td><td>-</td>" in page
    if missing is not None:  # None leaves the timing rows out
        assert "<tr><th>wall time</th><td>-</td></tr>" in page
        assert "<tr><th>planning time per step</th><td>-</td></tr>" in page
