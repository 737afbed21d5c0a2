"""``pacs`` against a real Orthanc: QIDO-RS -> WADO-RS -> score -> STOW-RS of a DICOM SR in the same study, read
back from Orthanc and checked against ``predict``'s figures for the same files; reruns, filters, the overlay,
a PACS that is down and transfers cut in the middle."""
from __future__ import annotations

import json
import re

import numpy as np
import pydicom
import pytest

from pneumonia_cnn.cli import main
from pneumonia_cnn.errors import PneumoniaCNNError

from .flaky_proxy import FlakyProxy
from .orthanc import Orthanc, free_port, require_orthanc
from .reports import predict_json, reports_in
from .studies import xray_dicom

FAST = ["--device", "cpu", "--retries", "2", "--backoff", "0.05"]
BASE = ["--study-date", "20240315"]  # the module's five studies; each test adds its own on other dates


def run_pacs(checkpoint, url, state, *extra) -> int:
    return main(["pacs", str(checkpoint), "--dicomweb", url, "--state", str(state), *FAST, *extra])


@pytest.fixture(scope="module")
def studies(orthanc, xray_sources, tmp_path_factory):
    """A DX MONOCHROME2 child, a CR MONOCHROME1 child, an adult (age warning), a blank image (flagged out of
    distribution) and an instance without pixel data, uploaded to Orthanc."""
    folder = tmp_path_factory.mktemp("studies")
    normal, pneumonia = xray_sources["NORMAL"], xray_sources["PNEUMONIA"]
    files = {"dx": xray_dicom(pneumonia[0], folder / "dx.dcm", "DX", patient_id="P1"),
             "cr_mono1": xray_dicom(normal[0], folder / "cr_mono1.dcm", "CR", "MONOCHROME1", patient_id="P2",
                                    view="AP", sex="M"),
             "adult": xray_dicom(pneumonia[1], folder / "adult.dcm", "DX", patient_id="P3", age="045Y"),
             "blank": xray_dicom(np.full((224, 224), 90, np.uint8), folder / "blank.dcm", "CR", patient_id="P4"),
             "no_pixels": xray_dicom(normal[1], folder / "no_pixels.dcm", "DX", patient_id="P5", pixel_data=False)}
    for path in files.values():
        orthanc.upload(path)
    return {name: (path, pydicom.dcmread(path, stop_before_pixels=True)) for name, path in files.items()}


def test_round_trip_reports_match_predict(orthanc, studies, trained_run, tmp_path, capsys, caplog):
    checkpoint = trained_run / "best.pt"
    assert run_pacs(checkpoint, orthanc.dicomweb, tmp_path / "state.sqlite", *BASE) == 0
    out, err = capsys.readouterr()
    assert "5 new instance(s), 0 already scored: 4 scored and reported, 1 unreadable" in out
    no_pixels = studies["no_pixels"][1].SOPInstanceUID
    assert f"instance {no_pixels}: unreadable: DICOM has no pixel data\n" in caplog.text and "Traceback" not in err
    reports = reports_in(orthanc)
    expected = predict_json(checkpoint, [path for path, _ in studies.values()], capsys)
    model_id = next(iter(expected.values()))["model"]
    for name in ("dx", "cr_mono1", "adult", "blank"):
        path, header = studies[name]
        report, figures = reports[header.SOPInstanceUID], expected[str(path)]
        assert report["probability"] == pytest.approx(figures["probability"], abs=1e-9), name
        assert report["threshold"] == pytest.approx(figures["threshold"], abs=1e-12)
        assert report["finding"] == {"PNEUMONIA": "Present", "NORMAL": "Absent", None: "Unknown"}[figures["label"]]
        assert report["in_distribution"] == figures["in_distribution"]
        assert report.get("ood_score") == (None if figures["ood_score"] is None else
                                           pytest.approx(figures["ood_score"], abs=1e-9))
        assert report.get("ood_threshold") == figures["ood_threshold"]  # the cut-off the flag was set by
        assert report["warnings"] == figures["warnings"]
        assert report["model_version"] == model_id
        assert report["study_instance_uid"] == header.StudyInstanceUID  # the report sits in the image's study
    assert any("patient age 45 years is outside" in w for w in reports[studies["adult"][1].SOPInstanceUID]["warnings"])
    blank = reports[studies["blank"][1].SOPInstanceUID]
    assert blank["in_distribution"] is False and any("the probability is not reliable" in w for w in blank["warnings"])
    assert blank["finding"] == "Unknown"  # not an X-ray: no label (it had been "Present" or "Absent")
    assert no_pixels not in reports


def test_rerun_scores_only_new_instances(orthanc, studies, trained_run, xray_sources, tmp_path, capsys):
    state, dates = tmp_path / "state.sqlite", ["--study-date", "20240315-20240331"]
    assert run_pacs(trained_run, orthanc.dicomweb, state, *dates) == 0
    before = reports_in(orthanc)
    capsys.readouterr()
    assert run_pacs(trained_run, orthanc.dicomweb, state, *dates) == 0
    assert "0 new instance(s), 5 already scored" in capsys.readouterr().out
    new = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "new.dcm", "DX", patient_id="P6", study_date="20240320")
    orthanc.upload(new)
    assert run_pacs(trained_run, orthanc.dicomweb, state, *dates) == 0
    assert "1 new instance(s), 5 already scored: 1 scored" in capsys.readouterr().out
    after = reports_in(orthanc)  # asserts one report per image: a new state file re-stored, never duplicated
    assert set(after) - set(before) == {pydicom.dcmread(new).SOPInstanceUID}


def test_filters_by_study_date_and_modality(orthanc, studies, trained_run, tmp_path, xray_sources, capsys):
    old = xray_dicom(xray_sources["NORMAL"][1], tmp_path / "old.dcm", "CR", patient_id="P7", study_date="20190101")
    orthanc.upload(old)
    run_pacs(trained_run, orthanc.dicomweb, tmp_path / "a.sqlite", "--study-date", "20180101-20191231")
    assert "1 new instance(s)" in capsys.readouterr().out
    run_pacs(trained_run, orthanc.dicomweb, tmp_path / "b.sqlite", "--modality", "CR", "--study-date", "20240101-")
    assert "2 new instance(s)" in capsys.readouterr().out  # the two CR studies of 2024: cr_mono1 and blank
    assert main(["pacs", str(trained_run), "--dicomweb", orthanc.dicomweb, "--study-date", "2024"]) == 2
    assert "--study-date 2024: give YYYYMMDD" in capsys.readouterr().err


def test_overlay_is_stored_in_the_study_and_never_scored(orthanc, studies, trained_run, tmp_path, capsys):
    state = tmp_path / "state.sqlite"
    assert run_pacs(trained_run, orthanc.dicomweb, state, "--overlay", "--modality", "DX", *BASE) == 0
    overlays = [orthanc.tags(i) for i in orthanc.instances_of_modality("OT")]
    dx_studies = {header.StudyInstanceUID for path, header in studies.values() if header.Modality == "DX"}
    assert {tags["StudyInstanceUID"] for tags in overlays} >= dx_studies - {studies["no_pixels"][1].StudyInstanceUID}
    capsys.readouterr()
    assert run_pacs(trained_run, orthanc.dicomweb, state, "--overlay", "--modality", "DX", "OT", *BASE) == 0
    assert "0 new instance(s), 3 already scored" in capsys.readouterr().out  # our own overlays are not X-rays to score


def test_pacs_down_is_one_line_after_retries(trained_run, tmp_path, capsys, caplog):
    url = f"http://127.0.0.1:{free_port()}/dicom-web"
    assert run_pacs(trained_run, url, tmp_path / "state.sqlite") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "retrying in 0.1 s (attempt 3 of 3)" in caplog.text
    final = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(final) == 1 and url in final[0] and "ConnectionError" in final[0] and "after 3 attempts" in final[0]


def test_transfers_cut_mid_way_are_retried_and_none_is_lost(orthanc, studies, trained_run, tmp_path, capsys,
                                                            caplog):
    proxy = FlakyProxy(orthanc.url)
    try:
        dx, adult = studies["dx"][1], studies["adult"][1]
        proxy.cuts = {f"GET /dicom-web/studies/{dx.StudyInstanceUID}/series": 1,  # cut once: the retry succeeds
                      f"GET /dicom-web/studies/{adult.StudyInstanceUID}/series": float("inf"),  # always cut
                      f"POST /dicom-web/studies/{studies['cr_mono1'][1].StudyInstanceUID}": 1}  # STOW answer cut
        state = tmp_path / "state.sqlite"
        assert run_pacs(trained_run, proxy.url + "/dicom-web", state, *BASE) == 1
        assert "3 scored and reported, 1 unreadable, 0 not X-rays, 1 failed" in capsys.readouterr().out
        assert len(proxy.cut_log) == 1 + 3 + 1
        failed = [r.message for r in caplog.records if "will be tried again" in r.message]
        assert len(failed) == 1 and failed[0].startswith(f"instance {adult.SOPInstanceUID}: WADO-RS retrieve: ")
        assert "ChunkedEncodingError" in failed[0] and "(after 3 attempts)" in failed[0]
        proxy.cuts = {}
        assert run_pacs(trained_run, proxy.url + "/dicom-web", state, *BASE) == 0
        assert "1 new instance(s), 4 already scored: 1 scored" in capsys.readouterr().out
        reports_in(orthanc)  # one report per image: the STOW repeated after a cut answer replaced, not added
    finally:
        proxy.close()


def gone_after(first: str):
    """A gateway that answers 503 to everything once a request line holding ``first`` has come (the PACS behind
    it gone); before that, it forwards."""
    gone = [False]

    def answer(line: str):
        gone[0] = gone[0] or first in line
        return 503 if gone[0] else None
    return answer


@pytest.mark.parametrize("how", ["503", "down", "stow"])
def test_a_pacs_gone_mid_run_stops_the_pass_after_one_instance_s_retries(orthanc, studies, trained_run, tmp_path,
                                                                        capsys, caplog, how):
    """Each instance left had taken its retries in turn (4 attempts, about 7 s each at the default back-off: two
    hours for 1,000) with a line per retry; the pass now stops at the first instance that finds the PACS gone
    (a search without retries confirms it: one instance's failure is not the PACS's)."""
    proxy = FlakyProxy(orthanc.url)
    try:
        if how == "503":
            proxy.refusals = {"": gone_after("/series/")}  # from the first retrieval on
        elif how == "stow":
            proxy.refusals = {"": gone_after("POST ")}  # from the first report's store on
        else:  # the PACS gone after the search: the port closes at the first retrieval
            proxy.refusals = {"/series/": lambda line: proxy.close() or 503}
        url = proxy.url + "/dicom-web"
        assert run_pacs(trained_run, url, tmp_path / "state.sqlite", *BASE) == 1
        out = capsys.readouterr().out
        # at a store, all five were fetched: the one without pixels is recorded unreadable, not left
        left = 3 if how == "stow" else 4
        assert "5 new instance(s), 0 already scored: 0 scored and reported" in out
        assert f"; the PACS became unreachable: {left} instance(s) left for the next run" in out
        tried = [line for line in proxy.seen if ("POST " if how == "stow" else "/series/") in line]
        assert len(tried) == (1 if how == "down" else 3)  # one instance's attempts (--retries 2), no other's
        assert sum("the PACS is unreachable; this pass stops" in r.message for r in caplog.records) == 1
    finally:
        proxy.close()


def test_one_instance_a_gateway_fails_does_not_stop_the_pass(orthanc, studies, trained_run, tmp_path, capsys):
    """A proxy's 504 on one instance (a large one, a slow conversion) while the PACS answers: that instance
    fails, the others are scored (the first version of the rule above stopped every pass at it)."""
    proxy = FlakyProxy(orthanc.url)
    dx = studies["dx"][1]
    try:
        proxy.refusals = {f"/instances/{dx.SOPInstanceUID}": 504}
        assert run_pacs(trained_run, proxy.url + "/dicom-web", tmp_path / "state.sqlite", *BASE) == 1
        out = capsys.readouterr().out
        assert "3 scored and reported, 1 unreadable, 0 not X-rays, 1 failed (tried again next run)" in out
        assert "unreachable" not in out
    finally:
        proxy.close()


def stow_failure(reason: int) -> tuple:
    """A STOW-RS answer that stores nothing: its FailedSOPSequence gives the failure reason."""
    item = {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.88.22"]},
            "00081155": {"vr": "UI", "Value": ["1.2.3.4"]}, "00081197": {"vr": "US", "Value": [reason]}}
    return 200, json.dumps({"00081198": {"vr": "SQ", "Value": [item]}}).encode(), "application/dicom+json"


def stow_failure_xml(reason: int) -> tuple:
    """HTTP 409 with the failure reason in the Native DICOM Model (PS3.19), as a PACS answering in XML sends it."""
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n<NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/'
            'NativeDICOM" xml:space="preserve"><DicomAttribute tag="00081198" vr="SQ" keyword="FailedSOPSequence">'
            '<Item number="1"><DicomAttribute tag="00081155" vr="UI" keyword="ReferencedSOPInstanceUID"><Value '
            f'number="1">1.2.3.4</Value></DicomAttribute><DicomAttribute tag="00081197" vr="US" keyword="Failure'
            f'Reason"><Value number="1">{reason}</Value></DicomAttribute></Item></DicomAttribute></NativeDicomModel>')
    return 409, body.encode(), "application/dicom+xml; charset=utf-8"


def test_an_instance_refused_run_after_run_is_given_up_and_a_transient_failure_never_is(
        orthanc, studies, trained_run, tmp_path, capsys, caplog):
    from pneumonia_cnn.interop.state import ScoredState
    proxy = FlakyProxy(orthanc.url)
    adult, dx, cr = studies["adult"][1], studies["dx"][1], studies["cr_mono1"][1]
    retrieve = f"GET /dicom-web/studies/{adult.StudyInstanceUID}/series"
    refusals = {retrieve: 404,  # listed by QIDO-RS, never sent: an index without its file
                f"POST /dicom-web/studies/{cr.StudyInstanceUID}": stow_failure(0xC000)}  # its report refused
    state, url = tmp_path / "state.sqlite", proxy.url + "/dicom-web"

    def pacs(*extra):
        code = run_pacs(trained_run, url, state, *BASE, "--give-up-after", "2", "--refusal-spacing", "0", *extra)
        return code, capsys.readouterr().out

    try:
        proxy.refusals = refusals
        dx_cut = {f"GET /dicom-web/studies/{dx.StudyInstanceUID}/series": float("inf")}  # the network, always
        proxy.cuts = dict(dx_cut)
        assert pacs("--refusal-spacing", "3600")[0] == 1
        proxy.refusals, proxy.cuts = {k: v for k, v in refusals.items() if k != retrieve}, {**dx_cut, retrieve: 9}
        code, out = pacs("--refusal-spacing", "3600")  # the adult: a network failure keeps its count of 1;
        assert code == 1 and ": 0 scored and reported, 0 unreadable, 0 not X-rays, 3 failed (tried again next run)\n" \
               in out  # the report's second refusal came within the spacing: not counted
        proxy.refusals, proxy.cuts = refusals, dict(dx_cut)
        code, out = pacs()
        assert code == 1 and "3 new instance(s), 2 already scored: 0 scored and reported, 0 unreadable, 0 not " \
               "X-rays, 1 failed (tried again next run), 2 given up (refused by the PACS run after run)\n" in out
        rows = {row["sop_instance_uid"]: row for row in ScoredState(state).rows()}
        assert rows[dx.SOPInstanceUID]["refusals"] == 0 and rows[dx.SOPInstanceUID]["status"] == "failed"
        lines = [r.message for r in caplog.records if f"instance {adult.SOPInstanceUID}: WADO-RS" in r.message]
        assert "HTTP 404" in lines[0] and "(refused in 1 run(s), given up at 2; will be tried again" in lines[0]
        assert lines[-1].endswith("(refused in 2 runs: given up; --retry-given-up fetches it again)")
        assert any("failure reason 49152" in r.message and "given up" in r.message for r in caplog.records)
        assert sum(retrieve in line for line in proxy.seen) == 1 + 3 + 1  # a refusal is not retried within a run
        proxy.cuts = {}
        code, out = pacs()
        assert code == 0 and "1 new instance(s), 2 already scored: 1 scored and reported, 0 unreadable, 0 not " \
               "X-rays, 0 failed (tried again next run); 2 given up earlier (--retry-given-up)\n" in out
        assert sum(retrieve in line for line in proxy.seen) == 5  # not fetched again
        code, out = pacs("--retry-given-up", "--give-up-after", "1")  # still refused: given up again, exit 1
        assert code == 1 and ": 0 scored and reported, 0 unreadable, 0 not X-rays, 0 failed (tried again next " \
               "run), 2 given up" in out and sum(retrieve in line for line in proxy.seen) == 6
        proxy.refusals = {}
        code, out = pacs("--retry-given-up")
        assert code == 0 and "2 new instance(s), 3 already scored: 2 scored and reported" in out
        reports = reports_in(orthanc)
        assert {adult.SOPInstanceUID, dx.SOPInstanceUID, cr.SOPInstanceUID} <= set(reports)
    finally:
        proxy.close()


def test_a_refused_overlay_leaves_the_stored_report_done(orthanc, trained_run, xray_sources, tmp_path, capsys):
    """The PACS stores the SR but refuses the optional overlay (a STOW-RS failure reason of its own): the instance
    is done, said so, and nothing is sent again; an out-of-resources answer (A7xx) is tried again next run."""
    from pneumonia_cnn.interop.state import ScoredState
    path = xray_dicom(xray_sources["PNEUMONIA"][1], tmp_path / "o.dcm", "DX", patient_id="P9", study_date="20240402")
    orthanc.upload(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    overlay_post = (f"POST /dicom-web/studies/{header.StudyInstanceUID}", b"1.2.840.10008.5.1.4.1.1.7\x00")
    proxy, state = FlakyProxy(orthanc.url), tmp_path / "state.sqlite"

    def pacs(state_file):
        code = run_pacs(trained_run, proxy.url + "/dicom-web", state_file, "--overlay", "--study-date", "20240402")
        return code, capsys.readouterr().out

    try:
        proxy.refusals = {overlay_post: stow_failure(0xA700)}  # out of resources: the whole instance next run
        code, out = pacs(tmp_path / "transient.sqlite")
        assert code == 1 and ": 0 scored and reported, 0 unreadable, 0 not X-rays, 1 failed" in out
        proxy.refusals = {overlay_post: stow_failure(0xC000)}
        code, out = pacs(state)
        assert code == 0 and "1 new instance(s), 0 already scored: 1 scored and reported, 0 unreadable, 0 not " \
            "X-rays, 0 failed (tried again next run); 1 overlay(s) refused by the PACS (their reports are stored)" \
            in out
        assert " (overlay refused by the PACS)\n" in out
        assert header.SOPInstanceUID in reports_in(orthanc)  # the SR is there (once: reports_in checks)
        assert not [i for i in orthanc.instances_of_modality("OT")
                    if orthanc.tags(i)["StudyInstanceUID"] == header.StudyInstanceUID]
        row = next(r for r in ScoredState(state).rows() if r["sop_instance_uid"] == header.SOPInstanceUID)
        assert row["status"] == "done" and row["overlay_uid"] is None and row["report_uid"]
        assert row["error"].startswith("overlay refused: ") and "failure reason 49152" in row["error"]
        posts = sum(line.startswith("POST") for line in proxy.seen)
        assert pacs(state) == (0, "0 new instance(s), 1 already scored: 0 scored and reported, 0 unreadable, 0 not "
                                  "X-rays, 0 failed (tried again next run)\n")
        assert sum(line.startswith("POST") for line in proxy.seen) == posts  # nothing sent again
        # the standard's answer when nothing of a STOW-RS was stored: HTTP 409 with the failure reason
        proxy.refusals = {overlay_post: (409, *stow_failure(0xC000)[1:])}
        code, out = pacs(tmp_path / "conflict.sqlite")
        assert code == 0 and "1 scored and reported" in out and "1 overlay(s) refused by the PACS" in out
        row = next(r for r in ScoredState(tmp_path / "conflict.sqlite").rows())
        assert row["status"] == "done" and "HTTP 409, failure reason 49152" in row["error"]
        proxy.refusals = {overlay_post: (400, *stow_failure(0xC122)[1:])}  # 400 with the sequence: refused too
        code, out = pacs(tmp_path / "bad.sqlite")
        assert code == 0 and "1 overlay(s) refused by the PACS" in out
        proxy.refusals = {overlay_post: stow_failure_xml(0xC000)}  # the same in the Native DICOM Model's XML
        code, out = pacs(tmp_path / "xml.sqlite")
        assert code == 0 and "1 overlay(s) refused by the PACS" in out
        assert "HTTP 409, failure reason 49152" in next(r for r in ScoredState(tmp_path / "xml.sqlite").rows())["error"]
        proxy.refusals = {overlay_post: (400, b"<html>Bad Request</html>", "text/html")}  # a proxy's: no reason
        code, out = pacs(tmp_path / "proxy.sqlite")
        assert code == 1 and "0 scored and reported, 0 unreadable, 0 not X-rays, 1 failed" in out
        row = next(r for r in ScoredState(tmp_path / "proxy.sqlite").rows())
        assert row["status"] == "failed" and row["refusals"] == 0
    finally:
        proxy.close()


def test_odd_qido_answers_end_in_one_line_and_never_loop(trained_run, tmp_path, capsys, caplog):
    """A server that ignores QIDO-RS paging used to be asked forever (3,131 requests in 25 s in a probe); items
    that are not objects gave a traceback; records without their study UID failed on every run."""
    from pneumonia_cnn.interop.state import ScoredState
    asked = []

    def same_page(request_line):  # 200 records whatever the offset, and none after the 10th request
        asked.append(request_line)
        records = [] if len(asked) > 10 else [
            {"00080018": {"vr": "UI", "Value": [f"1.2.3.{i}"]}, "00080060": {"vr": "CS", "Value": ["DX"]}}
            for i in range(200)]
        return 200, json.dumps(records).encode(), "application/dicom+json"

    proxy, state = FlakyProxy(f"http://127.0.0.1:{free_port()}"), tmp_path / "state.sqlite"
    url = proxy.url + "/dicom-web"
    try:
        proxy.refusals = {"GET /dicom-web/instances": same_page}
        assert run_pacs(trained_run, url, state, "--modality", "DX") == 1  # given up on: the run says so
        assert len(asked) == 2  # the first page, then the same page again: stopped there
        assert "ignores paging, or a page's worth arrived meanwhile); stopped after 200, the rest on" in caplog.text
        assert "200 new instance(s), 0 already scored: 0 scored and reported, 0 unreadable, 0 not X-rays, 0 failed " \
               "(tried again next run), 200 given up" in capsys.readouterr().out
        rows = ScoredState(state).rows()
        assert len(rows) == 200 and rows[0]["error"] == "QIDO-RS listed it without its study instance UID"
        assert rows[0]["status"] == "given_up"  # so that --retry-given-up fetches them once the PACS lists them whole
        assert run_pacs(trained_run, url, state, "--modality", "DX") == 0
        assert "0 new instance(s), 0 already scored: 0 scored and reported, 0 unreadable, 0 not X-rays, 0 failed " \
               "(tried again next run); 200 given up earlier (--retry-given-up)" in capsys.readouterr().out
        asked.clear()
        proxy.refusals = {"GET /dicom-web/instances": lambda line: (  # full pages holding no instance at all
            200, json.dumps([{"0020000D": {"vr": "UI", "Value": ["1.2"]}}, 1, None] * 67 if len(asked) < 20
                            else []).encode(), "application/dicom+json") if not asked.append(line) else None}
        assert run_pacs(trained_run, url, tmp_path / "a.sqlite", "--modality", "DX") == 2
        assert len(asked) == 1  # a full page with no instance in it: not asked again (it was, without end)
        assert "the answer lists no instance (201 item(s), none with a SOP Instance UID): is --dicomweb the " \
               "PACS's DICOMweb root?" in capsys.readouterr().err
        # junk, or a login proxy's JSON object: an error (exit 2), not "0 new instance(s)" with exit 0
        for junk, items in ((b'[1, "x", null]', 3), (b'{"a": 1}', 1)):
            proxy.refusals = {"GET /dicom-web/instances": (200, junk, "application/dicom+json")}
            assert run_pacs(trained_run, url, tmp_path / "b.sqlite", "--modality", "DX") == 2
            err = capsys.readouterr().err
            assert f"the answer lists no instance ({items} item(s)" in err and "Traceback" not in err
    finally:
        proxy.close()


def test_an_instance_listed_with_a_uid_that_is_not_one_is_given_up_not_retried_forever(trained_run, tmp_path,
                                                                                       capsys, caplog):
    """A 300-character SOP Instance UID failed in dicomweb-client on every run (exit 1 forever), and its log
    line printed all of it."""
    long_uid = "1.2." + "3" * 296
    record = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
              "00080018": {"vr": "UI", "Value": [long_uid]}, "00080060": {"vr": "CS", "Value": ["DX"]}}
    proxy, state = FlakyProxy(f"http://127.0.0.1:{free_port()}"), tmp_path / "state.sqlite"
    try:
        proxy.refusals = {"GET /dicom-web/instances": (200, json.dumps([record]).encode(), "application/dicom+json")}
        assert run_pacs(trained_run, proxy.url + "/dicom-web", state, "--modality", "DX") == 1
        assert f"with a SOP instance UID that is not a UID ({long_uid[:64]}… (300 characters))" in caplog.text
        assert long_uid not in caplog.text and "1 given up" in capsys.readouterr().out
        assert run_pacs(trained_run, proxy.url + "/dicom-web", state, "--modality", "DX") == 0  # not fetched again
    finally:
        proxy.close()


def test_an_instance_above_the_size_limit_is_not_read_and_not_fetched_again(trained_run, xray_sources, tmp_path,
                                                                             capsys, caplog):
    """pacs had no limit: a 98 MB instance took the process to 976 MB, five answers of 200 MB to 4.6 GB. An
    answer above --max-instance-mb is refused by its length (or as it arrives), the instance counted unreadable
    with that reason, the small one beside it scored."""
    from PIL import Image
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        gray = np.asarray(Image.open(xray_sources["NORMAL"][0]).convert("L").resize((2048, 2048)))
        big = xray_dicom(gray, tmp_path / "big.dcm", "DX", patient_id="P10")  # 8 MB of 12-bit pixels
        server.upload(big)
        server.upload(xray_dicom(xray_sources["NORMAL"][1], tmp_path / "small.dcm", "DX", patient_id="P11"))
        state = tmp_path / "state.sqlite"
        assert run_pacs(trained_run, server.dicomweb, state, "--max-instance-mb", "5") == 1  # cron notices
        out = capsys.readouterr().out
        assert "2 new instance(s), 0 already scored: 1 scored and reported, 0 unreadable" in out and "1 given up" in out
        uid = pydicom.dcmread(big).SOPInstanceUID
        assert re.search(rf"instance {uid}: (8\.\d MB, above|more than) (the )?5 MB (limit )?\(--max-instance-mb\) "
                         r"\(given up; a larger --max-instance-mb with --retry-given-up fetches it again\)",
                         caplog.text), caplog.text
        assert run_pacs(trained_run, server.dicomweb, state, "--max-instance-mb", "5") == 0
        assert "0 new instance(s), 1 already scored" in capsys.readouterr().out  # not fetched again
        assert run_pacs(trained_run, server.dicomweb, state, "--retry-given-up") == 0  # the default 256 MB
        assert "1 new instance(s), 1 already scored: 1 scored and reported" in capsys.readouterr().out
    finally:
        server.stop()


def test_an_answer_whose_length_is_above_the_limit_is_not_read(trained_run, tmp_path, capsys, caplog):
    record = {"0020000D": {"vr": "UI", "Value": ["1.2.3"]}, "0020000E": {"vr": "UI", "Value": ["1.2.3.4"]},
              "00080018": {"vr": "UI", "Value": ["1.2.3.4.5"]}, "00080060": {"vr": "CS", "Value": ["DX"]}}
    proxy, state = FlakyProxy(f"http://127.0.0.1:{free_port()}"), tmp_path / "state.sqlite"
    try:
        proxy.refusals = {"GET /dicom-web/instances": (200, json.dumps([record]).encode(), "application/dicom+json"),
                          "GET /dicom-web/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5": (
                              200, bytes(6 * 2**20), "multipart/related; type=\"application/dicom\"")}
        assert run_pacs(trained_run, proxy.url + "/dicom-web", state, "--modality", "DX",
                        "--max-instance-mb", "5") == 1
        assert "instance 1.2.3.4.5: 6.0 MB, above the 5 MB limit (--max-instance-mb) (given up" in caplog.text
        assert "1 given up" in capsys.readouterr().out
    finally:
        proxy.close()


def jpeg12_in(server, source, tmp_path):
    """An X-ray stored in Orthanc as 12-bit JPEG Extended (which neither GDCM nor Pillow decodes)."""
    plain = server.upload(xray_dicom(source, tmp_path / "p.dcm", "DX", patient_id="P12"))
    answer = server.http.post(f"{server.url}/instances/{plain['ID']}/modify", timeout=30, json={
        "Transcode": "1.2.840.10008.1.2.4.51", "Force": True, "Keep": ["SOPInstanceUID"]})
    answer.raise_for_status()
    server.http.delete(f"{server.url}/instances/{plain['ID']}", timeout=10)
    (tmp_path / "jpeg12.dcm").write_bytes(answer.content)
    assert pydicom.dcmread(tmp_path / "jpeg12.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    server.upload(tmp_path / "jpeg12.dcm")


def test_a_12_bit_jpeg_instance_is_asked_for_again_decoded(trained_run, xray_sources, tmp_path, capsys):
    """It was counted unreadable; asked for again in Explicit VR Little Endian, Orthanc converts it and the
    X-ray is scored. A 503 to that second request is a failure tried again next run, not "unreadable"."""
    import requests

    from pneumonia_cnn.inference import Predictor
    from pneumonia_cnn.interop.dicomweb import PacsJob, PacsOptions
    from pneumonia_cnn.interop.dicomweb_session import connect
    require_orthanc()
    server = Orthanc(tmp_path / "orthanc").start()
    try:
        jpeg12_in(server, xray_sources["PNEUMONIA"][0], tmp_path)
        client = connect(server.dicomweb)
        first = client.retrieve_instance

        def busy_when_converting(*uids, media_types=None):
            if media_types:
                answer = requests.Response()
                answer.status_code = 503
                raise requests.HTTPError("503 Service Unavailable", response=answer)
            return first(*uids)
        client.retrieve_instance = busy_when_converting
        options = PacsOptions(server.dicomweb, str(tmp_path / "state.sqlite"), attempts=1)
        summary = PacsJob(Predictor(trained_run, "cpu"), options, client=client).run_once()
        assert (summary["failed"], summary["unreadable"], summary["scored"]) == (1, 0, 0)
        assert run_pacs(trained_run, server.dicomweb, tmp_path / "state.sqlite") == 0
        assert "1 new instance(s), 0 already scored: 1 scored and reported, 0 unreadable" in capsys.readouterr().out
    finally:
        server.stop()


def test_an_instance_sent_in_chunks_is_cut_off_at_the_limit_and_searches_are_not_limited():
    """The branch for answers without a length (Orthanc's chunked WADO-RS): reading stops once the limit has
    arrived; a QIDO-RS page is not an instance and is left alone."""
    import requests

    from pneumonia_cnn.interop.dicomweb_session import AnswerTooLarge, body_limit

    class Chunks:
        def __init__(self):
            self.read = 0

        def close(self):
            self.closed = True

        def stream(self, *args, **kwargs):
            for _ in range(100):
                self.read += 2**20
                yield bytes(2**20)

    def answer(url):
        response = requests.Response()
        response.url, response.raw, response.status_code = url, Chunks(), 200
        return body_limit(5 * 2**20)(response)

    cut = answer("http://pacs/dicom-web/studies/1/series/2/instances/3")
    with pytest.raises(AnswerTooLarge, match=r"more than 5 MB \(--max-instance-mb\)"):
        cut.content  # noqa: B018 - reading the body is the act under test
    assert cut.raw.read == 6 * 2**20 and cut.raw.closed  # the sixth MB passed the limit; the other 94 never read
    search = answer("http://pacs/dicom-web/instances?Modality=DX")
    assert len(search.content) == 100 * 2**20


def trickling_server(kind: str, pause: float) -> str:
    """One HTTP answer of 40 bytes, one byte every ``pause`` seconds, framed by a Content-Length, chunks, or the
    connection's close."""
    import socket
    import threading
    import time
    server = socket.create_server(("127.0.0.1", 0))

    def answer():
        connection, _ = server.accept()
        connection.recv(65536)
        framing = {"length": b"Content-Length: 40\r\n", "chunked": b"Transfer-Encoding: chunked\r\n",
                   "close": b"Connection: close\r\n"}[kind]
        try:
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n" + framing + b"\r\n")
            for _ in range(40):
                time.sleep(pause)
                connection.sendall(b"1\r\nx\r\n" if kind == "chunked" else b"x")
            connection.sendall(b"0\r\n\r\n" if kind == "chunked" else b"")
        except OSError:  # the client gave up
            pass
        connection.close()
        server.close()
    threading.Thread(target=answer, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}/dicom-web/studies/1/series/2/instances/3"


@pytest.mark.parametrize("kind", ["length", "chunked", "close"])
def test_an_answer_trickling_in_is_given_up_at_the_answer_timeout(kind):
    """requests' timeout bounds each wait between bytes: a PACS sending a byte every 2 s held a job for good. A
    check between reads alone waited for a whole 10 KiB block when the answer had a Content-Length (10 s for a
    1 s limit); the deadline now ends a read blocked on the socket, and an answer cut short is never taken
    as complete."""
    import time

    import requests

    from pneumonia_cnn.interop.dicomweb_session import answer_deadline
    session = requests.Session()
    session.hooks["response"].append(answer_deadline(1.0))
    start = time.monotonic()  # bounds with room for a loaded machine (connecting, a late timer: 2.5 s seen)
    with pytest.raises(requests.Timeout, match=r"not complete 1 s after it began \(--answer-timeout\)"):
        session.get(trickling_server(kind, 0.2), timeout=5)  # 8 s in all, each wait 0.2 s
    assert 0.9 <= time.monotonic() - start < 4.0
    roomy = requests.Session()  # 40 sleeps of 5 ms took over 1 s on a loaded machine
    roomy.hooks["response"].append(answer_deadline(5.0))
    assert len(roomy.get(trickling_server(kind, 0.005), timeout=5).content) == 40  # within its time: whole
    from pneumonia_cnn.interop.dicomweb_session import connect
    client = connect(trickling_server(kind, 0.2).split("/studies/")[0], timeout=5, answer_timeout=1.0)
    start = time.monotonic()
    with pytest.raises(requests.Timeout, match="--answer-timeout"):  # what pacs builds: the hook is on it
        client.retrieve_instance("1", "2", "3")
    assert time.monotonic() - start < 4.0


def test_the_answer_timeout_never_cuts_a_later_request_on_the_same_connection():
    """A consumer that stopped at the last chunk of a whole answer left the timer armed while urllib3 had handed the
    connection back to the pool: at the deadline it cut the next request's answer on that connection."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests

    from pneumonia_cnn.interop.dicomweb_session import answer_deadline

    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the second request reuses the first's connection

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(10):
                if self.path == "/slow":
                    time.sleep(0.1)
                self.wfile.write(b"x" * 10000)
                self.wfile.flush()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        session = requests.Session()
        first = session.get(url + "/fast", stream=True, hooks={"response": [answer_deadline(0.3)]})
        chunks = first.iter_content(100000)
        assert len(next(chunks)) == 100000  # whole; the generator is kept, not run to its end
        later = session.get(url + "/slow", hooks={"response": [answer_deadline(10)]})  # 1 s, past the 0.3 s
        assert len(later.content) == 100000
    finally:
        server.shutdown()


def test_credentials_are_checked_before_any_request_and_never_shown(monkeypatch):
    """A token file read with its line ending made requests refuse the header and quote it, token included, in
    the error line; a password without --user was sent to nobody (the PACS's 401 said nothing of why)."""
    from pneumonia_cnn.interop.dicomweb_session import connect
    monkeypatch.setenv("PNEUMONIA_CNN_DICOMWEB_TOKEN", "eyJhbGciOiJSUzI1NiJ9.PAYLOAD.sig\r\n")
    client = connect("http://127.0.0.1:9/dicom-web")
    assert client._session.headers["Authorization"] == "Bearer eyJhbGciOiJSUzI1NiJ9.PAYLOAD.sig"
    monkeypatch.setenv("PNEUMONIA_CNN_DICOMWEB_TOKEN", "eyJ.SECRET sig")
    with pytest.raises(PneumoniaCNNError) as refused:
        connect("http://127.0.0.1:9/dicom-web")
    assert "not a bearer token (14 characters" in str(refused.value) and "SECRET" not in str(refused.value)
    monkeypatch.setenv("PNEUMONIA_CNN_DICOMWEB_TOKEN", " \n")  # blank: an error too, not quietly no token
    with pytest.raises(PneumoniaCNNError, match="not a bearer token"):
        connect("http://127.0.0.1:9/dicom-web")
    monkeypatch.delenv("PNEUMONIA_CNN_DICOMWEB_TOKEN")
    monkeypatch.setenv("PNEUMONIA_CNN_DICOMWEB_PASSWORD", "s3cret")
    with pytest.raises(PneumoniaCNNError, match="PNEUMONIA_CNN_DICOMWEB_PASSWORD is set but --user is not"):
        connect("http://127.0.0.1:9/dicom-web")


def test_a_refused_connection_says_so_in_its_line():
    """requests puts the reason last, past the 200 characters kept: "refused", "cannot resolve" and "timed out"
    all read "Max retries exceeded with url: /dicom-web/instances?Modality=CR&... (" before."""
    import requests

    from pneumonia_cnn.interop.network import one_line
    with pytest.raises(requests.ConnectionError) as failed:
        requests.get(f"http://127.0.0.1:{free_port()}/dicom-web/instances?Modality=CR&StudyDate=20240101-20241231"
                     "&limit=200&offset=0&includefield=00080020&includefield=00080060", timeout=5)
    line = one_line(failed.value)
    assert line.startswith("ConnectionError: ") and line.endswith("[Errno 111] Connection refused"), line


def test_watch_polls_and_survives_an_outage(orthanc, studies, trained_run, xray_sources, tmp_path):
    from pneumonia_cnn.inference import Predictor
    from pneumonia_cnn.interop.dicomweb import PacsJob, PacsOptions
    proxy = FlakyProxy(orthanc.url)
    summaries = []

    def between_polls(summary):
        summaries.append(summary)
        if len(summaries) == 1:  # after the first poll: the PACS fails once, and a new study arrives
            proxy.cuts = {"GET /dicom-web/instances": 2}
            orthanc.upload(xray_dicom(xray_sources["PNEUMONIA"][0], tmp_path / "late.dcm", "DX", patient_id="P8",
                                      study_date="20240601"))
    try:
        options = PacsOptions(proxy.url + "/dicom-web", str(tmp_path / "state.sqlite"), study_date="20240601",
                              attempts=2, backoff=0.01)
        job = PacsJob(Predictor(trained_run, "cpu"), options)
        job.watch(0.05, 3, between_polls)
        assert [s["scored"] for s in summaries] == [0, 1]  # poll 2 failed (reported), poll 3 caught up
    finally:
        proxy.close()


def test_a_pacs_that_asks_for_a_password(trained_run, xray_sources, tmp_path, capsys, monkeypatch):
    require_orthanc()
    secured = Orthanc(tmp_path / "orthanc", users={"ai": "s3cret"}).start()
    try:
        secured.upload(xray_dicom(xray_sources["NORMAL"][0], tmp_path / "x.dcm", "DX", patient_id="P9"))
        assert run_pacs(trained_run, secured.dicomweb, tmp_path / "state.sqlite") == 2
        err = capsys.readouterr().err  # refused without credentials; a refusal is not retried
        assert err.startswith("error: ") and "HTTP 401 HTTPError" in err and "attempts" not in err
        assert main(["pacs", str(trained_run), "--dicomweb", secured.dicomweb, "--user", "ai"]) == 2
        assert "--user ai: set the password in PNEUMONIA_CNN_DICOMWEB_PASSWORD" in capsys.readouterr().err
        monkeypatch.setenv("PNEUMONIA_CNN_DICOMWEB_PASSWORD", "s3cret")
        assert run_pacs(trained_run, secured.dicomweb, tmp_path / "state.sqlite", "--user", "ai") == 0
        assert "1 new instance(s), 0 already scored: 1 scored" in capsys.readouterr().out
    finally:
        secured.stop()


def test_a_stow_answer_that_does_not_name_the_report_is_not_taken_as_stored(orthanc, trained_run, xray_sources,
                                                                          tmp_path, capsys):
    """A 200 with an empty body or a login page (a proxy, a redirect that turned the POST into a GET) was recorded
    as done: the PACS held no report, and a rerun said "already scored", so it never got one."""
    from pneumonia_cnn.interop.state import ScoredState
    path = xray_dicom(xray_sources["NORMAL"][0], tmp_path / "s.dcm", "DX", patient_id="P11", study_date="20240403")
    orthanc.upload(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    sr_post = (f"POST /dicom-web/studies/{header.StudyInstanceUID}", b"1.2.840.10008.5.1.4.1.1.88.33\x00")
    proxy, state = FlakyProxy(orthanc.url), tmp_path / "state.sqlite"
    try:
        for answer in [(200, b"", "application/dicom+json"), (200, b"<html>Sign in</html>", "text/html"),
                       (200, b"{}", "application/dicom+json")]:
            proxy.refusals = {sr_post: answer}
            assert run_pacs(trained_run, proxy.url + "/dicom-web", state, "--study-date", "20240403") == 1
            out = capsys.readouterr().out
            assert "0 scored and reported, 0 unreadable, 0 not X-rays, 1 failed" in out, answer
            (row,) = ScoredState(state).rows()
            assert row["status"] == "failed" and "does not name" in row["error"] and row["refusals"] == 0
            assert header.SOPInstanceUID not in reports_in(orthanc)
        proxy.refusals = {}
        assert run_pacs(trained_run, proxy.url + "/dicom-web", state, "--study-date", "20240403") == 0
        assert "1 new instance(s), 0 already scored: 1 scored and reported" in capsys.readouterr().out
        assert header.SOPInstanceUID in reports_in(orthanc)
    finally:
        proxy.close()


def test_pages_shorter_than_asked_for_are_not_taken_for_the_last(orthanc, studies, trained_run, tmp_path, capsys):
    """A PACS may answer fewer results than the limit (PS3.18; Orthanc's LimitFindInstances): the job stopped at
    the first short page, and the instances past it were never scored, run after run."""
    import requests

    from pneumonia_cnn.interop.state import ScoredState

    def at_most_two(line: str):  # QIDO-RS through a PACS that caps every page at two results
        capped = re.sub(r"limit=\d+", "limit=2", line.split(" ", 1)[1])
        answer = requests.get(orthanc.url + capped, headers={"Accept": "application/dicom+json"}, timeout=30)
        return answer.status_code, answer.content, "application/dicom+json"

    proxy = FlakyProxy(orthanc.url)
    proxy.refusals = {"GET /dicom-web/instances?": at_most_two}
    try:
        run_pacs(trained_run, proxy.url + "/dicom-web", tmp_path / "capped.sqlite", *BASE)
        capped = {r["sop_instance_uid"] for r in ScoredState(tmp_path / "capped.sqlite").rows()}
        run_pacs(trained_run, orthanc.dicomweb, tmp_path / "plain.sqlite", *BASE)
        capsys.readouterr()
        plain = {r["sop_instance_uid"] for r in ScoredState(tmp_path / "plain.sqlite").rows()}
        assert len(plain) >= 4 and capped == plain
        assert sum("limit=" in line for line in proxy.seen) >= 3  # several pages were asked for
    finally:
        proxy.close()


def test_an_answer_that_is_not_the_instance_is_recorded_under_the_uid_it_was_listed_by(
        orthanc, trained_run, xray_sources, tmp_path, capsys, caplog):
    """A WADO-RS answer holding junk was logged as "instance ?" and recorded under "?", so the listed instance
    was fetched again on every run."""
    from pneumonia_cnn.interop.state import ScoredState
    path = xray_dicom(xray_sources["NORMAL"][1], tmp_path / "j.dcm", "DX", patient_id="P12", study_date="20240404")
    orthanc.upload(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)
    junk = (b"--X\r\nContent-Type: application/dicom\r\n\r\n" + bytes(128) + b"DICM" + bytes(range(200))
            + b"\r\n--X--")
    proxy = FlakyProxy(orthanc.url)
    proxy.refusals = {f"GET /dicom-web/studies/{header.StudyInstanceUID}/series/":
                      (200, junk, 'multipart/related; type="application/dicom"; boundary=X')}
    state = tmp_path / "state.sqlite"
    try:
        run_pacs(trained_run, proxy.url + "/dicom-web", state, "--study-date", "20240404")
        assert "1 unreadable" in capsys.readouterr().out
        assert f"instance {header.SOPInstanceUID}: unreadable: " in caplog.text and "instance ?" not in caplog.text
        (row,) = ScoredState(state).rows()
        assert row["sop_instance_uid"] == header.SOPInstanceUID and row["status"] == "unreadable"
        assert run_pacs(trained_run, proxy.url + "/dicom-web", state, "--study-date", "20240404") == 0
        assert "0 new instance(s), 1 already scored" in capsys.readouterr().out  # not fetched again
    finally:
        proxy.close()


def test_watch_survives_a_state_file_locked_by_another_process(orthanc, studies, trained_run, tmp_path, monkeypatch,
                                                                caplog):
    """Another process holding the state file past the wait ended a --watch job with sqlite's traceback."""
    import sqlite3

    from pneumonia_cnn.inference import Predictor
    from pneumonia_cnn.interop import dicomweb
    options = dicomweb.PacsOptions(orthanc.dicomweb, str(tmp_path / "state.sqlite"), study_date="20240315",
                                   attempts=1)
    job = dicomweb.PacsJob(Predictor(trained_run, "cpu"), options)
    job.state.db.execute("PRAGMA busy_timeout = 100")  # not the 30 s a job waits
    other, summaries, pauses = sqlite3.connect(options.state), [], []

    def between_polls(summary):
        summaries.append(summary)
        if len(summaries) == 1:
            other.execute("BEGIN EXCLUSIVE")  # a backup tool, an operator's sqlite3 shell

    def pause(seconds):
        pauses.append(seconds)
        if len(pauses) == 2:  # after the poll that found the file locked
            other.rollback()

    monkeypatch.setattr(dicomweb.time, "sleep", pause)
    job.watch(0.05, 3, between_polls)
    assert len(summaries) == 2 and summaries[0]["scored"] >= 3 and summaries[1]["found"] == 0
    assert "state.sqlite: cannot read the state file (database is locked); polling again" in caplog.text


@pytest.mark.parametrize("kind", ["application/dicom+json; charset=utf-8", "application/json;charset=UTF-8",
                                  "application/dicom+xml; charset=utf-8"])
def test_a_stow_answer_with_media_type_parameters_is_read(kind):
    """dicomweb-client reads a STOW-RS answer only when its Content-Type is bare, and returned an empty dataset
    for "application/dicom+json; charset=utf-8" (which servers send): the answer as sent is read instead, so
    a stored report is not failed forever, and a refusal in it is still a refusal."""
    import requests

    from pneumonia_cnn.interop.network import TransferError
    from pneumonia_cnn.interop.stow import stow as _stow

    def answer(element: str, item: dict) -> bytes:
        if "json" in kind:
            return json.dumps({element: {"vr": "SQ", "Value": [item]}}).encode()
        values = "".join(f'<DicomAttribute tag="{tag}" vr="{v["vr"]}"><Value number="1">{v["Value"][0]}</Value>'
                         f'</DicomAttribute>' for tag, v in item.items())
        return (f'<?xml version="1.0"?><NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">'
                f'<DicomAttribute tag="{element}" vr="SQ"><Item number="1">{values}</Item></DicomAttribute>'
                f'</NativeDicomModel>').encode()

    class Client:
        def __init__(self, body):
            response = requests.Response()
            response.status_code, response._content, response.headers["Content-Type"] = 200, body, kind
            self.last_post = {"response": response}

        def store_instances(self, datasets, study_instance_uid=None):
            return pydicom.Dataset()  # what dicomweb-client gives for such a Content-Type

    report = pydicom.Dataset()
    report.SOPInstanceUID = "1.2.3.4.5"
    stored = answer("00081199", {"00081155": {"vr": "UI", "Value": ["1.2.3.4.5"]}})
    _stow(Client(stored), report, "1.2.3")  # no error: stored
    other = answer("00081199", {"00081155": {"vr": "UI", "Value": ["9.9.9"]}})
    with pytest.raises(TransferError, match="does not name 1.2.3.4.5"):
        _stow(Client(other), report, "1.2.3")
    refused = answer("00081198", {"00081155": {"vr": "UI", "Value": ["1.2.3.4.5"]},
                                  "00081197": {"vr": "US", "Value": [0xC000]}})
    with pytest.raises(TransferError, match="failure reason 49152") as caught:
        _stow(Client(refused), report, "1.2.3")
    assert caught.value.refusal
    # 0111 (Duplicate SOP Instance): a report's UID comes from its source, model and pixels: this very report
    duplicate = answer("00081198", {"00081155": {"vr": "UI", "Value": ["1.2.3.4.5"]},
                                    "00081197": {"vr": "US", "Value": [0x0111]}})
    _stow(Client(duplicate), report, "1.2.3")  # no error: held already (it was a refusal)
    # through the client pacs builds (connect keeps the answer as sent) and a server that answers so
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from pneumonia_cnn.interop.dicomweb_session import connect

    class Pacs(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(stored)))
            self.end_headers()
            self.wfile.write(stored)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pacs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    report.file_meta = FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    try:
        _stow(connect(f"http://127.0.0.1:{server.server_address[1]}/dicom-web"), report, "1.2.3")  # stored
    finally:
        server.shutdown()


def test_an_answer_holding_another_instance_is_not_taken_for_the_listed_one(orthanc, trained_run, xray_sources,
                                                                             tmp_path, capsys, caplog):
    """A WADO-RS answer holding another instance would have marked the listed one done with that one's report."""
    from pneumonia_cnn.interop.state import ScoredState
    listed = xray_dicom(xray_sources["PNEUMONIA"][0], tmp_path / "a.dcm", "DX", patient_id="P13", study_date="20240405")
    other = xray_dicom(xray_sources["PNEUMONIA"][1], tmp_path / "b.dcm", "DX", patient_id="P14", study_date="20240405")
    orthanc.upload(listed)
    header = pydicom.dcmread(listed, stop_before_pixels=True)
    body = b"--X\r\nContent-Type: application/dicom\r\n\r\n" + other.read_bytes() + b"\r\n--X--"
    proxy = FlakyProxy(orthanc.url)
    proxy.refusals = {f"GET /dicom-web/studies/{header.StudyInstanceUID}/series/":
                      (200, body, 'multipart/related; type="application/dicom"; boundary=X')}
    try:
        assert run_pacs(trained_run, proxy.url + "/dicom-web", tmp_path / "s.sqlite", "--study-date", "20240405") == 1
        assert "0 scored and reported, 0 unreadable, 0 not X-rays, 1 failed" in capsys.readouterr().out
        assert "WADO-RS answered with another instance" in caplog.text
        (row,) = ScoredState(tmp_path / "s.sqlite").rows()
        assert row["sop_instance_uid"] == header.SOPInstanceUID and row["status"] == "failed" and row["refusals"] == 1
        assert header.SOPInstanceUID not in reports_in(orthanc)
    finally:
        proxy.close()
