from tests.serving.test_page import make_browser


def test_report_has_every_section_and_renders_in_chromium(trained_run, small_root, cache_dir, tmp_path):
    from pneumonia_cnn.cli import main
    out = tmp_path / "report.html"
    assert main(["report", str(trained_run), "--data", str(small_root), "--out", str(out), "--bootstrap", "50",
                 "--cache-dir", str(cache_dir)]) == 0
    text = out.read_text()
    for section in ("Configuration", "Data", "Training curves", "Metrics on test", "Per patient", "Pictures",
                    "Robustness to image shifts", "Out-of-distribution flags", "Model card", "Not a medical device",
                    "CC BY 4.0", "pediatric"):
        assert section in text, section
    assert text.count("data:image/png;base64,") >= 7 and "src=\"http" not in text  # self-contained
    from selenium.webdriver.common.by import By
    browser = make_browser(tmp_path)
    try:
        browser.get(out.as_uri())
        body = browser.find_element(By.TAG_NAME, "body").text
        assert "ROC AUC" in body and "Sensitivity" in body and "Specificity" in body
        images = browser.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 7 and all(int(i.get_attribute("naturalWidth")) > 50 for i in images)
        browser.save_screenshot(str(tmp_path / "report.png"))
        assert (tmp_path / "report.png").stat().st_size > 20_000
    finally:
        browser.quit()
