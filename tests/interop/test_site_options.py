"""One scoring path: ``listen``, ``pacs`` and ``explain`` take predict's and serve's site options (``--prevalence
RATE``, ``--engine``) and give, for the same image under the same options, predict's probability and label,
recording the rate where predict does (the DICOM SR too); the batch steps they cannot apply (``--prevalence
estimate``, ``--adapt-batch``) are refused in one line before the model loads. The built-in model, real X-rays."""
from __future__ import annotations

import json
import logging
import time

import pydicom
import pytest

import pneumonia_cnn.cli.interop as interop_cli
import pneumonia_cnn.explanation as explanation
from pneumonia_cnn.cli import main
from pneumonia_cnn.interop.listener import Listener

from .orthanc import free_port
from .reports import wait_for_reports
from .studies import xray_dicom
from .test_listen import c_store

RATE = "0.3"
SITE = ["--prevalence", RATE, "--device", "cpu"]


def instances(xray_sources, folder, date: str) -> list:
    """Three real X-rays as DICOM instances (both classes, DX and CR MONOCHROME1) of their own UIDs and study
    date: each command's test its own, so that no report of another test's stands beside its own."""
    return [xray_dicom(xray_sources["PNEUMONIA"][0], folder / "p0.dcm", "DX", patient_id="S1", study_date=date),
            xray_dicom(xray_sources["PNEUMONIA"][1], folder / "p1.dcm", "DX", patient_id="S2", study_date=date),
            xray_dicom(xray_sources["NORMAL"][0], folder / "n0.dcm", "CR", "MONOCHROME1", patient_id="S3",
                       study_date=date)]


RATE_LINE = "probabilities stated for a pneumonia rate of 0.300 (given)"  # on stderr, as predict says it


def predicted(paths, engine: str, capsys) -> dict:
    """predict's JSON rows under the same options, by path."""
    capsys.readouterr()
    assert main(["predict", "builtin", *map(str, paths), "--format", "json", *SITE, "--engine", engine]) == 0
    return {row["path"]: row for row in json.loads(capsys.readouterr().out)}


def by_uid(rows: dict) -> dict:
    """predict's rows of DICOM files, by their SOP Instance UID."""
    return {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: row for path, row in rows.items()}


def same_as_predict(entry: dict, row: dict, name) -> None:
    assert entry["probability"] == pytest.approx(row["probability"], abs=1e-6), name
    assert entry["label"] == row["label"], name
    assert row["prevalence"] == pytest.approx(float(RATE)) and row["prevalence_source"] == "given"


def test_explain_gives_predicts_probability_and_label(xray_sources, tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="pneumonia_cnn")
    images = [xray_sources["PNEUMONIA"][0], xray_sources["NORMAL"][0]]
    explained = []
    each = explanation.explain_each
    monkeypatch.setattr(explanation, "explain_each", lambda *a, **k: (explained.append(i) or i for i in each(*a, **k)))
    for engine in ("torch", "onnx"):
        explained.clear()
        caplog.clear()
        assert main(["explain", "builtin", *map(str, images), "--out", str(tmp_path / engine), *SITE,
                     "--engine", engine]) == 0
        assert RATE_LINE in caplog.text
        rows = predicted(images, engine, capsys)
        assert len(explained) == 2
        for item in explained:
            row = rows[item["path"]]
            same_as_predict(item, row, item["path"])
            assert item["engine"] == row["engine"] == engine  # scored by the engine asked for, not auto's
            assert (item["prevalence"], item["prevalence_source"]) == (row["prevalence"], "given")


def test_pacs_reports_predicts_figures_and_the_rate(orthanc, xray_sources, tmp_path, capsys, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="pneumonia_cnn")
    studies = instances(xray_sources, tmp_path, "20230606")
    for path in studies:
        orthanc.upload(path)
    summaries = []
    show = interop_cli.print_pacs_summary
    monkeypatch.setattr(interop_cli, "print_pacs_summary", lambda summary: summaries.append(summary) or show(summary))
    assert main(["pacs", "builtin", "--dicomweb", orthanc.dicomweb, "--state", str(tmp_path / "state.sqlite"),
                 "--study-date", "20230606", "--retries", "1", "--backoff", "0.05", *SITE, "--engine", "torch"]) == 0
    assert RATE_LINE in caplog.text
    rows = by_uid(predicted(studies, "torch", capsys))
    results = {r.sop_instance_uid: r.entry for r in summaries[0]["results"]}
    assert set(results) == set(rows)
    reports = wait_for_reports(orthanc, rows)
    for uid, row in rows.items():
        same_as_predict(results[uid], row, uid)
        assert results[uid]["engine"] == "torch"
        report = reports[uid]  # the SR stored in the PACS: predict's figures, and the rate they are stated for
        assert report["probability"] == pytest.approx(row["probability"], abs=1e-6)
        assert report["finding"] == {"PNEUMONIA": "Present", "NORMAL": "Absent", None: "Unknown"}[row["label"]]
        assert report["threshold"] == pytest.approx(row["threshold"], abs=1e-9)
        assert report["prevalence"] == pytest.approx(float(RATE)) and report["prevalence_source"] == "given"


def test_listen_reports_predicts_figures_and_the_rate(orthanc, xray_sources, tmp_path, capsys, caplog, monkeypatch):
    """The real command, its node started without blocking: each instance sent to it by C-STORE is reported as
    predict scores the file."""
    caplog.set_level(logging.INFO, logger="pneumonia_cnn")
    nodes, start, port = [], Listener.start, free_port()
    monkeypatch.setattr(Listener, "start", lambda self, block=True: nodes.append(start(self, block=False)))
    assert main(["listen", "builtin", "--port", str(port), "--send-to", f"127.0.0.1:{orthanc.dicom_port}:ORTHANC",
                 "--spool", str(tmp_path / "spool"), "--backoff", "0.05", *SITE, "--engine", "onnx"]) == 0
    node = nodes[0]
    assert RATE_LINE in caplog.text
    try:
        sent_files = instances(xray_sources, tmp_path, "20230707")
        assert all(c_store(path, port) == 0 for path in sent_files)
        rows = by_uid(predicted(sent_files, "onnx", capsys))
        deadline = time.monotonic() + 60
        while len({s["sop_instance_uid"] for s in node.sent}) < len(rows) and time.monotonic() < deadline:
            time.sleep(0.2)
        sent = {s["sop_instance_uid"]: s for s in node.sent}
        assert set(sent) == set(rows)
        reports = wait_for_reports(orthanc, rows)
    finally:
        node.stop()
    for uid, row in rows.items():
        same_as_predict(sent[uid], row, uid)
        assert sent[uid]["engine"] == "onnx" and sent[uid]["prevalence"] == pytest.approx(float(RATE))
        assert reports[uid]["probability"] == pytest.approx(row["probability"], abs=1e-6)
        assert reports[uid]["prevalence"] == pytest.approx(float(RATE))
        assert reports[uid]["prevalence_source"] == "given"


REFUSED = {  # each command, and what it is told, before the model loads
    "listen": ["listen", "builtin", "--send-to", "127.0.0.1:9:DEST"],
    "pacs": ["pacs", "builtin", "--dicomweb", "http://127.0.0.1:9/dicom-web"],
    "explain": ["explain", "builtin", "x.jpeg", "--out", "maps"],
}


@pytest.mark.parametrize("command", sorted(REFUSED))
@pytest.mark.parametrize("option, said", [
    (["--prevalence", "estimate"], "--prevalence estimate: {command} "),
    (["--prevalence", "ESTIMATE"], "--prevalence estimate: {command} "),
    (["--adapt-batch"], "--adapt-batch: {command} "),
    (["--prevalence", "1.5"], "--prevalence 1.5: must be strictly between 0 and 1\n"),  # predict's own words
    (["--prevalence", "often"], "--prevalence often: give a rate between 0 and 1\n"),  # not 'estimate': refused
    # applied as 1e-12 while stated as given: every probability rounded to 0
    (["--prevalence", "1e-320"], "--prevalence 1e-320: must lie between 1e-06 and 0.999999 (no site's pneumonia "
                                 "rate is rarer or commoner; at 1e-320 every probability had rounded to 0)\n"),
    (["--prevalence", "0.9999999"], "--prevalence 0.9999999: must lie between 1e-06 and 0.999999 ("),
])
def test_batch_steps_and_bad_rates_refused_in_one_line(command, option, said, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def no_model(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("pneumonia_cnn.inference.Predictor.__init__", no_model)
    assert main([*REFUSED[command], *option, "--spool", "spool"] if command == "listen" else
                [*REFUSED[command], *option]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + said.format(command=command)) and err.count("\n") == 1, err
    assert not (tmp_path / "spool").exists() and not (tmp_path / "maps").exists()


def test_engines_are_predicts_choices(capsys):
    from pneumonia_cnn.cli import build_parser
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    engines = {name: commands[name]._option_string_actions["--engine"] for name in ("predict", "serve", *REFUSED)}
    assert len({tuple(e.choices) for e in engines.values()}) == 1 and "onnx-int8" in engines["listen"].choices
    assert len({e.default for e in engines.values()}) == 1
    for command in REFUSED:
        with pytest.raises(SystemExit) as ended:
            main([*REFUSED[command], "--engine", "tensorrt"])
        assert ended.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err


def test_the_rates_at_the_bounds_are_taken():
    from pneumonia_cnn.calibration import parse_prevalence
    assert parse_prevalence("1e-6") == 1e-6 and parse_prevalence("0.999999") == 0.999999
    assert parse_prevalence("estimate") == "estimate" and parse_prevalence(None) is None
