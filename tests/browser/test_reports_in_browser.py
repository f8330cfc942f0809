"""A reviewer's view: the gallery and the reports opened from disk in headless Chromium."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a closed network: without them Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def finished_run(green_run) -> Path:
    """Outputs of the session's real pipeline run (CLI, embedded MLflow), as `make run` leaves them."""
    return green_run.outputs


@pytest.fixture
def screenshots(tmp_path) -> Path:
    """Where the tests' page screenshots go: `TAXI_SCREENSHOTS_DIR` (kept, to look at), else the test's temporary folder."""
    configured = os.environ.get("TAXI_SCREENSHOTS_DIR")
    if not configured:
        return tmp_path
    folder = Path(configured).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Chromium is not installed: `make browser-deps` installs Debian's chromium package")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


def _open(browser, url: str, screenshot: Path) -> tuple[object, list[str], list[str]]:
    """Load `url`; return the page, console/page errors and requests that left the disk."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    remote: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on(
        "request",
        lambda request: remote.append(request.url) if not request.url.startswith(("file:", "data:")) else None,
    )
    page.goto(url, wait_until="load")
    page.screenshot(path=str(screenshot), full_page=True)
    return page, errors, remote


def _image_states(page) -> list[tuple[bool, int]]:
    return page.eval_on_selector_all("img", "images => images.map(image => [image.complete, image.naturalWidth])")


def test_gallery_and_review_reports_render_offline(browser, finished_run, screenshots):
    gallery_page, errors, remote = _open(browser, (finished_run / "index.html").as_uri(), screenshots / "gallery.png")
    assert errors == [] and remote == []
    assert gallery_page.locator("tbody tr").count() == 1
    assert gallery_page.locator("tbody tr .status").inner_text() == "FINISHED"
    review_links = gallery_page.locator("a", has_text="review")
    assert review_links.count() == 3
    # The trend charts above the table load, and their alt text names the month they show.
    charts = gallery_page.locator("img.trend")
    assert charts.count() == 2
    assert all(complete and width > 0 for complete, width in _image_states(gallery_page)), "a trend chart did not load"
    assert charts.nth(0).get_attribute("alt").startswith("Validation RMSE by training month: green 2023-03 ")
    assert charts.nth(1).get_attribute("alt").startswith("Training trips (1-60 min) by month: green 2023-03 ")
    # The colour filter is a link to an anchor: no script, and the row stays (it is green).
    gallery_page.locator('a[href="#only-color-green"]').click()
    assert gallery_page.locator("tbody tr").first.is_visible()

    images_seen = 0
    for index in range(3):
        href = review_links.nth(index).get_attribute("href")
        report, errors, remote = _open(browser, (finished_run / href).as_uri(), screenshots / f"review-{index}.png")
        images = _image_states(report)
        assert images, f"{href} should show its plots"
        images_seen += len(images)
        assert all(complete and width > 0 for complete, width in images), f"an image in {href} did not load"
        alts = report.eval_on_selector_all("img", "images => images.map(image => image.alt)")
        assert all(alt and "No description" not in alt for alt in alts), f"a plot in {href} has no alt text: {alts}"
        assert errors == [], f"console errors in {href}: {errors}"
        assert remote == [], f"{href} fetched {remote}"
        assert report.locator(".jp-CodeCell .jp-InputArea-editor").count() == 0, "review reports hide code"
        report.close()
    assert images_seen >= 10, "5 plots in 01_explore, 1 in 02_features, 4 in 03_train"
    assert (screenshots / "review-2.png").stat().st_size > 10_000


def test_full_report_shows_code_and_the_failure_banner_is_visible(browser, finished_run, screenshots):
    full = next(finished_run.glob("green/2023-03/*/03_train.html"))
    page, errors, remote = _open(browser, full.as_uri(), screenshots / "full.png")
    assert errors == [] and remote == []
    assert page.locator(".jp-CodeCell .jp-InputArea-editor").count() > 5
    assert page.locator("#taxi-failure").count() == 0


def test_comparison_page_opens_from_the_gallery_offline(browser, real_months, screenshots):
    gallery, errors, remote = _open(
        browser, (real_months.outputs / "index.html").as_uri(), screenshots / "months-gallery.png"
    )
    assert errors == [] and remote == []
    rmse_chart = gallery.locator("img.trend").nth(0)
    assert rmse_chart.get_attribute("alt").startswith("Validation RMSE by training month: green 2023-01 ")
    assert "2023-02" in rmse_chart.get_attribute("alt")
    link = gallery.locator("a.comparison")
    assert link.count() == 1  # on the 2023-02 row; January has no earlier month
    link.click()
    gallery.wait_for_load_state("load")
    assert gallery.url.endswith(".html") and "/compare/" in gallery.url
    page, errors, remote = _open(browser, gallery.url, screenshots / "comparison.png")
    assert errors == [] and remote == []
    assert page.locator("h1").inner_text().startswith("green 2023-02 (run ")
    images = _image_states(page)
    assert len(images) >= 20, "the plots of both runs, side by side"
    assert all(complete and width > 0 for complete, width in images), "a figure in the comparison did not load"
    alts = page.eval_on_selector_all("img", "images => images.map(image => image.alt)")
    assert all("2023-01" in alt or "2023-02" in alt for alt in alts), alts
    assert page.locator("pre.diff .add").all_inner_texts() == [f"+{real_months.edit}"]
    assert page.locator("script").count() == 0
    assert (screenshots / "comparison.png").stat().st_size > 50_000


def test_hostile_output_does_not_run_in_the_report(browser, tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    from taxi_duration.review.reports import render_reports

    notebook = new_notebook(
        cells=[
            new_code_cell(
                "x",
                execution_count=1,
                outputs=[
                    new_output(
                        "display_data",
                        {"text/html": '<img src="nope" onerror="window.pwned=1"><script>window.pwned=2</script>'},
                    ),
                    new_output("display_data", {"application/javascript": "window.pwned = 3"}),
                    new_output("error", ename="ValueError", evalue="bad month", traceback=[]),
                ],
            )
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    path = tmp_path / "hostile.ipynb"
    nbformat.write(notebook, path)
    reports = render_reports(path)

    page, _, _ = _open(browser, reports.review.as_uri(), tmp_path / "hostile.png")
    assert page.evaluate("window.pwned === undefined")
    assert page.locator("#taxi-failure").is_visible()
    assert "ValueError: bad month" in page.locator("#taxi-failure").inner_text()
