from tests.serving.test_page import make_browser


def test_report_has_every_section_and_renders_in_chromium(trained_run, small_root, cache_dir, tmp_path):
    from pneumonia_cnn.cli import main
    out = tmp_path / "report.html"
    run_files = {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()}
    assert main(["report", str(trained_run), "--data", str(small_root), "--out", str(out), "--bootstrap", "50",
                 "--cache-dir", str(cache_dir)]) == 0
    # its metrics and figures go beside the report: a report written elsewhere changes nothing in the run
    assert {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()} == run_files
    assert (tmp_path / "report_test_metrics.json").is_file() and (tmp_path / "report_test_figures").is_dir()
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


def test_report_takes_the_builtin_model_and_a_run_with_only_last_pt(trained_run, small_root, cache_dir, tmp_path):
    import shutil

    from pneumonia_cnn.cli import main
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(trained_run / "last.pt", unfinished / "last.pt")
    for source, out in (("builtin", tmp_path / "builtin.html"), (str(unfinished), unfinished / "report.html")):
        assert main(["report", source, "--data", str(small_root), "--out", str(out), "--bootstrap", "20",
                     "--no-stress", "--cache-dir", str(cache_dir)]) == 0, source
        assert "Metrics on test" in out.read_text()


def test_a_report_in_its_run_folder_leaves_the_runs_own_metrics_alone(trained_run, small_root, cache_dir, tmp_path):
    """Without --out it wrote RUN/test_metrics.json over training's own (other data, 20 resamples instead of
    1,000): a command that reads a run rewrote one of its outputs."""
    import shutil

    from pneumonia_cnn.cli import main
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "test_metrics.json").read_bytes()
    assert main(["report", str(run), "--data", str(small_root), "--bootstrap", "20", "--no-stress",
                 "--cache-dir", str(cache_dir)]) == 0
    assert (run / "test_metrics.json").read_bytes() == before
    assert (run / "report.html").is_file() and (run / "report_test_metrics.json").is_file()
    assert (run / "report_test_figures").is_dir()
