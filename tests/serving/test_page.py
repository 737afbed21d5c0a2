"""The web page in a real headless Chromium (Debian's chromium + chromedriver, driven by Selenium)."""
import base64
import json
import shutil
import time

import httpx
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, read by console_errors()
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


def noise_png(folder):
    """A 128 x 128 picture of uniform noise: "not an X-ray", flagged whatever the model."""
    import numpy as np
    from PIL import Image
    path = folder / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128), dtype=np.uint8)).save(path)
    return path


def test_page_warns_on_an_image_that_is_not_an_xray(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    noise = noise_png(tmp_path)
    browser = make_browser(tmp_path)
    try:
        browser.get(url + "/")
        browser.find_element(By.ID, "file").send_keys(str(noise))
        WebDriverWait(browser, 30).until(EC.text_to_be_present_in_element((By.ID, "probability"), "%"))
        warning = browser.find_element(By.ID, "warning")
        assert warning.is_displayed() and "Outside the intended use" in warning.text
        # no label for what is not an X-ray (the page had shown PNEUMONIA beside the warning)
        assert browser.find_element(By.ID, "label").text == "no label (not a chest X-ray)"
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


# --- the page's answers: only the latest file's, named, never a stale one --------------------------------------

# Installed before the page's own script (CDP Page.addScriptToEvaluateOnNewDocument): wraps window.fetch so that
# the Nth request to /predict follows PLAN[N]: "slow" (the real answer, handed over 4 s late), "reject" (a network
# failure, as a connection reset gives), "html502" (a proxy's HTML error page instead of the server's JSON).
# window.__predicts counts the /predict requests the page made; window.__slowDone is set once a slow one is over.
FETCH_WRAPPER = """
(() => {
  const PLAN = %s;
  const real = window.fetch.bind(window);
  window.__predicts = 0; window.__slowDone = false;
  window.fetch = async function (resource, init) {
    const url = String(resource && resource.url ? resource.url : resource);
    if (!url.includes("predict")) { return real(resource, init); }
    const plan = PLAN[String(++window.__predicts)];
    if (plan === "reject") { throw new TypeError("Failed to fetch"); }
    if (plan === "html502") {
      return new Response("<html><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>",
                          { status: 502, statusText: "Bad Gateway", headers: { "Content-Type": "text/html" } });
    }
    if (plan === "slow") {
      try {
        const response = await real(resource, init);
        await new Promise(done => setTimeout(done, 4000));
        return response;
      } finally { setTimeout(() => { window.__slowDone = true; }, 0); }
    }
    return real(resource, init);
  };
})();
"""

# Every text #probability shows, in order (installed once the page has loaded).
PROBABILITY_HISTORY = """
window.__shown = [];
const target = document.getElementById("probability");
new MutationObserver(() => window.__shown.push(target.textContent))
  .observe(target, { childList: true, characterData: true, subtree: true });
"""


def open_page(url, tmp_path, plan=None):
    browser = make_browser(tmp_path)
    if plan is not None:
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                                {"source": FETCH_WRAPPER % json.dumps({str(k): v for k, v in plan.items()})})
    browser.get(url + "/")
    return browser


def xrays(kind, count=4):
    require_shared()
    return sorted((SHARED_DATA / "test" / kind).iterdir())[:count]


def server_probability(url, path) -> float:
    """The probability the server gives this file on its own (no page involved)."""
    with open(path, "rb") as handle:
        answer = httpx.post(url + "/predict", files={"file": (path.name, handle.read(), "image/jpeg")}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()["probability"]


def shown_percent(browser) -> float:
    from selenium.webdriver.common.by import By
    return float(browser.find_element(By.ID, "probability").text.rstrip("%"))


def wait_for_result(browser, name=None, timeout=30):
    """Until the result card is displayed with a probability; then, with ``name``, that the card names it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, timeout).until(lambda b: b.find_element(By.ID, "result").is_displayed() and
                                          "%" in b.find_element(By.ID, "probability").text)
    if name is not None:
        WebDriverWait(browser, 5).until(lambda b: shown_name(b) == name)


def shown_name(browser):
    """The file name on the result card (None: the page has no such line)."""
    from selenium.webdriver.common.by import By
    found = browser.find_elements(By.ID, "filename")
    return found[0].text if found else None


def wait_for_error(browser, timeout=30):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, timeout).until(lambda b: b.find_element(By.ID, "error").text.startswith("Error"),
                                          "no error shown (still 'Analysing', or a result instead?)")
    return browser.find_element(By.ID, "error").text


def assert_no_result_shown(browser):
    from selenium.webdriver.common.by import By
    assert not browser.find_element(By.ID, "result").is_displayed()
    for element in ("probability", "label", "warning", "heatmap"):
        assert not browser.find_element(By.ID, element).is_displayed(), element
    assert "Analysing" not in browser.find_element(By.TAG_NAME, "body").text


def console_errors(browser, ignore_failed_loads=False) -> list:
    """SEVERE console entries: uncaught errors, CSP violations; a 4xx/5xx answer also logs one ("Failed to
    load resource"), which ``ignore_failed_loads`` leaves out where a test asks for such an answer."""
    entries = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    if ignore_failed_loads:
        entries = [e for e in entries if "Failed to load resource" not in e["message"]]
    return entries


def test_an_earlier_slower_answer_never_replaces_the_latest_files_result(server, tmp_path):
    """Image A's answer is slow (a Grad-CAM queue); B, chosen after it, answers first. The page must end on B's
    name and B's probability, and never show A's number: A is not the file last chosen."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    first = xrays("PNEUMONIA")[0]
    p_first = server_probability(url, first)
    # B: a file whose probability differs visibly from A's, so that the page's number tells which one it shows
    second = next((p for p in xrays("NORMAL", 10) + xrays("PNEUMONIA", 10)[1:]
                   if abs(server_probability(url, p) - p_first) * 100 >= 0.5), None)
    assert second is not None, "no test X-ray scored 0.5 points away from the first: pick other files"
    p_second = server_probability(url, second)
    browser = open_page(url, tmp_path, plan={1: "slow"})
    try:
        browser.execute_script(PROBABILITY_HISTORY)
        browser.find_element(By.ID, "file").send_keys(str(first))
        browser.find_element(By.ID, "file").send_keys(str(second))
        wait_for_result(browser)
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return window.__slowDone"))
        time.sleep(1.0)  # A's late answer, had the page taken it, is on screen by now
        assert browser.execute_script("return window.__predicts") == 2
        assert abs(shown_percent(browser) - 100 * p_second) <= 0.051, (shown_percent(browser), p_first, p_second)
        history = browser.execute_script("return window.__shown")
        assert f"{100 * p_first:.1f}%" not in history, history
        assert shown_name(browser) == second.name
    finally:
        browser.quit()


def test_an_error_after_a_success_hides_the_previous_result(server, tmp_path):
    """The moment a new file is chosen, the previous image's number, label and heat map go; a refused upload
    (400 not an image, 413 too large) then shows its error alone."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    good = xrays("PNEUMONIA")[0]
    garbage = tmp_path / "not-an-xray.png"
    garbage.write_bytes(b"this is not an image at all\n" * 10)
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(3 * 1024 * 1024))  # the server takes 2 MB
    browser = open_page(url, tmp_path, plan={2: "slow"})
    try:
        browser.find_element(By.ID, "file").send_keys(str(good))
        wait_for_result(browser)
        browser.find_element(By.ID, "file").send_keys(str(garbage))  # its answer held back 4 s
        WebDriverWait(browser, 2).until(lambda b: not b.find_element(By.ID, "result").is_displayed(),
                                        "the previous result stayed on screen while the next file was analysed")
        assert "Analysing not-an-xray.png" in browser.find_element(By.TAG_NAME, "body").text
        message = wait_for_error(browser)
        assert "400" in message and "not-an-xray.png" in message, message
        assert_no_result_shown(browser)

        browser.find_element(By.ID, "file").send_keys(str(good))
        wait_for_result(browser)
        browser.find_element(By.ID, "file").send_keys(str(huge))
        message = wait_for_error(browser)
        assert "huge.png" in message, message  # 413, or a reset connection where the server stopped reading
        assert_no_result_shown(browser)
    finally:
        browser.quit()


@pytest.mark.parametrize("failure", ["reject", "html502"])
def test_a_network_failure_or_a_reply_that_is_not_json_shows_an_error_and_no_stale_result(server, tmp_path,
                                                                                            failure):
    url, _ = server
    good = xrays("PNEUMONIA")[0]
    browser = open_page(url, tmp_path, plan={2: failure})
    try:
        from selenium.webdriver.common.by import By
        browser.find_element(By.ID, "file").send_keys(str(good))
        wait_for_result(browser)
        other = xrays("NORMAL")[0]
        browser.find_element(By.ID, "file").send_keys(str(other))
        message = wait_for_error(browser, timeout=10)
        assert other.name in message
        assert ("502" in message and "not a JSON" in message) if failure == "html502" else \
            "could not be reached" in message, message
        assert_no_result_shown(browser)
        assert console_errors(browser, ignore_failed_loads=True) == []  # no uncaught TypeError / SyntaxError
    finally:
        browser.quit()


def test_choosing_the_same_file_again_sends_it_again(server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    good = xrays("PNEUMONIA")[0]
    browser = open_page(url, tmp_path, plan={})
    try:
        browser.find_element(By.ID, "file").send_keys(str(good))
        wait_for_result(browser)
        browser.find_element(By.ID, "file").send_keys(str(good))
        WebDriverWait(browser, 10).until(lambda b: b.execute_script("return window.__predicts") == 2,
                                         "the same file chosen again was not sent again")
        wait_for_result(browser, good.name)
    finally:
        browser.quit()


def test_the_result_names_its_file(server, tmp_path):
    url, _ = server
    good = xrays("NORMAL")[1]
    browser = open_page(url, tmp_path)
    try:
        from selenium.webdriver.common.by import By
        browser.find_element(By.ID, "file").send_keys(str(good))
        wait_for_result(browser)
        assert abs(shown_percent(browser) - 100 * server_probability(url, good)) <= 0.051
        assert shown_name(browser) == good.name  # the card's "File:" line: the browser's own file.name
    finally:
        browser.quit()


def test_several_dropped_files_are_refused_and_one_dropped_file_is_analysed(server, tmp_path):
    """The page refuses a drop of several files (which one a browser lists first is not the user's choice) and
    sends nothing; one dropped file is analysed. The chooser filters nothing (a DICOM often has no extension)."""
    from selenium.webdriver.common.by import By
    url, _ = server
    good = xrays("PNEUMONIA")[1]
    payload = base64.b64encode(good.read_bytes()).decode()
    drop = """
        const [names, data] = arguments;
        const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
        const files = new DataTransfer();
        names.forEach(name => files.items.add(new File([bytes], name, { type: "image/jpeg" })));
        document.getElementById("drop").dispatchEvent(
            new DragEvent("drop", { dataTransfer: files, bubbles: true, cancelable: true }));
    """
    browser = open_page(url, tmp_path, plan={})
    try:
        browser.execute_script(drop, [good.name], payload)
        wait_for_result(browser)
        browser.execute_script(drop, ["a.jpeg", "b.jpeg", "c.jpeg"], payload)
        message = wait_for_error(browser, timeout=5)
        assert "3 files dropped" in message, message
        assert_no_result_shown(browser)
        time.sleep(0.5)
        assert browser.execute_script("return window.__predicts") == 1
        assert browser.find_element(By.ID, "file").get_attribute("accept") in (None, "")
    finally:
        browser.quit()


def test_the_page_runs_under_its_content_security_policy_with_a_clean_console(server, tmp_path):
    """Served with the Content-Security-Policy header, an upload leaves no SEVERE console entry (an inline
    script or style, or an inline handler, would log a CSP violation; an uncaught error logs one too)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait
    url, _ = server
    policy = httpx.get(url + "/").headers.get("content-security-policy", "")
    assert "script-src 'self'" in policy and "style-src 'self'" in policy, policy
    good = xrays("PNEUMONIA")[2]
    browser = open_page(url, tmp_path)
    try:
        time.sleep(1.0)
        assert console_errors(browser) == []
        WebDriverWait(browser, 10).until(EC.text_to_be_present_in_element((By.ID, "modelinfo"), "Model:"))
        browser.find_element(By.ID, "file").send_keys(str(good))
        wait_for_result(browser, good.name)
        WebDriverWait(browser, 10).until(
            lambda b: b.find_element(By.ID, "heatmap").get_attribute("naturalWidth") not in (None, "0"))
        assert browser.find_element(By.ID, "drop").value_of_css_property("border-top-style") == "dashed"  # page.css
        assert console_errors(browser) == []
    finally:
        browser.quit()
