"""In a real headless Chromium: the analyse page shows why an image is not read, and no score.

A radiologist uploads a real colour photograph and then a real adult film cut into a strip;
for each the page shows the uploaded image, the reason in words and the notes, the
disclaimer, and nothing that looks like an answer: no score table, no top findings, no
priority, no heatmap.  The product runs as a site runs it (``browser_stack``: `xray-triage
run` on the embedded default) and the browser is the ``chrome`` fixture of
tests/plugins/worklist_browser.py; the page helpers are the worklist browser test's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selenium.webdriver.common.by import By

from tests.plugins.worklist_browser import BrowserStack
from tests.test_analyse_scope import strip_png
from tests.test_image_scope import photograph
from tests.test_worklist_browser import assert_disclaimer, image_loaded, log_in, log_out, screenshot, wait, wait_page

NOT_READ = "Not scored – outside what the model reads: "


def upload(driver: Any, base: str, path: Path) -> Any:
    """Upload `path` on the analyse page; the analysis once it is there."""
    driver.get(base + "/analyse")
    wait_page(driver, lambda url: url == base + "/analyse", "the analyse page")
    driver.find_element(By.ID, "file").send_keys(str(path))
    driver.find_element(By.ID, "analyse-button").click()
    # The first upload loads the model into the web app: a generous wait.
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#analysis h2") and d.find_element(
        By.CSS_SELECTOR, "#analysis h2").text == path.name, f"the analysis of {path.name}", timeout=300)  # fmt: skip
    return driver.find_element(By.ID, "analysis")


def assert_nothing_scored(driver: Any, analysis: Any) -> None:
    for css in ("#analysis-scores", "#top-findings", "#analysis-priority", "img.heatmap", ".overlay-controls"):
        assert not analysis.find_elements(By.CSS_SELECTOR, css), css
    assert not driver.find_elements(By.ID, "analyse-error")
    assert "threshold" not in analysis.text.lower()


def test_analyse_page_shows_the_reason_and_no_score_for_images_it_does_not_read(
    browser_stack: BrowserStack, chrome: Any, tmp_path: Path
) -> None:
    driver, base = chrome, browser_stack.base_url
    driver.delete_all_cookies()
    log_in(driver, base)

    analysis = upload(driver, base, photograph())
    reason = analysis.find_element(By.ID, "ineligible")
    assert reason.is_displayed() and reason.text == NOT_READ + "colour image, not a radiograph"
    assert_nothing_scored(driver, analysis)
    shown = analysis.find_element(By.CSS_SELECTOR, "img.radiograph")
    wait(driver, lambda d: image_loaded(d, shown), "the uploaded photograph")
    assert shown.is_displayed() and driver.execute_script("return arguments[0].naturalWidth", shown) == 512
    assert "no DICOM header" in analysis.find_element(By.ID, "analysis-notes").text
    assert_disclaimer(driver)
    screenshot(driver, "analyse-ineligible.png")

    strip = tmp_path / "strip.png"
    strip.write_bytes(strip_png())
    analysis = upload(driver, base, strip)
    assert analysis.find_element(By.ID, "ineligible").text == NOT_READ + "image 2.6 times as wide as tall"
    assert_nothing_scored(driver, analysis)
    shown = analysis.find_element(By.CSS_SELECTOR, "img.radiograph")
    wait(driver, lambda d: image_loaded(d, shown), "the uploaded strip")
    assert driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", shown) == [512, 200]
    assert_disclaimer(driver)

    log_out(driver, base)
