"""What a clinician reads on the page, from a review in headless Chromium: a file name cannot reorder the result
line, the rate the probability is stated for is shown with the server's notes, no heat map for an image given no
label, a long name keeps the page within a phone's width, and only the latest key check counts."""
import shutil
import time

import httpx

from tests.serving.test_page import make_browser, noise_png, open_page, wait_for_error, wait_for_result, xrays
from tests.serving.test_page_review import by_id, enter_key, wait_until


def answer_of(url, path):
    reply = httpx.post(url + "/predict", files={"file": (path.name, path.read_bytes(), "image/jpeg")}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_a_right_to_left_override_in_a_name_cannot_reorder_the_result_line(server, tmp_path):
    """'\u202egpj.exe.jpeg' had been drawn as 'gepj.exe.jpg', and the status line's 3.4% as '%4.3'."""
    url, _ = server
    copy = tmp_path / "\u202egpj.exe.jpeg"
    shutil.copyfile(xrays("NORMAL")[0], copy)
    browser = open_page(url, tmp_path)
    try:
        by_id(browser, "file").send_keys(str(copy))
        wait_for_result(browser)
        assert by_id(browser, "filename").text == "?gpj.exe.jpeg"
        assert by_id(browser, "status").text.startswith("?gpj.exe.jpeg analysed: probability of pneumonia ")
        assert "\u202e" not in browser.find_element("tag name", "body").text
    finally:
        browser.quit()


def test_the_rate_the_probability_is_stated_for_and_its_source_are_shown(server, tmp_path):
    """The same X-ray reads 99.8% at the calibration images' 75% and 95% at a given 10%: the page had not said
    which rate its number was for."""
    url, _ = server
    xray = xrays("PNEUMONIA")[0]
    body = answer_of(url, xray)
    assert body["prevalence_source"] == "calibration images" and 0 < body["prevalence"] < 1
    browser = open_page(url, tmp_path)
    try:
        by_id(browser, "file").send_keys(str(xray))
        wait_for_result(browser)
        assert by_id(browser, "rate").text == (f"Stated for a pneumonia rate of {100 * body['prevalence']:.1f}% "
                                               f"(calibration images).")
        assert by_id(browser, "notes").text == ("Note: " + "; ".join(body["notes"]) + ".") if body["notes"] else \
            not by_id(browser, "notes").is_displayed()
    finally:
        browser.quit()


def test_an_image_given_no_label_gets_no_heat_map_and_a_plain_status(server, tmp_path):
    url, _ = server
    noise = noise_png(tmp_path)
    browser = open_page(url, tmp_path)
    try:
        by_id(browser, "file").send_keys(str(noise))
        wait_for_result(browser)
        wait_until(browser, lambda b: by_id(b, "status").text.endswith("(see the warning)."))
        assert by_id(browser, "status").text.endswith(", no label: not a chest X-ray (see the warning).")
        assert not by_id(browser, "heatmapbox").is_displayed()
        by_id(browser, "file").send_keys(str(xrays("PNEUMONIA")[0]))  # a labelled X-ray after it: its map shows
        wait_until(browser, lambda b: by_id(b, "heatmap").get_attribute("naturalWidth") not in (None, "0"), 30)
        assert "each map scaled to its own maximum" in by_id(browser, "heatmapbox").text
    finally:
        browser.quit()


def test_a_long_name_without_spaces_keeps_the_page_within_a_phones_width(server, tmp_path):
    url, _ = server
    long_name = tmp_path / ("A" * 240 + ".jpeg")
    shutil.copyfile(xrays("PNEUMONIA")[0], long_name)
    empty = tmp_path / ("B" * 240 + ".png")
    empty.write_bytes(b"")
    browser = open_page(url, tmp_path)
    try:
        browser.set_window_size(390, 900)
        width = browser.execute_script("return window.innerWidth")
        by_id(browser, "file").send_keys(str(long_name))
        wait_for_result(browser)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
        by_id(browser, "file").send_keys(str(empty))
        wait_for_error(browser)
        assert browser.execute_script("return document.documentElement.scrollWidth") <= width
    finally:
        browser.quit()


# window.fetch wrapped before the page's own script runs: BODY sees ``url``, ``init`` and the real ``reply``.
FETCH_WRAPPER = """
(() => {
  const real = window.fetch.bind(window);
  window.fetch = async function (resource, init) {
    const url = String(resource && resource.url ? resource.url : resource);
    const reply = await real(resource, init);
    BODY
  };
})();
"""

# /model answers 3 s late for the wrong key: its 401 then comes after the good key's answer.
LATE_REFUSAL = FETCH_WRAPPER.replace("BODY", """
    const auth = init && init.headers ? String(init.headers["Authorization"] || "") : "";
    if (url.endsWith("model") && auth.includes("not-the-key")) { await new Promise(r => setTimeout(r, 3000)); }
    return reply;""")


def open_wrapped(url, tmp_path, script):
    browser = make_browser(tmp_path)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": script})
    browser.get(url + "/")
    return browser


def test_a_late_refusal_of_an_earlier_key_does_not_undo_the_key_accepted_after_it(secure_server, keys, tmp_path):
    browser = open_wrapped(secure_server.url, tmp_path, LATE_REFUSAL)
    try:
        wait_until(browser, lambda b: by_id(b, "apikey").is_displayed())
        enter_key(browser, "ward3.not-the-key")
        enter_key(browser, keys["ward"])
        wait_until(browser, lambda b: by_id(b, "keyok").text == "Key accepted.")
        time.sleep(4)  # the wrong key's refusal has come and gone
        assert by_id(browser, "keyok").text == "Key accepted." and not by_id(browser, "keyform").is_displayed()
        assert "not accepted" not in by_id(browser, "keymessage").text
    finally:
        browser.quit()


# The server's answer with a note added, as a server given --prevalence 0.1 answers.
WITH_A_NOTE = FETCH_WRAPPER.replace("BODY", """
    if (!url.includes("predict")) { return reply; }
    const body = await reply.json();
    body.notes = ["probabilities stated for a pneumonia rate of 0.100 (given)"];
    body.prevalence = 0.1; body.prevalence_source = window.__source || "given";
    const headers = { "Content-Type": "application/json" };
    return new Response(JSON.stringify(body), { status: reply.status, headers: headers });""")


def test_the_servers_notes_are_shown_beside_the_rate(server, tmp_path):
    url, _ = server
    browser = open_wrapped(url, tmp_path, WITH_A_NOTE)
    try:
        by_id(browser, "file").send_keys(str(xrays("PNEUMONIA")[0]))
        wait_for_result(browser)
        assert by_id(browser, "rate").text == "Stated for a pneumonia rate of 10.0% (given)."
        assert by_id(browser, "notes").text == "Note: probabilities stated for a pneumonia rate of 0.100 (given)."
        browser.execute_script("window.__source = 'probabilities stated for a pneumonia rate of 0.100 (given)';")
        by_id(browser, "file").send_keys(str(xrays("PNEUMONIA")[1]))  # a note that is the rate's source: said once
        wait_until(browser, lambda b: by_id(b, "rate").text.endswith("(probabilities stated for a pneumonia rate of "
                                                                     "0.100 (given))."), 30)
        assert not by_id(browser, "notes").is_displayed()
    finally:
        browser.quit()
