"""The operator page in headless Chromium: enter the API key, upload a generated defect image, see the result.

Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver) and the
`selenium` package (dev extra). Selenium is given the system chromedriver, so nothing is downloaded.
Skipped only when no Chromium binary exists.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from service.localserver import free_port

pytestmark = pytest.mark.browser

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
KEY = "operator-key-0123456789"


@contextmanager
def running(app: Any) -> Iterator[str]:
    """`app` under uvicorn on 127.0.0.1, in a thread of this process; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def live_url(make_settings: Any, model_dir: Any, calibrate_bundle: Any) -> Iterator[str]:
    """The real app, with an API key and a calibrated model."""
    from service.app.main import create_app

    calibrate_bundle(model_dir / "toy", image_threshold=2.0)
    with running(create_app(make_settings(model_dir=model_dir, api_keys=KEY))) as url:
        yield url


@pytest.fixture
def browser(tmp_path: Any) -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("no chromium binary; install it with: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    driver_path = shutil.which("chromedriver")
    assert driver_path, "chromium is installed but chromedriver is not: apt-get install -y chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1000",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_operator_page_shows_score_verdict_overlay_and_regions(browser, live_url, images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 20)
    browser.get(live_url + "/")
    assert browser.title == "anoscope · inspection"

    # The service needs a key: the page says so and asks for it.
    key_field = wait.until(lambda d: d.find_element(By.ID, "api-key") if d.find_element(By.ID, "api-key")
                           .is_displayed() else None)  # fmt: skip
    assert "needs an API key" in browser.find_element(By.ID, "error").text
    key_field.send_keys(KEY)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key_field)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option[value='toy']"))
    assert "calibrated" in browser.find_element(By.ID, "model-info").text

    width, height = 160, 120
    defect = tmp_path / "defect.png"
    defect.write_bytes(images.make(width, height))
    upload = browser.find_element(By.ID, "file")
    browser.execute_script("arguments[0].style.display = 'block'", upload)
    upload.send_keys(str(defect))
    wait.until(lambda d: d.find_element(By.ID, "result").get_attribute("data-rendered") == "true")

    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    assert browser.find_element(By.ID, "filename").text == "defect.png"
    assert float(browser.find_element(By.ID, "score").text) > 0.5
    verdict = browser.find_element(By.ID, "verdict")
    assert verdict.text == "anomalous" and verdict.get_attribute("data-verdict") == "anomalous"
    natural = browser.execute_script(
        "const i = document.getElementById('overlay'); return [i.complete, i.naturalWidth, i.naturalHeight];"
    )
    assert natural == [True, width, height]  # the overlay heatmap decoded, at the input's size
    boxes = browser.find_elements(By.CSS_SELECTOR, "#boxes rect.region")
    assert len(boxes) >= 1
    assert browser.find_element(By.ID, "region-count").text == str(len(boxes))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#regions tbody tr")) == len(boxes)
    x, y, w, h = (int(boxes[0].get_attribute(a)) for a in ("x", "y", "width", "height"))
    dx, dy, dw, dh = images.box(width, height)
    assert x < dx + dw and dx < x + w and y < dy + dh and dy < y + h  # the drawn box is on the defect
    assert boxes[0].is_displayed() and boxes[0].size["width"] > 0
    browser.save_screenshot(str(tmp_path / "operator-page.png"))
    if os.environ.get("OPERATOR_PAGE_SCREENSHOT"):
        shutil.copy(tmp_path / "operator-page.png", os.environ["OPERATOR_PAGE_SCREENSHOT"])

    # A good part: normal verdict, no boxes.
    good = tmp_path / "good.png"
    good.write_bytes(images.make(width, height, defect=False))
    upload.send_keys(str(good))
    wait.until(lambda d: d.find_element(By.ID, "filename").text == "good.png"
               and d.find_element(By.ID, "result").get_attribute("data-rendered") == "true")  # fmt: skip
    assert browser.find_element(By.ID, "verdict").text == "normal"
    assert browser.find_elements(By.CSS_SELECTOR, "#boxes rect.region") == []


def test_api_page_renders_every_endpoint_with_no_internet_access(browser, make_settings, model_dir):
    """Swagger UI from the service's own files: FastAPI's default page loads it from a CDN and stays
    blank on a box without internet access (as this browser is: nothing outside 127.0.0.1 answers)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from service.app.main import create_app

    with running(create_app(make_settings(model_dir=model_dir))) as url:
        browser.get(url + "/docs")
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/v1/predict", "/healthz"} <= paths, paths
