"""What a hostile review of the server under load found (2026-11-27, late): a node bound to every address refused
its own IP as Host, an abandoned batch was still scored and audited, a few slow uploads shut out every other,
/docs needed the internet, no answer carried security headers, and form fields and compressed bodies were
ignored in silence."""
import re
import socket
import sqlite3
import time

import httpx
import pytest

from tests.serving.conftest import Server, bearer, xray_paths
from tests.serving.raw_http import BOUNDARY, multipart_head, read_response, request_head, status_of


def test_a_wildcard_bind_answers_any_ip_address_as_host_but_no_other_name():
    """A load balancer's or Kubernetes' probe sends the node's address as Host; a DNS-rebinding page is reached by
    a name, so names stay refused. A loopback bind still answers only its own names."""
    from pneumonia_cnn.serving.app import allowed_host_names
    from pneumonia_cnn.serving.auth import HostCheckMiddleware, host_name
    everywhere = HostCheckMiddleware(None, allowed_host_names("0.0.0.0", ["xray.hospital.example"]))
    hosts = [host_name([(b"host", value)]) for value in (b"192.0.2.2:8000", b"10.1.2.3", b"[fd00::5]:8443",
                                                         b"xray.hospital.example", b"evil.example", b"10.1.2.3.evil",
                                                         b"[not-an-address]")]
    assert [everywhere.allows(host) for host in hosts] == [True, True, True, True, False, False, False]
    assert [HostCheckMiddleware(None, allowed_host_names("::")).allows(host) for host in hosts] == [
        True, True, True, False, False, False, False]
    loopback = HostCheckMiddleware(None, allowed_host_names("127.0.0.1"))
    assert [loopback.allows(host) for host in hosts[:2]] == [False, False] and loopback.allows("127.0.0.1")


def test_every_answer_carries_the_security_headers_and_docs_need_no_internet(secure_server, keys):
    """The page, an API answer and a refusal all forbid framing, sniffing, caching and foreign scripts; /docs
    (Swagger from a CDN: blank offline, a third party's script beside the API key) is gone, the schema stays."""
    answers = [httpx.get(f"{secure_server.url}/"), httpx.get(f"{secure_server.url}/health"),
               httpx.post(f"{secure_server.url}/predict", files={"file": ("a.jpeg", b"x")}),  # 401: no key
               httpx.get(f"{secure_server.url}/health", headers={"Host": "evil.example"})]  # the Host check's 400
    assert [answer.status_code for answer in answers] == [200, 200, 401, 400]
    for answer in answers:
        assert answer.headers["x-frame-options"] == "DENY" and answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert "script-src 'self'" in answer.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    assert not re.search(r"<script>|<style>|\son\w+=", answers[0].text)  # nothing inline that the policy forbids
    assert httpx.get(f"{secure_server.url}/docs", headers=bearer(keys["ward"])).status_code == 404
    assert "/predict" in httpx.get(f"{secure_server.url}/openapi.json").json()["paths"]
    for asset, kind in (("page.js", "text/javascript"), ("page.css", "text/css")):  # public, as the page is
        answer = httpx.get(f"{secure_server.url}/{asset}")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind) and answer.text
        assert httpx.head(f"{secure_server.url}/{asset}").status_code == 200  # load balancers probe with HEAD


def test_an_internal_error_carries_the_security_headers_too(trained_run, monkeypatch):
    """Starlette answers an unexpected exception outside every middleware: its 500 had no security headers."""
    from fastapi.testclient import TestClient

    from pneumonia_cnn.serving.app import create_app
    from pneumonia_cnn.serving.service import ServeOptions, Service

    async def broken(*_arguments, **_keywords):
        raise RuntimeError("boom")
    monkeypatch.setattr(Service, "predict_one", broken)
    app = create_app(trained_run / "best.pt", ServeOptions(device="cpu"), allowed_hosts=["testserver"])
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/predict", files={"file": ("a.jpeg", xray_paths(1)[0].read_bytes())})
    assert answer.status_code == 500 and answer.json()["detail"].startswith("internal error (RuntimeError)")
    assert answer.headers["cache-control"] == "no-store" and "script-src 'self'" in answer.headers[
        "content-security-policy"]


def test_fields_the_endpoint_does_not_read_and_compressed_bodies_are_refused(secure_server, keys):
    image = xray_paths(1)[0].read_bytes()
    url, key = secure_server.url, bearer(keys["ward"])
    options_in_the_form = httpx.post(f"{url}/predict", data={"gradcam": "true"}, files={"file": ("a.jpeg", image)},
                                     headers=key)
    assert options_in_the_form.status_code == 400 and options_in_the_form.json()["detail"] == (
        "unexpected form field(s) 'gradcam': send the image(s) as 'file'; options such as gradcam go in the query "
        "(?gradcam=true)")
    mixed = httpx.post(f"{url}/predict/batch", files=[("files", ("a.jpeg", image)), ("file", ("b.jpeg", image))],
                       headers=key)
    assert mixed.status_code == 400 and "unexpected form field(s) 'file'" in mixed.json()["detail"]
    codings = [[("Content-Encoding", "gzip")], [("Content-Encoding", "Identity")],
               [("Content-Encoding", "identity, identity")],
               [("Content-Encoding", "identity"), ("Content-Encoding", "gzip")]]  # a second header, as a proxy adds
    encoded = [httpx.post(f"{url}/predict", files={"file": ("a.jpeg", image)},
                          headers=list(key.items()) + headers) for headers in codings]
    assert [answer.status_code for answer in encoded] == [415, 200, 200, 415], [a.text for a in encoded]
    assert "Content-Encoding 'gzip'" in encoded[0].json()["detail"] and "'gzip'" in encoded[3].json()["detail"]


def test_a_body_slower_than_the_minimum_rate_is_cut_after_the_grace(trained_run, tmp_path):
    """Under a 30 s body time-out, a body trickling a byte every half second held its admission slot for 30 s
    (64 of them shut every other upload out); now it is cut once the first 5 s are past, while a body that
    keeps the rate goes on."""
    running = Server(trained_run / "best.pt", "--body-timeout", "30", workdir=tmp_path)
    try:
        port = running.port
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request_head(port, chunked=False, length=100_000) + multipart_head())
            start, answer = time.monotonic(), b""
            sock.setblocking(False)
            while time.monotonic() - start < 15 and not answer:
                try:
                    answer = sock.recv(65536)
                except BlockingIOError:
                    try:
                        sock.send(b"x")
                    except OSError:
                        pass
                    time.sleep(0.5)
            seconds = time.monotonic() - start
        assert status_of(answer) == 408 and 4.5 < seconds < 8, (seconds, answer[:300])
        assert b"arriving too slowly" in answer and b"1,024 bytes/s" in answer
        assert status_of(_trickled_upload(port, xray_paths(1)[0].read_bytes(), 1500, 0.5)) == 200  # 3 KB/s
    finally:
        running.stop()


def _trickled_upload(port: int, image: bytes, chunk: int, pause: float) -> bytes:
    """A whole /predict upload sent ``chunk`` bytes every ``pause`` seconds; the server's answer."""
    body = multipart_head("slow.jpeg") + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head(port, chunked=False, length=len(body)))
        for start in range(0, len(body), chunk):
            sock.sendall(body[start:start + chunk])
            time.sleep(pause)
        return read_response(sock, 60)


def _batch_request(port: int, images: list[bytes]) -> bytes:
    body = b"".join(multipart_head(f"{index}.jpeg", "files") + image + b"\r\n" for index, image in enumerate(images))
    body += f"--{BOUNDARY}--\r\n".encode()
    return request_head(port, "/predict/batch", chunked=False, length=len(body)) + body


@pytest.mark.parametrize("abandoned", [True, False])
def test_a_batch_whose_client_left_is_neither_scored_nor_audited(trained_run, tmp_path, abandoned):
    """A 200-file batch whose client left at once was scored, written to the audit log (200 rows) and counted as
    200; as /predict does, it is now dropped: a 499, no rows. The same batch read to the end is answered."""
    running = Server(trained_run / "best.pt", "--audit-log", tmp_path / "audit.sqlite", workdir=tmp_path)
    images = [path.read_bytes() for path in xray_paths(5)] * 20
    try:
        with socket.create_connection(("127.0.0.1", running.port)) as sock:
            sock.sendall(_batch_request(running.port, images))
            if abandoned:
                time.sleep(0.05)  # and closed without reading the answer
            else:
                assert status_of(read_response(sock, 120)) == 200
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            text = httpx.get(f"{running.url}/metrics").text
            if re.search(r'http_requests_total\{endpoint="/predict/batch",status="(200|499)"\}', text):
                break
            time.sleep(0.5)
    finally:
        running.stop()
    rows = sqlite3.connect(tmp_path / "audit.sqlite").execute("SELECT COUNT(*) FROM predictions").fetchone()[0]
    status = "499" if abandoned else "200"
    assert f'http_requests_total{{endpoint="/predict/batch",status="{status}"}} 1.0' in text
    assert rows == (0 if abandoned else 200)


def test_a_served_last_pt_says_why_drift_has_no_reference(trained_run):
    """serve of a run's last.pt (its training state) reported drift as unavailable for "an earlier version, or
    adapted to a site"; it now names the reason drift gives for the same file."""
    from pneumonia_cnn.monitoring import DriftMonitor
    from pneumonia_cnn.serving.batcher import load_served_model
    served = load_served_model(trained_run / "last.pt", device="cpu")
    assert served.reference is None and "training-state file" in served.no_reference
    monitor = DriftMonitor(served.reference, 10, no_reference=served.no_reference)
    assert monitor.report()["reason"] == served.no_reference
