"""The web page in a real browser: Playwright driving Debian's chromium against the served app.

`make test` installs chromium when it can (Makefile `browser`); without it these tests skip and say
why. MOTIONDIRECTOR_SCREENSHOTS=DIR also saves the screenshots there (README's come from docs/img).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
CHROMIUM = Path(os.environ.get("MOTIONDIRECTOR_CHROMIUM", "/usr/bin/chromium"))


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("BROWSER TESTS SKIPPED: the playwright package is not installed (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        pytest.skip(f"BROWSER TESTS SKIPPED: no chromium at {CHROMIUM}; install it with "
                    "`apt-get install chromium` (make test does when it runs as root)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True)
        try:
            yield browser
        finally:
            browser.close()


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    path = page.screenshot(path=str(tmp_path / name), full_page=True) and tmp_path / name
    target = os.environ.get("MOTIONDIRECTOR_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def test_catalog_grid_search_and_entry_page(serve_app, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(serve_app.url + "/")
    cards = page.locator("#grid .card")
    cards.first.wait_for()
    assert cards.count() == 6
    assert page.locator("#catalog-status").inner_text() == "6 LoRAs"
    # Previews are fetched by the page and shown (orbit and other-base have none).
    page.wait_for_function("document.querySelectorAll('#grid .card img').length === 4")
    page.wait_for_function("[...document.querySelectorAll('#grid .card img')].every(i => i.complete && i.naturalWidth === 32)")
    save_screenshot(page, tmp_path, "serve-grid.png")

    page.fill("#f-text", "square")
    page.click("#filters button[type=submit]")
    page.wait_for_function("document.querySelectorAll('#grid .card').length === 1")
    assert page.locator("#grid .card strong").inner_text() == "red-square"
    page.fill("#f-text", "")
    page.select_option("#f-kind", "temporal")
    page.click("#filters button[type=submit]")
    page.wait_for_function("document.querySelector('#catalog-status').textContent === '4 LoRAs'")
    assert {card.get_attribute("data-kind") for card in page.locator("#grid .card").all()} == {"temporal"}

    page.click(f"#grid .card[data-id='{serve_app.ids['bounce']}']")
    page.wait_for_selector("#entry-name")
    assert page.locator("#entry-name").inner_text() == "bounce"
    assert page.locator("#entry-lineage a").inner_text() == serve_app.ids["zigzag"]
    assert '"kind": "temporal"' in page.locator("#entry-manifest").inner_text()
    page.wait_for_function("document.querySelector('#view-entry .preview img')?.naturalWidth === 32")
    assert not errors, errors


def test_generate_form_shows_progress_and_plays_the_video(serve_app, browser, tmp_path):
    ids = serve_app.ids
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(serve_app.url + "/#/generate")
    page.wait_for_function(f"[...document.querySelectorAll('#g-add-motion option')].some(o => o.value === '{ids['zigzag']}')")
    page.select_option("#g-add-motion", ids["zigzag"])
    page.select_option("#g-add-motion", ids["bounce"])
    assert page.locator("#g-motions .motion").count() == 2
    page.locator(f"#g-motions .motion[data-id='{ids['bounce']}'] .motion-scale").fill("0.5")
    page.select_option("#g-appearance", ids["red-square"])
    page.fill("#g-prompt", "a red square zigzagging")
    page.fill("#g-seed", "7")
    page.fill("#g-steps", "4")
    page.click("#g-submit")
    page.wait_for_selector("#job-status.done", timeout=120_000)
    assert page.locator("#job-progress").evaluate("p => p.value") == 1
    assert "seed 7" in page.locator("#job-status").inner_text()
    # The mp4 plays (decoded frames, a duration) and the gif shows.
    page.wait_for_function("(() => { const v = document.querySelector('#result-video');"
                           " return v && v.readyState >= 2 && v.duration > 0 && v.videoWidth === 32; })()",
                           timeout=30_000)
    page.wait_for_function("document.querySelector('#result-gif').naturalWidth === 32")
    save_screenshot(page, tmp_path, "serve-generation.png")

    # What the form sent is what the server used.
    import httpx

    jobs_status = page.locator("#job-status").inner_text()
    with httpx.Client(base_url=serve_app.url) as http:
        stats = http.get("/readyz").json()["jobs"]
    assert stats["done"] >= 1 and "Done" in jobs_status
    assert not errors, errors


def test_the_page_refuses_clearly_when_the_server_does(serve_app, browser):
    page = browser.new_page()
    page.goto(serve_app.url + "/#/generate")
    page.wait_for_function(f"[...document.querySelectorAll('#g-appearance option')].some(o => o.value === '{serve_app.ids['red-square']}')")
    page.select_option("#g-appearance", serve_app.ids["red-square"])
    page.fill("#g-frames", "999")
    page.click("#g-submit")
    page.wait_for_selector("#job-status.error")
    assert "422" in page.locator("#job-status").inner_text() and "(frames)" in page.locator("#job-status").inner_text()
