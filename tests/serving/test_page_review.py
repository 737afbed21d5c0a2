"""The web page's review defects, in a real headless Chromium against a real server on loopback: the keyboard
reaches the file chooser, a key no key can be is refused on the page (fetch threw on it), the key form's
messages, the browser's own file name on the card, time-outs, percentages, the warning's wording, a phone's width.
"""
import json
import shutil

import httpx
import pytest

from pneumonia_cnn.serving.service import display_name
from tests.serving.test_page import make_browser, noise_png, open_page, wait_for_error, wait_for_result, xrays

KEY = "pneumonia-cnn-key"


def by_id(browser, element):
    from selenium.webdriver.common.by import By
    return browser.find_element(By.ID, element)


def wait_until(browser, condition, timeout=10, message=""):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout).until(condition, message)


def press(browser, *keys):
    """Keys typed at whatever has the focus (as a user would, not sent to a chosen element)."""
    from selenium.webdriver.common.action_chains import ActionChains
    ActionChains(browser).send_keys(*keys).perform()


def enter_key(browser, key):
    """Types ``key`` into the key form (through the DOM: chromedriver cannot type U+200B) and submits it."""
    browser.execute_script("document.getElementById('apikey').value = arguments[0];", key)
    by_id(browser, "savekey").click()


# --- 1. the keyboard reaches the file chooser; screen readers hear the result ------------------------------------

# input.click() is what opens a file chooser from script: counted here, and no dialog is opened in the test.
COUNT_CHOOSER = """
window.__chooser = 0;
HTMLInputElement.prototype.click = function () { if (this.type === "file") { window.__chooser += 1; } };
"""


def test_tab_reaches_the_drop_zone_and_enter_or_space_opens_the_chooser(server, tmp_path):
    from selenium.webdriver.common.keys import Keys
    url, _ = server
    browser = open_page(url, tmp_path)
    try:
        wait_until(browser, lambda b: "Model:" in by_id(b, "modelinfo").text)  # no key form on this server
        browser.execute_script(COUNT_CHOOSER)
        press(browser, Keys.TAB)
        assert browser.execute_script("return document.activeElement.id") == "drop"
        drop = by_id(browser, "drop")
        assert drop.value_of_css_property("outline-style") == "solid"  # the focus can be seen
        assert drop.value_of_css_property("outline-width") == "3px"
        press(browser, Keys.ENTER)
        assert browser.execute_script("return window.__chooser") == 1
        press(browser, Keys.SPACE)
        assert browser.execute_script("return window.__chooser") == 2
        drop.click()  # the mouse still opens it too
        assert browser.execute_script("return window.__chooser") == 3
    finally:
        browser.quit()


def test_the_result_is_announced_in_the_live_status(server, tmp_path):
    url, _ = server
    good = xrays("NORMAL")[1]
    answer = httpx.post(url + "/predict", files={"file": (good.name, good.read_bytes(), "image/jpeg")}, timeout=60)
    body = answer.json()
    browser = open_page(url, tmp_path)
    try:
        assert by_id(browser, "result").get_attribute("aria-live") is None  # live, it read the result twice
        assert by_id(browser, "warning").get_attribute("role") == "alert"
        assert by_id(browser, "status").get_attribute("aria-live") == "polite"
        by_id(browser, "file").send_keys(str(good))
        wait_for_result(browser, good.name)
        shown = by_id(browser, "probability").text
        assert by_id(browser, "status").text == \
            f"{good.name} analysed: probability of pneumonia {shown}, label {body['label']}."
    finally:
        browser.quit()


# --- 2. a key that no key can be ----------------------------------------------------------------------------------

def test_a_key_with_characters_no_key_holds_is_refused_on_the_page_and_never_stored(secure_server, keys, tmp_path):
    browser = make_browser(tmp_path)
    try:
        browser.get(secure_server.url + "/")
        wait_until(browser, lambda b: by_id(b, "apikey").is_displayed())
        enter_key(browser, "ward3.\u043a\u043b\u044e\u0447\u2019")  # "ward3.ключ’", Cyrillic and a curly quote
        assert by_id(browser, "keymessage").text == (
            "This key holds characters an API key cannot have (\u201c\u043a\u201d U+043A, \u201c\u043b\u201d U+043B, "
            "\u201c\u044e\u201d U+044E, \u201c\u0447\u201d U+0447, \u201c\u2019\u201d U+2019): an API key is "
            "ID.SECRET, of letters, digits, \u201c-\u201d, \u201c_\u201d and a dot. Paste it again.")
        assert browser.execute_script("return sessionStorage.getItem(arguments[0])", KEY) is None
        assert by_id(browser, "keyform").is_displayed()
        enter_key(browser, keys["ward"][:8] + "\u200b" + keys["ward"][8:])  # a zero-width space inside
        assert "(U+200B (invisible))" in by_id(browser, "keymessage").text
        assert browser.execute_script("return sessionStorage.getItem(arguments[0])", KEY) is None
        # around the key, white space and the invisible characters pasted from e-mail are trimmed: the key works
        enter_key(browser, " \u200b\ufeff" + keys["ward"] + "\u200b\n")
        wait_until(browser, lambda b: "Model: seed" in by_id(b, "modelinfo").text)
        assert by_id(browser, "keyok").text == "Key accepted."
        assert browser.execute_script("return sessionStorage.getItem(arguments[0])", KEY) == keys["ward"]
        assert not by_id(browser, "keyform").is_displayed()
    finally:
        browser.quit()


# --- 3. the key form's messages ---------------------------------------------------------------------------------

def test_an_upload_without_a_key_asks_for_one_and_the_key_clears_the_refusal(secure_server, keys, tmp_path):
    good = xrays("NORMAL")[0]
    browser = make_browser(tmp_path)
    try:
        browser.get(secure_server.url + "/")
        wait_until(browser, lambda b: by_id(b, "apikey").is_displayed())
        assert by_id(browser, "keymessage").text == ""  # the label says that a key is needed
        by_id(browser, "file").send_keys(str(good))
        message = wait_for_error(browser)
        assert message == f"Error: {good.name} was not analysed: HTTP 401 Unauthorized: missing API key: send " \
                          f"'Authorization: Bearer KEY'", message
        assert by_id(browser, "keymessage").text == \
            "This service needs an API key: enter it, then choose the file again."  # none was sent: none refused
        enter_key(browser, "ward3.not-the-key")
        wait_until(browser, lambda b: by_id(b, "keymessage").text.startswith("Key not accepted"))
        assert by_id(browser, "error").text == ""  # the old refusal went with the first key entered
        enter_key(browser, keys["ward"])
        wait_until(browser, lambda b: by_id(b, "keyok").text == "Key accepted.")
        assert not by_id(browser, "error").is_displayed() and by_id(browser, "error").text == ""
        assert not by_id(browser, "keyform").is_displayed()
        assert browser.execute_script("return document.activeElement.id") == "drop"  # the focus left the form
        by_id(browser, "file").send_keys(str(good))
        wait_for_result(browser, good.name)
        assert by_id(browser, "keyok").text == ""  # a confirmation, not a fixture of the page
    finally:
        browser.quit()


# --- 4. the file's own name -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ['left "AP" view.jpeg', "ward\\3.jpeg"])
def test_the_card_names_the_file_as_the_browser_does(server, tmp_path, name):
    """Chrome sends '"' as %22 in a multipart file name (the HTML standard's rule) and the server cuts a name at
    "\\" (old browsers sent Windows paths): the card shows the browser's own ``file.name``."""
    url, _ = server
    copy = tmp_path / name
    shutil.copyfile(xrays("PNEUMONIA")[0], copy)
    browser = open_page(url, tmp_path)
    try:
        by_id(browser, "file").send_keys(str(copy))
        wait_for_result(browser)
        assert by_id(browser, "filename").text == name
        assert by_id(browser, "status").text.startswith(name + " analysed: ")
    finally:
        browser.quit()


def test_an_error_names_the_file_with_its_quote_decoded_by_the_server(server, tmp_path):
    url, _ = server
    garbage = tmp_path / 'scan "B".png'
    garbage.write_bytes(b"not an image\n" * 10)
    browser = open_page(url, tmp_path)
    try:
        by_id(browser, "file").send_keys(str(garbage))
        message = wait_for_error(browser)
        assert message.startswith('Error: scan "B".png was not analysed: HTTP 400 Bad Request: scan "B".png: not a '
                                  'readable image'), message
    finally:
        browser.quit()


def test_display_name_decodes_the_multipart_escapes_and_nothing_else():
    assert display_name("x%22y.jpeg") == 'x"y.jpeg'
    assert display_name("a%0D%0Ab.png") == "a??b.png"  # CR and LF decoded, then shown as "?" (not printable)
    assert display_name("C:\\Users\\me\\scan%22.dcm") == 'scan".dcm'  # an old browser's Windows path
    assert display_name("dir/x%22.png") == 'x".png'
    assert display_name("%2522.png") == "%2522.png"  # one pass: "%25" is no browser's escape
    assert display_name("%20x%41.png") == "%20x%41.png"  # other escapes are the name's own characters
    assert display_name("x%0d%0a%22.png") == 'x%0d%0a".png'  # browsers write the escapes in upper case
    assert display_name("%22") == '"'
    assert display_name(None) == "upload"


# --- 5. time-outs -------------------------------------------------------------------------------------------------

# Before the page's script: a wait of 100 s or more lasts 0.3 s (so the page's 120 s time-out comes at once), and
# requests whose URL holds one of HANG never answer; they end only when the page aborts them.
HANGING_SERVER = """
(() => {
  const HANG = %s;
  const realTimeout = window.setTimeout.bind(window);
  window.setTimeout = (f, ms, ...rest) => realTimeout(f, ms >= 100000 ? 300 : ms, ...rest);
  const real = window.fetch.bind(window);
  window.fetch = function (resource, init) {
    if (!HANG.some(part => String(resource).includes(part))) { return real(resource, init); }
    return new Promise((_, reject) => {
      if (init && init.signal) {
        init.signal.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
      }
    });
  };
})();
"""


def hanging_page(url, tmp_path, hang):
    browser = make_browser(tmp_path)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": HANGING_SERVER % json.dumps(hang)})
    browser.get(url + "/")
    return browser


def test_a_prediction_without_an_answer_ends_in_an_error_after_the_time_out(server, tmp_path):
    url, _ = server
    good = xrays("NORMAL")[0]
    browser = hanging_page(url, tmp_path, ["predict"])
    try:
        by_id(browser, "file").send_keys(str(good))
        message = wait_for_error(browser, timeout=10)
        assert message == f"Error: {good.name} was not analysed: no answer from the server after 120 s.", message
        assert by_id(browser, "status").text == ""
    finally:
        browser.quit()


def test_model_information_without_an_answer_ends_after_the_time_out(server, tmp_path):
    url, _ = server
    browser = hanging_page(url, tmp_path, ["model"])
    try:
        wait_until(browser, lambda b: by_id(b, "modelinfo").text != "", message="/model still waited for")
        assert by_id(browser, "modelinfo").text == "(model information unavailable: no answer from the server " \
                                                   "after 120 s)"
    finally:
        browser.quit()


# --- 6. percentages, the warning's wording, a phone's width -----------------------------------------------------

def test_probability_and_threshold_are_both_percentages_and_the_warning_says_it_once(server, tmp_path):
    url, _ = server
    noise = noise_png(tmp_path)
    body = httpx.post(url + "/predict", files={"file": ("noise.png", noise.read_bytes(), "image/png")},
                      timeout=60).json()
    assert any("not reliable" in w for w in body["warnings"]), body["warnings"]  # the server says it already
    assert abs(body["probability"] - body["threshold"]) > 0.001, body  # so the page uses one decimal
    browser = open_page(url, tmp_path)
    try:
        by_id(browser, "file").send_keys(str(noise))
        wait_for_result(browser, "noise.png")
        assert by_id(browser, "probability").text == f"{100 * body['probability']:.1f}%"
        assert by_id(browser, "threshold").text == f"{100 * body['threshold']:.1f}%"
        warning = by_id(browser, "warning").text
        assert warning == "\u26a0 Outside the intended use: " + "; ".join(body["warnings"]) + ".", warning
        assert warning.count("reliable") + warning.count("rely") == 1
    finally:
        browser.quit()


def test_on_a_phone_the_content_keeps_a_margin_from_the_screens_edges(server, tmp_path):
    url, _ = server
    browser = open_page(url, tmp_path)
    try:
        browser.set_window_size(390, 900)
        width = browser.execute_script("return window.innerWidth")
        assert 380 <= width <= 400, width
        by_id(browser, "file").send_keys(str(xrays("PNEUMONIA")[0]))
        wait_for_result(browser)
        for element in ("drop", "result", "status"):
            box = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON()",
                                         by_id(browser, element))
            assert box["left"] >= 12 and box["right"] <= width - 12, (element, box, width)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width  # no sideways scroll
    finally:
        browser.quit()


def test_a_warning_that_does_not_flag_the_image_is_a_note_not_outside_the_intended_use(server, tmp_path):
    """A DICOM secondary capture is warned about, not flagged (it often holds a scanned radiograph): the page had
    shown every warning as "Outside the intended use ... Do not rely on this probability"."""
    from tests.test_ood import child_xray_dicom
    url, _ = server
    capture = child_xray_dicom(tmp_path / "capture.dcm", Modality="SC", PatientAge="003Y")
    body = httpx.post(url + "/predict", files={"file": ("capture.dcm", capture.read_bytes(), "application/dicom")},
                      timeout=60).json()
    assert body["in_distribution"] is True and len(body["warnings"]) == 1
    browser = open_page(url, tmp_path)
    try:
        by_id(browser, "file").send_keys(str(capture))
        wait_for_result(browser, "capture.dcm")
        assert by_id(browser, "warning").text == f"\u26a0 Note: {body['warnings'][0]}."
        assert by_id(browser, "status").text.endswith(f"label {body['label']} (see the note).")
    finally:
        browser.quit()
