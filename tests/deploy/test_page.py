"""The try-it page and the API docs in a real headless Chromium (Debian's `chromium` driven through
`chromedriver` by Selenium): a real image is uploaded through the page's file input, the drawn boxes
and their "class score" captions appear, and no request leaves the server. The screenshots are kept
in outputs/test-artifacts/ (or $DETR_TEST_ARTIFACTS). `make setup` installs the browser; CI fails
rather than skips without it."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.deploy.conftest import CLASSES, scene_pixels

ARTIFACTS = Path(os.environ.get("DETR_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[2] / "outputs" / "test-artifacts"))
# No network here, and none wanted: a fresh profile, nothing fetched in the background.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--window-size=1280,1000")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        message = "Debian's chromium and chromium-driver are not installed (`make setup` installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for downloads
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def requested_urls(driver) -> list[str]:
    """URLs the page asked for, less those the browser refused to send (Content-Security-Policy)."""
    urls, blocked = {}, set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls[message["params"]["requestId"]] = message["params"]["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and message["params"].get("blockedReason"):
            blocked.add(message["params"]["requestId"])
    return [url for request_id, url in urls.items() if request_id not in blocked]


def assert_only_local(urls: list[str], base: str) -> None:
    # chrome:// pages are the browser's own (its new-tab page), not requests over the network.
    network = [u for u in urls if u.split(":", 1)[0] in ("http", "https", "ws", "wss", "ftp")]
    assert any(u.startswith(base) for u in network), urls
    outside = [u for u in network if not u.startswith(base)]
    assert not outside, f"requests that left the server: {outside}"


def test_page_uploads_an_image_and_draws_the_detections(browser, detr_server, tmp_path):
    from selenium.webdriver.common.by import By

    base = detr_server.url
    image = tmp_path / "scene.jpg"
    Image.fromarray(scene_pixels(11, 320, 240)).save(image, quality=92)
    browser.get_log("performance")
    browser.get(f"{base}/")
    classes = wait_for(lambda: [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#classes li")],
                       what="the class list from /model/labels")
    assert classes == [f"{i}: {name}" for i, name in enumerate(CLASSES)]
    # Threshold 0 so that this randomly initialized model shows detections.
    browser.execute_script("const t = document.getElementById('threshold'); t.value = '0';"
                           "t.dispatchEvent(new Event('input'));")
    assert browser.find_element(By.ID, "threshold-value").text == "0.00"
    browser.find_element(By.ID, "files").send_keys(str(image))

    boxes = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".figure svg rect.box"), what="drawn boxes")
    captions = [t.text for t in browser.find_elements(By.CSS_SELECTOR, ".figure svg text.caption")]
    expected = httpx.post(f"{base}/model/predict", params={"score_threshold": 0.0},
                          files=[("image", ("scene.jpg", image.read_bytes(), "image/jpeg"))]).json()["predictions"][0]
    assert len(boxes) == len(captions) == len(expected["scores"]) > 0
    assert captions == [f"{name} {score:.2f}" for name, score in zip(expected["labels"], expected["scores"])]
    assert all(re.fullmatch(rf"({'|'.join(CLASSES)}) \d\.\d\d", c) for c in captions)
    first = boxes[0]
    x1, y1, x2, y2 = expected["boxes"][0]
    assert float(first.get_attribute("x")) == pytest.approx(x1, abs=1e-3)
    assert float(first.get_attribute("width")) == pytest.approx(x2 - x1, abs=1e-3)
    assert first.size["width"] > 0 or first.size["height"] > 0  # drawn on screen, not only in the DOM
    rows = browser.find_elements(By.CSS_SELECTOR, "table.detections tbody tr")
    assert len(rows) == len(expected["scores"])
    shown = json.loads(browser.find_element(By.CSS_SELECTOR, "pre.json").get_attribute("textContent"))
    assert shown["labels"] == expected["labels"] and shown["image_size"] == [320, 240]
    status = browser.find_element(By.ID, "status").text
    assert f"{len(expected['scores'])} detection(s) in 1 image(s)" in status

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve_page.png"))
    with Image.open(ARTIFACTS / "serve_page.png") as shot:
        assert shot.size[0] > 600
    assert_only_local(requested_urls(browser), base)
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe


def test_page_shows_the_servers_error_message(browser, detr_server, tmp_path):
    from selenium.webdriver.common.by import By

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"this is text")
    browser.get(f"{detr_server.url}/")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#classes li"), what="the class list")
    browser.find_element(By.ID, "files").send_keys(str(not_an_image))
    status = wait_for(lambda: "error" in browser.find_element(By.ID, "status").text
                      and browser.find_element(By.ID, "status").text, what="the error message")
    assert "error 400" in status and "not an image" in status


@pytest.mark.parametrize(("page", "selector", "title"), [
    ("docs", ".swagger-ui .info .title", "mlflow-detr object detector"),
    ("redoc", "h1", "mlflow-detr object detector"),
])
def test_api_docs_render_offline(browser, detr_server, page, selector, title):
    from selenium.webdriver.common.by import By

    browser.get_log("performance")
    browser.get(f"{detr_server.url}/{page}")
    heading = wait_for(lambda: [e.text for e in browser.find_elements(By.CSS_SELECTOR, selector) if title in e.text],
                       what=f"the {page} page's title")
    assert heading
    wait_for(lambda: "/model/predict" in browser.find_element(By.TAG_NAME, "body").text, what="the predict operation")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / f"serve_{page}.png"))
    assert_only_local(requested_urls(browser), detr_server.url)


def test_page_takes_a_dropped_image(browser, detr_server, tmp_path):
    """The drop zone: a PNG dropped on it (a real DragEvent carrying the file) is detected and drawn."""
    import base64
    import io

    from selenium.webdriver.common.by import By

    buffer = io.BytesIO()
    Image.fromarray(scene_pixels(12, 200, 150)).save(buffer, format="PNG")
    browser.get(f"{detr_server.url}/")
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#classes li"), what="the class list")
    browser.execute_script("""
        const t = document.getElementById('threshold'); t.value = '0'; t.dispatchEvent(new Event('input'));
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer, bubbles: true}));
    """, base64.b64encode(buffer.getvalue()).decode())
    boxes = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".figure svg rect.box"), what="drawn boxes")
    assert boxes
    assert "dropped.png — 200×150" in browser.find_element(By.CSS_SELECTOR, ".result h3").text
