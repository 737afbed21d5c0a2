"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""
import shutil

import pytest

from tests.conftest import SHARED_DATA, require_shared


def make_browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium and chromedriver are not installed (.ci/run installs them with apt-get)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_upload_shows_probability_and_heat_map(server, tmp_path):
    require_shared()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    browser = make_browser(tmp_path)
    try:
        browser.get(url + "/")
        assert "Pneumonia" in browser.title or "pneumonia" in browser.title
        xray = sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[0]
        browser.find_element(By.ID, "file").send_keys(str(xray))
        WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "probability"), "%"))
        WebDriverWait(browser, 10).until(
            lambda b: b.find_element(By.ID, "heatmap").get_attribute("naturalWidth") not in (None, "0"))
        probability = browser.find_element(By.ID, "probability").text
        assert 0 <= float(probability.rstrip("%")) <= 100
        assert browser.find_element(By.ID, "label").text in ("NORMAL", "PNEUMONIA")
        browser.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 10_000
    finally:
        browser.quit()


def test_page_warns_on_an_image_that_is_not_an_xray(server, tmp_path):
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)).save(noise)
    browser = make_browser(tmp_path)
    try:
        browser.get(url + "/")
        browser.find_element(By.ID, "file").send_keys(str(noise))
        WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "probability"), "%"))
        warning = browser.find_element(By.ID, "warning")
        assert warning.is_displayed() and "Outside the intended use" in warning.text
        browser.save_screenshot(str(tmp_path / "warning.png"))
    finally:
        browser.quit()


def test_page_asks_for_the_key_and_shows_the_warning_above_the_probability(secure_server, keys, tmp_path):
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8)).save(noise)
    browser = make_browser(tmp_path)
    try:
        browser.get(secure_server.url + "/")
        WebDriverWait(browser, 10).until(EC.visibility_of_element_located((By.ID, "apikey")))
        browser.find_element(By.ID, "apikey").send_keys("ward3.not-the-key")
        browser.find_element(By.ID, "savekey").click()
        WebDriverWait(browser, 10).until(EC.text_to_be_present_in_element((By.ID, "keymessage"), "not accepted"))
        browser.find_element(By.ID, "apikey").send_keys(keys["ward"])
        browser.find_element(By.ID, "savekey").click()
        WebDriverWait(browser, 10).until(EC.text_to_be_present_in_element((By.ID, "modelinfo"), "Model: seed"))
        assert not browser.find_element(By.ID, "keyform").is_displayed()
        browser.find_element(By.ID, "file").send_keys(str(noise))
        WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "probability"), "%"))
        warning, probability = browser.find_element(By.ID, "warning"), browser.find_element(By.ID, "probability")
        assert warning.is_displayed() and "Outside the intended use" in warning.text
        assert warning.location["y"] + warning.size["height"] <= probability.location["y"]  # read before the number
        browser.save_screenshot(str(tmp_path / "warning_first.png"))
    finally:
        browser.quit()
    assert keys["ward"].split(".")[1] not in secure_server.log()
