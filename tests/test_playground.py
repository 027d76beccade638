"""The playground page in a real browser: headless Chromium (Debian's package) driven by
Playwright against a live ``lmlab serve`` on a tiny model.

To enable: ``apt-get install chromium`` and ``pip install playwright`` (no browser download:
the tests launch /usr/bin/chromium, or the path in $LMLAB_CHROMIUM). Set
$LMLAB_PLAYGROUND_SCREENSHOT to a file name to keep the screenshot.
"""

import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="lmlab serve needs fastapi and uvicorn: pip install 'lmlab[serve]'")
pytest.importorskip("uvicorn", reason="lmlab serve needs fastapi and uvicorn: pip install 'lmlab[serve]'")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need Playwright: pip install playwright")

from serve_helpers import live_server, make_checkpoint  # noqa: E402

from lmlab.checkpoints import load_checkpoint  # noqa: E402
from lmlab.serve.app import create_app  # noqa: E402

CHROMIUM = os.environ.get("LMLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"browser tests need Chromium at {CHROMIUM}: apt-get install chromium (or set LMLAB_CHROMIUM)",
                allow_module_level=True)

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    directory = make_checkpoint(tmp_path_factory.mktemp("playground") / "tiny", block_size=64)
    model, tokenizer = load_checkpoint(str(directory))
    with live_server(create_app(model, tokenizer, "tiny")) as base:
        yield base


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('model-info').textContent.includes('transformer')")
        yield page
        browser.close()
        assert not errors, errors


def completion(url, **body):
    return httpx.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 20, "seed": 0, **body},
                      timeout=60).json()["choices"][0]["text"]


def test_generate_and_compare_two_setups(page, url):
    page.fill("#max-tokens", "20")
    page.click("#generate")
    page.wait_for_function("[...document.querySelectorAll('.column .finish')].every(e => e.textContent.startsWith('finish'))")
    columns = page.locator(".column")
    assert columns.count() == 2
    texts = [columns.nth(i).locator(".token").all_text_contents() for i in range(2)]
    assert "".join(texts[0]) == completion(url, temperature=0)
    assert "".join(texts[1]) == completion(url, temperature=0.8, top_k=20, top_p=0.95)
    # tokens are coloured by their probability
    colours = {columns.nth(1).locator(".token").nth(i).evaluate("e => e.style.background") for i in range(5)}
    assert all(c.startswith("rgb") for c in colours)


def test_hover_shows_alternatives_before_and_after_processors(page):
    if not page.locator(".column .token").count():
        page.click("#generate")
        page.wait_for_selector(".column .token")
    page.locator(".column").nth(1).locator(".token").nth(1).hover()
    tip = page.locator("#tooltip")
    tip.wait_for(state="visible")
    rows = tip.locator("tr")
    assert rows.count() == 6  # a header and the top 5 alternatives
    assert "model" in rows.nth(0).inner_text() and "processed" in rows.nth(0).inner_text()
    assert "%" in rows.nth(1).inner_text()


def test_temperature_slider_changes_the_bar_chart_and_a_click_appends_a_token(page):
    page.wait_for_function("document.querySelectorAll('#chart .bar').length === 20")
    heights = lambda: page.eval_on_selector_all("#chart .processed-bar", "bs => bs.map(b => b.getAttribute('height'))")  # noqa: E731
    before = heights()
    page.locator("#temperature").fill("0.3")
    page.wait_for_function("document.getElementById('temperature-value').textContent === '0.3'")
    page.wait_for_function("before => JSON.stringify([...document.querySelectorAll('#chart .processed-bar')]"
                           ".map(b => b.getAttribute('height'))) !== JSON.stringify(before)", arg=before)
    assert heights() != before
    page.locator("#top-k").fill("3")
    page.wait_for_selector("#chart line.cutoff", state="attached")
    page.wait_for_function("document.querySelectorAll('#chart .processed-bar[height=\"0\"]').length === 17")
    prompt = page.input_value("#prompt")
    page.locator("#chart .bar").first.click()
    assert len(page.input_value("#prompt")) > len(prompt)
    page.fill("#prompt", "ROMEO:")


def test_attention_heatmap_and_screenshot(page, tmp_path):
    page.fill("#prompt", "ROMEO: hi")
    page.select_option("#layer", "1")
    page.click("#show-attention")
    page.wait_for_selector("#heatmap td.cell")
    assert page.locator("#heatmap td.cell").count() == 9 * 9
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("LMLAB_PLAYGROUND_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
