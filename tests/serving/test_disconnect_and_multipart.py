"""A probe (2026-11-28) found that a client leaving mid-upload logged "POST /predict failed: ClientDisconnect:",
uvicorn's "ERROR: Exception in ASGI application" and a 69-line traceback (55 disconnects: 3,948 log lines), and
that two malformed bodies got a wrong reason: a `file` part without its closing boundary "no multipart field
'file'" (the field was sent), a body that is not multipart under a multipart Content-Type the parser's "Expected
boundary character 45, got 104 at index 2"."""
import re
import socket
import sqlite3
import struct
import time

import httpx
import pytest

from tests.serving.conftest import Server, xray_paths
from tests.serving.raw_http import BOUNDARY, multipart_head, request_head

CONTENT_TYPE = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


@pytest.fixture(scope="module")
def audited(trained_run, tmp_path_factory):
    """A server of its own, with an audit log, whose log holds only what these tests do."""
    workdir = tmp_path_factory.mktemp("disconnect")
    running = Server(trained_run / "best.pt", "--audit-log", workdir / "audit.sqlite", "--max-upload-mb", "2",
                     workdir=workdir)
    running.audit_path = workdir / "audit.sqlite"
    yield running
    running.stop()


def requests_counted(url: str, endpoint: str, status: int) -> float:
    text = httpx.get(f"{url}/metrics").text
    found = re.search(rf'http_requests_total{{endpoint="{re.escape(endpoint)}",status="{status}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def audit_rows(path) -> int:
    with sqlite3.connect(path) as connection:
        return connection.execute("SELECT COUNT(*) FROM predictions").fetchone()[0]


def leave_mid_upload(port: int, path: str, reset: bool) -> None:
    """Send a third of a multipart upload, then close the socket (or reset it: SO_LINGER 0)."""
    field = "files" if path == "/predict/batch" else "file"
    body = multipart_head("x.jpeg", field) + b"\xff\xd8" + b"\0" * 300_000 + f"\r\n--{BOUNDARY}--\r\n".encode()
    request = request_head(port, path, chunked=False, length=len(body)) + body
    sock = socket.create_connection(("127.0.0.1", port))
    if reset:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(request[:len(request) // 3])
    time.sleep(0.3)
    sock.close()


def test_a_client_that_leaves_mid_upload_is_a_499_without_an_error_in_the_log(audited):
    url, port = audited.url, audited.port
    image = xray_paths(1)[0].read_bytes()
    assert httpx.post(f"{url}/predict", files={"file": ("a.jpeg", image)}).status_code == 200
    rows, log_before = audit_rows(audited.audit_path), len(audited.log())
    before = {path: requests_counted(url, path, 499) for path in ("/predict", "/predict/batch")}
    for path in ("/predict", "/predict/batch"):
        for reset in (False, True):
            leave_mid_upload(port, path, reset)
    for _ in range(50):  # the server notices each departure as its next read of the body finds the socket gone
        after = {path: requests_counted(url, path, 499) - before[path] for path in before}
        if after == {"/predict": 2, "/predict/batch": 2}:
            break
        time.sleep(0.2)
    assert after == {"/predict": 2, "/predict/batch": 2}
    time.sleep(0.5)
    logged = audited.log()[log_before:]
    assert not re.search(r"Traceback|failed|ERROR|ClientDisconnect|Exception", logged), logged[:3000]
    assert len(logged.strip().splitlines()) <= 4  # at most one line for each, if any
    assert audit_rows(audited.audit_path) == rows  # nothing scored, nothing audited
    answer = httpx.post(f"{url}/predict", files={"file": ("a.jpeg", image)})  # and the server still answers
    assert answer.status_code == 200 and audit_rows(audited.audit_path) == rows + 1


def test_a_body_without_its_closing_boundary_is_said_to_be_incomplete(audited):
    url = audited.url
    image = xray_paths(1)[0].read_bytes()
    cut = multipart_head("good.jpeg") + image + b"\r\n"  # the whole part; "--BOUNDARY--" never comes
    answer = httpx.post(f"{url}/predict", content=cut, headers=CONTENT_TYPE)
    assert (answer.status_code, answer.json()) == (400, {"detail": (
        "multipart/form-data body incomplete: it ends before its closing boundary (--BOUNDARY-- after the last "
        "part), so its last part is cut short; send the whole body (field 'file')")})
    # a batch whose last part is cut short was scored without it (200, one result for two files)
    batch = multipart_head("0.jpeg", "files") + image + f"\r\n--{BOUNDARY}\r\n".encode()
    batch += multipart_head("1.jpeg", "files")[len(f"--{BOUNDARY}\r\n"):] + image[:1000]
    answer = httpx.post(f"{url}/predict/batch", content=batch, headers=CONTENT_TYPE)
    assert (answer.status_code, answer.json()) == (400, {"detail": (
        "multipart/form-data body incomplete: it ends before its closing boundary (--BOUNDARY-- after the last "
        "part), so its last part is cut short; send the whole body (field 'files')")})
    # an empty body: no field, as before; the same part closed: scored
    answer = httpx.post(f"{url}/predict", content=b"", headers=CONTENT_TYPE)
    assert answer.json() == {"detail": "no multipart field 'file': send the image(s) as multipart/form-data "
                                       "field 'file'"}
    answer = httpx.post(f"{url}/predict", content=cut + f"--{BOUNDARY}--\r\n".encode(), headers=CONTENT_TYPE)
    assert answer.status_code == 200


def test_a_body_that_is_not_multipart_is_said_to_be_so(audited):
    url = audited.url
    for body in (b"hello world", b'{"image": "..."}', b"--other\r\n\r\n"):
        for path, field in (("/predict", "file"), ("/predict/batch", "files")):
            answer = httpx.post(f"{url}{path}", content=body, headers=CONTENT_TYPE)
            assert (answer.status_code, answer.json()) == (400, {"detail": (
                f"body not multipart/form-data, though its Content-Type says so: it does not begin with the "
                f"boundary the Content-Type declares (--BOUNDARY); send the image(s) as multipart/form-data field "
                f"'{field}' (curl -F {field}=@chest.jpeg)")}), (body, path)


def test_the_parsers_offsets_are_not_shown():
    """"at index N" was left in the reason (only "at N" and "(N)" were taken out)."""
    from starlette.formparsers import MultiPartException

    from pneumonia_cnn.serving.forms import multipart_refusal
    for said in ("Found 0-length header at 12", "Found 0-length header (12)", "Found 0-length header at index 12"):
        error = MultiPartException("Invalid multipart data.")
        error.__cause__ = ValueError(said)
        assert multipart_refusal(error, "/predict", 256).detail == ("multipart/form-data body not readable: "
                                                                    "Found 0-length header")


def test_a_multipart_body_with_bare_line_feeds_is_told_so_not_called_other(audited):
    """A review: bodies whose first boundary IS the declared one, with LF line ends or text after the boundary,
    had been told "it does not begin with the boundary the Content-Type declares"."""
    lf_only = f"--{BOUNDARY}\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpeg\"\n\nx\n--{BOUNDARY}--\n"
    for body in (lf_only.encode(), f"--{BOUNDARY}  trailing\r\n".encode()):
        answer = httpx.post(f"{audited.url}/predict", content=body, headers=CONTENT_TYPE)
        assert (answer.status_code, answer.json()) == (400, {"detail": (
            "multipart/form-data body not readable: a boundary line does not end in CR LF (multipart/form-data "
            "lines end in CR LF, with nothing after the boundary)")}), body
