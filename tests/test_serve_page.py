"""The web page in a real browser (Debian's chromium through Playwright) against a live server."""

from pathlib import Path

import httpx
import pytest
from browser import classify_in_page, launch, live_server
from playwright.sync_api import expect, sync_playwright

from lcpn.fsio import read_csv
from lcpn.serve import create_app

PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


def test_the_page_shows_the_api_path_for_two_uploads_and_toggles_a_heatmap(browser, finetuned, split, tmp_path):
    images = [Path(row["path"]) for row in read_csv(split / "test.csv")[:2]]
    with live_server(create_app(finetuned, device="cpu")) as url:
        page = browser.new_page(viewport=PHONE)
        shown = classify_in_page(page, url, images)
        files = [("files", (p.name, p.read_bytes())) for p in images]
        answered = httpx.post(f"{url}/v1/predict", files=files, timeout=120).json()["predictions"]
        assert shown == {a["image"]: " > ".join(a["path"]) for a in answered}

        heat = page.locator(".card .heat").first
        button = page.locator(".card").first.locator(".stages button").first
        expect(heat).to_be_hidden()
        button.focus()
        page.keyboard.press("Enter")  # keyboard, not only the mouse
        expect(button).to_have_attribute("aria-pressed", "true")
        expect(heat).to_be_visible()
        assert heat.get_attribute("src").startswith("data:image/png;base64,")
        page.screenshot(path=tmp_path / "serve.png", full_page=True)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # no sideways scrolling
        button.click()
        expect(heat).to_be_hidden()

        page.get_by_role("tab", name="Classify").press("ArrowRight")
        expect(page.get_by_role("tab", name="Class tree")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#tree")).to_contain_text("val accuracy")
        expect(page.locator("#tree")).to_contain_text("constant (one child)")
    assert (tmp_path / "serve.png").stat().st_size > 10_000


def test_the_page_does_not_ask_an_onnx_server_for_heatmaps(browser, finetuned, split, tmp_path):
    from lcpn.export import export

    export(finetuned, tmp_path / "onnx")
    images = [Path(row["path"]) for row in read_csv(split / "test.csv")[:1]]
    with live_server(create_app(tmp_path / "onnx", runtime="onnx")) as url:
        page = browser.new_page(viewport=PHONE)
        asked = []
        page.on("request", lambda request: asked.append(request.url))
        shown = classify_in_page(page, url, images)
        assert list(shown.values())[0]  # classified: a path is shown
        expect(page.locator(".card .stages")).to_contain_text("No heatmaps: this server runs the onnx export")
    assert any("/v1/predict?" in u for u in asked)
    assert not any("/v1/explain" in u for u in asked)
