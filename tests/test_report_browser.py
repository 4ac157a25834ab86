"""The report page as a reader sees it: rendered by headless Chromium at a narrow (900 px) window."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

BROWSER = next((path for name in BROWSERS if (path := shutil.which(name))), None)  # the first one on PATH


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--allow-file-access-from-files", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(BROWSER is None, reason="no headless Chromium on PATH (install it: apt-get install chromium)")
def test_report_page_renders_in_headless_chromium_with_its_legends_captions_and_tables(tmp_path):
    from PIL import Image

    from pipelines.report import ReportConfig, build_report
    from pipelines.report.pictures import PALETTE
    from test_report import _oracle_store

    store, urls, classes = _oracle_store(tmp_path)
    out = tmp_path / "report"
    r = build_report(ReportConfig(store=store, labeler="oracle", out=str(out), masks=tuple(urls), samples=2,
                                  classes_file=classes))
    page = (out / "index.html").as_uri()

    dom = _chromium(BROWSER, "--dump-dom", page)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert len(re.findall(r'<ul class="legend">', html)) >= 2 * len(r["samples"]) + 1  # argmax + Gumbel each, charts
    assert len(re.findall(r"<figcaption>", html)) == 2 + sum(len(s["panels"]) for s in r["samples"])
    assert '<table id="numbers">' in html and "foreground when" in html  # numbers and the mask table
    assert "random weights (no checkpoint)" in html and "view's fill" in html

    shot = tmp_path / "page.png"
    run = _chromium(BROWSER, f"--screenshot={shot}", "--window-size=900,3000", page)
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[1] == 900 and pixels.std() > 20  # not a blank page
    images = [np.asarray(Image.open(out / p["file"]).convert("RGB")) for s in r["samples"] for p in s["panels"]]
    assert all(img.std() > 5 for img in images)  # every panel PNG has a picture in it
    # The legends' swatches are drawn by the browser in the palette's exact colours.
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7]}
    assert tuple(PALETTE[0]) in colours
