"""Hostile and careless clients against a real server on loopback, deployed with keys and tight limits."""
import io
import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.serving.conftest import Server, bearer, rss_mb, xray_paths
from tests.serving.dicoms import dicom_file
from tests.serving.raw_http import (
    endless_chunked_upload,
    multipart_head,
    read_response,
    request_head,
    seconds_until_closed,
    status_of,
)


def post_image(server, key, name="x.jpeg", data=None, **kwargs):
    data = xray_paths(1)[0].read_bytes() if data is None else data
    headers = bearer(key) if key else {}
    return httpx.post(f"{server.url}/predict", files={"file": (name, data)}, headers=headers, timeout=30, **kwargs)


def test_no_key_wrong_key_and_roles(secure_server, keys):
    for key in (None, "ward3.wrong-secret", "nobody.secret", keys["ward"] + "x", keys["ward"].split(".")[1]):
        response = post_image(secure_server, key)
        assert response.status_code == 401, (key, response.text)
        assert response.headers["www-authenticate"] == "Bearer" and "\n" not in response.json()["detail"]
    assert httpx.get(f"{secure_server.url}/model").status_code == 401
    assert httpx.get(f"{secure_server.url}/metrics").status_code == 401
    assert httpx.get(f"{secure_server.url}/health").status_code == 200  # liveness probes need no key
    assert post_image(secure_server, keys["ward"]).status_code == 200
    assert httpx.post(f"{secure_server.url}/admin/reload", headers=bearer(keys["ward"])).status_code == 403
    assert httpx.get(f"{secure_server.url}/model", headers=bearer(keys["admin"])).status_code == 200


def test_keys_are_checked_in_constant_time(monkeypatch, keys):
    """Both a wrong secret and an unknown id end in one ``hmac.compare_digest`` over a full scrypt hash."""
    from pneumonia_cnn.serving import auth
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append((len(a), len(b))) or real(a, b))
    ring = auth.KeyRing.from_file(keys["path"])
    assert ring.check("ward3.not-the-secret") is None
    assert ring.check("unknown-id.whatever") is None
    assert ring.check(keys["ward"]).key_id == "ward3"
    assert calls == [(32, 32)] * 3
    assert "ward3" in keys["path"].read_text() and keys["ward"].split(".")[1] not in keys["path"].read_text()
    assert oct(keys["path"].stat().st_mode & 0o777) == "0o600"


def test_a_reload_keeps_the_keys_it_accepted_unless_their_line_changed(keys, tmp_path):
    from pneumonia_cnn.serving import auth
    ring = auth.KeyRing.from_file(keys["path"])
    assert ring.check(keys["ward"]).key_id == "ward3" and ring.remembered(keys["ward"]) is not None
    assert auth.KeyRing.from_file(keys["path"]).remembered(keys["ward"]) is None  # a fresh ring: scrypt again
    assert auth.KeyRing.from_file(keys["path"]).keep_passed(ring).remembered(keys["ward"]).key_id == "ward3"
    revoked = tmp_path / "keys.txt"
    revoked.write_text(keys["path"].read_text())
    auth.revoke_key(revoked, "ward3")
    auth.add_key(revoked, "ward3")  # the same id, a new secret: the old key must not pass
    assert auth.KeyRing.from_file(revoked).keep_passed(ring).remembered(keys["ward"]) is None


def test_new_keys_waiting_for_scrypt_are_bounded():
    """A flood of wrong keys must not build a queue on the one key-checking thread: beyond
    MAX_PENDING_KEY_CHECKS waiting, a new key gets 503 at once. A client's first burst with one key (16
    requests at once, as a ward's clients start) shares one check and is never refused for it."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from starlette.responses import PlainTextResponse

    from pneumonia_cnn.serving import auth
    release, checked = threading.Event(), []

    class SlowRing:
        def __init__(self, name="old file"):
            self.name = name

        def remembered(self, token):
            return None

        def check(self, token):
            checked.append(token if self.name == "old file" else (self.name, token))
            release.wait(10)
            return None

    async def inner(scope, receive, send):
        await PlainTextResponse("ok")(scope, receive, send)

    current = [SlowRing()]
    middleware = auth.AccessMiddleware(inner, lambda: current[0], ThreadPoolExecutor(1))

    async def flood():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            burst = [bearer("x.same")] * 16 + [bearer(f"x.{i}") for i in range(auth.MAX_PENDING_KEY_CHECKS - 1)]
            waiting = [asyncio.create_task(client.get("/model", headers=headers)) for headers in burst]
            await asyncio.sleep(0.3)
            extra = await client.get("/model", headers=bearer("x.extra"))
            release.set()
            waited = await asyncio.gather(*waiting)
            after = await client.get("/model", headers=bearer("x.after"))  # the checks ended: room again
            return extra, waited, after

    extra, waited, after = asyncio.run(flood())
    assert after.status_code == 401 and "x.after" in checked
    assert (extra.status_code, extra.headers["retry-after"]) == (503, "1")
    assert extra.json() == {"detail": "busy: too many new API keys being checked; retry in a second"}
    assert [r.status_code for r in waited] == [401] * (16 + auth.MAX_PENDING_KEY_CHECKS - 1)
    assert sorted(checked) == sorted(["x.same", "x.after"] + [f"x.{i}" for i in range(auth.MAX_PENDING_KEY_CHECKS - 1)])

    # a reload while a key is being checked: a request after it is checked against the new file, not given
    # the answer of the check begun against the old one (a key revoked meanwhile must not pass)
    release.clear()

    async def reload_midway():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=middleware), base_url="http://t") as client:
            before = asyncio.create_task(client.get("/model", headers=bearer("x.key")))
            await asyncio.sleep(0.2)
            current[0] = SlowRing("new file")
            later = asyncio.create_task(client.get("/model", headers=bearer("x.key")))
            await asyncio.sleep(0.2)
            release.set()
            return await asyncio.gather(before, later)

    assert [r.status_code for r in asyncio.run(reload_midway())] == [401, 401]
    assert checked[-2:] == ["x.key", ("new file", "x.key")]

def test_keys_never_reach_the_log_or_the_audit_trail(secure_server, keys):
    post_image(secure_server, keys["ward"])
    post_image(secure_server, "ward3.a-wrong-secret-to-log")
    time.sleep(0.2)
    log = secure_server.log()
    assert "refused a request" in log  # the refusal is logged ...
    for secret in (keys["ward"].split(".")[1], keys["admin"].split(".")[1], "a-wrong-secret-to-log"):
        assert secret not in log  # ... without the key
        assert secret.encode() not in secure_server.audit_path.read_bytes()


def test_wrong_host_is_refused_unless_allowed(secure_server, keys):
    port = secure_server.url.rsplit(":", 1)[1]
    for host, status in (("evil.example", 400), (f"evil.example:{port}", 400), (f"localhost:{port}", 200),
                         ("xray.hospital.example", 200), (f"[::1]:{port}", 200), ("[::1]", 200),
                         (f"XRAY.Hospital.example:{port}", 200)):
        response = httpx.get(f"{secure_server.url}/health", headers={"Host": host})
        assert response.status_code == status, host
        if status == 400:  # the same one-line JSON as every other refusal, naming the host
            assert response.json() == {"detail": "Host 'evil.example' is not served here (loopback, the bound "
                                                 "address and --allowed-hosts are)"}


def test_200mb_chunked_upload_is_cut_early_with_memory_and_disk_bounded(secure_server, keys):
    before, peak = rss_mb(secure_server.pid), [0.0]
    temporary_files = []

    def watch(sent):
        peak[0] = max(peak[0], rss_mb(secure_server.pid))
        temporary_files.extend(open_files_under(secure_server.pid, secure_server.tmp))
    start = time.monotonic()
    response, sent = endless_chunked_upload(int(secure_server.url.rsplit(":", 1)[1]), 200 * 1024 * 1024,
                                            headers=bearer(keys["ward"]), on_chunk=watch)
    assert status_of(response) == 413, response[:300]
    assert b"upload too large; the limit is 2 MB per image (--max-upload-mb)" in response
    assert sent < 16 * 1024 * 1024, f"the server read {sent:,} bytes before answering"  # 2 MB + socket buffers
    assert time.monotonic() - start < 10
    assert peak[0] - before < 40, f"server memory rose by {peak[0] - before:.0f} MB"
    assert not temporary_files and bytes_under(secure_server.tmp) < 4096  # libraries' small session files only
    assert httpx.get(f"{secure_server.url}/health").status_code == 200


def bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def open_files_under(pid, folder: Path) -> list[str]:
    """Files the process holds open in ``folder``, deleted ones included (how temporary files hide)."""
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(folder)) or (target.startswith("/tmp/") and "(deleted)" in target):
            found.append(target)
    return found


def test_upload_under_the_limit_is_never_spooled_to_disk(secure_server, keys):
    port = int(secure_server.url.rsplit(":", 1)[1])
    body = multipart_head("almost.jpeg") + b"\xff" * (1900 * 1024) + b"\r\n--pneumoniacnnboundary--\r\n"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head(port, chunked=False, length=len(body), headers=bearer(keys["ward"])))
        sock.sendall(body[:1600 * 1024])  # past Starlette's 1 MB spooling threshold
        time.sleep(0.5)
        assert not open_files_under(secure_server.pid, secure_server.tmp)
        sock.sendall(body[1600 * 1024:])
        response = read_response(sock)
    assert status_of(response) == 400 and b"almost.jpeg" in response
    assert bytes_under(secure_server.tmp) < 4096


def test_declared_length_over_the_limit_is_refused_before_reading(secure_server, keys):
    port = int(secure_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head(port, chunked=False, length=50 * 1024 * 1024, headers=bearer(keys["ward"])))
        response = read_response(sock, timeout=5)
    assert status_of(response) == 413
    assert b"52,428,800 bytes declared; the limit is 2 MB per image (--max-upload-mb)" in response


def test_refusals_before_the_body_reach_clients_that_send_it_whole(secure_server, keys):
    """httpx's async client (like aiohttp) sends the whole body before it reads the answer: a refusal made
    before the body is read (no key: 401; a declared length over the limit: 413) must reach it, not a reset."""
    import asyncio

    async def post_five(headers, size):
        async with httpx.AsyncClient(timeout=20) as client:
            answers = []
            for _ in range(5):
                try:
                    answer = await client.post(f"{secure_server.url}/predict", headers=headers,
                                               files={"file": ("a.dcm", b"\0" * size)})
                    answers.append((answer.status_code, answer.json()["detail"][:20]))
                except httpx.HTTPError as error:
                    answers.append(repr(error))
            return answers

    assert asyncio.run(post_five({}, 1_500_000)) == [(401, "missing API key: sen")] * 5
    assert asyncio.run(post_five(bearer(keys["ward"]), 3_000_000)) == [(413, "upload too large: 3,")] * 5


def test_stalled_body_times_out_and_the_connection_closes(secure_server, keys):
    port = int(secure_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head(port, chunked=False, length=100_000, headers=bearer(keys["ward"])))
        sock.sendall(multipart_head() + b"x" * 1000)  # then nothing: shorter than its Content-Length
        start = time.monotonic()
        response = read_response(sock, timeout=10)
        assert status_of(response) == 408, response[:200]
        assert 1.5 < time.monotonic() - start < 5  # --body-timeout 2
        assert seconds_until_closed(sock, 5) is not None


def test_a_stalled_client_answered_408_is_not_held_open_after_it(secure_server, keys):
    """The lingering close drops what a refused client still sends; one that sends nothing (its body stalled:
    408) is closed after a second of silence, not held for the whole linger time."""
    port = int(secure_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head(port, chunked=False, length=100_000, headers=bearer(keys["ward"])))
        sock.sendall(multipart_head())
        assert status_of(read_response(sock, timeout=10)) == 408
        time.sleep(2.5)  # --body-timeout 2 has passed; the server side should be gone a second after its answer
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(20):
                sock.sendall(b"x" * 65536)
                time.sleep(0.05)


def test_trickling_body_times_out(secure_server, keys):
    """One byte every half second never stalls long, but the body as a whole must arrive in time."""
    port = int(secure_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_head(port, chunked=False, length=10_000, headers=bearer(keys["ward"])))
        sock.sendall(multipart_head())
        start, response = time.monotonic(), b""
        sock.setblocking(False)
        answered_after = None
        while time.monotonic() - start < 8 and answered_after is None:
            try:  # read before writing again: once the server has answered and closed, a write fails and
                # (the first version of this test) the answer was never read
                response = sock.recv(65536)
                answered_after = time.monotonic() - start
                break
            except BlockingIOError:
                pass
            try:
                sock.send(b"x")
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
            time.sleep(0.5)
    assert answered_after is not None and answered_after < 5 and status_of(response) == 408


def test_idle_connections_are_closed(secure_server):
    port = int(secure_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as idle:
        assert seconds_until_closed(idle, 8) < 4  # --idle-timeout 2
    with socket.create_connection(("127.0.0.1", port)) as slow_head:
        slow_head.sendall(b"GET /health HTTP/1.1\r\nHo")
        assert seconds_until_closed(slow_head, 8) < 4


@pytest.mark.parametrize("request_bytes", [b"GARBLED\r\n\r\n",
                                           b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                                           b"POST /predict HTTP/1.1\r\nHost: a\r\nContent-Length: ten\r\n\r\n"])
def test_a_request_malformed_at_the_http_level_gets_the_apis_json_400(secure_server, request_bytes):
    """uvicorn answered these with a plain-text "Invalid HTTP request received."; a client reads one JSON
    ``detail`` from every refusal."""
    port = int(secure_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(request_bytes)
        response = read_response(sock, 5)
    head, _, body = response.partition(b"\r\n\r\n")
    assert status_of(response) == 400 and b"content-type: application/json" in head.lower(), response
    assert b"x-frame-options: deny" in head.lower() and b"cache-control: no-store" in head.lower(), head
    assert json.loads(body) == {"detail": "invalid HTTP request: a malformed request line, header or length"}
    assert httpx.get(f"{secure_server.url}/health", timeout=5).status_code == 200


def test_idle_sockets_leave_health_and_predictions_up(secure_server, keys):
    """uvicorn's limit_concurrency (4 x --max-in-flight + 64 = 80 here) counted idle sockets: 80 of them,
    opened by anyone without a key, made every request get 503, /health included."""
    port = int(secure_server.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(120)]
    try:
        time.sleep(0.2)
        assert httpx.get(f"{secure_server.url}/health", timeout=5).status_code == 200
        assert post_image(secure_server, keys["ward"]).status_code == 200
    finally:
        for sock in idle:
            sock.close()


def test_batch_uploads_in_progress_are_limited_apart(secure_server, keys):
    """Each batch upload may hold up to --max-batch-upload-mb: at most --max-batches-in-flight (2) at once."""
    port = int(secure_server.url.rsplit(":", 1)[1])
    image = xray_paths(1)[0].read_bytes()
    holders = []
    try:
        for _ in range(2):  # two batch uploads that are still arriving
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request_head(port, "/predict/batch", chunked=False, length=10_000,
                                      headers=bearer(keys["ward"])))
            holders.append(sock)
        response = first_answer(lambda: httpx.post(f"{secure_server.url}/predict/batch", timeout=30,
                                                   files=[("files", ("a.jpeg", image))], headers=bearer(keys["ward"])),
                                503)
        assert (response.status_code, response.headers["retry-after"]) == (503, "1")
        assert response.json() == {"detail": "busy: 2 batch request(s) in progress (waited 0 s); retry in a second"}
        # 2 of --max-in-flight 4: a single upload goes, from another key (the ward's key holds its half)
        assert post_image(secure_server, keys["admin"]).status_code == 200
    finally:
        for sock in holders:
            sock.close()
    response = first_answer(lambda: httpx.post(f"{secure_server.url}/predict/batch", timeout=30,
                                               files=[("files", ("a.jpeg", image))], headers=bearer(keys["ward"])), 200)
    assert response.status_code == 200, response.text

def test_full_queue_answers_503_with_retry_after(secure_server, keys):
    port = int(secure_server.url.rsplit(":", 1)[1])
    holders = []
    try:
        for _ in range(4):  # --max-in-flight 4: four uploads that are still arriving
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(request_head(port, chunked=False, length=10_000, headers=bearer(keys["ward"])))
            holders.append(sock)
        response = first_answer(lambda: post_image(secure_server, keys["ward"]), 503)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
    finally:
        for sock in holders:
            sock.close()
    assert first_answer(lambda: post_image(secure_server, keys["ward"]), 200).status_code == 200


def first_answer(send, wanted: int, within: float = 10.0):
    """``send()`` until it is answered ``wanted`` or ``within`` seconds pass (the last answer then): the held
    uploads are admitted, or released, when the server has read their heads or seen them close, which a fixed
    0.3 s wait assumed of a loaded machine."""
    deadline = time.monotonic() + within
    while True:
        response = send()
        if response.status_code == wanted or time.monotonic() > deadline:
            return response
        time.sleep(0.1)


@pytest.mark.parametrize("name, rows, columns, frames, pixel_bytes, reason", [
    ("bomb.dcm", 7000, 7000, 10, None, "10 frame(s) of 7000x7000"),  # the 953 KB bomb, deflated
    ("frames.dcm", 3000, 3000, 6, None, "6 frame(s) of 3000x3000"),
    ("liar.dcm", 64, 64, 1, 300_000_000, "more than its header declares"),  # small header, huge pixel data
])
def test_dicom_bombs_are_refused_before_decoding(secure_server, keys, name, rows, columns, frames, pixel_bytes, reason):
    data = dicom_file(rows, columns, frames, pixel_bytes, deflate=True)
    assert len(data) < 2 * 1024 * 1024
    before = rss_mb(secure_server.pid)
    start = time.monotonic()
    response = post_image(secure_server, keys["ward"], name, data)
    assert response.status_code == 400 and reason in response.json()["detail"], response.text
    assert time.monotonic() - start < 2
    assert rss_mb(secure_server.pid) - before < 30


def test_small_multiframe_and_deflated_dicoms_still_read(secure_server, keys):
    for data in (dicom_file(64, 64, 3, deflate=True, fill=90), dicom_file(128, 128, fill=120)):
        assert post_image(secure_server, keys["ward"], "fine.dcm", data).status_code == 200


def test_path_like_file_names_are_labels_only(secure_server, keys, tmp_path):
    target = tmp_path / "victim"
    hostile = f"../../../../..{target}/pwned.jpeg"
    response = post_image(secure_server, keys["ward"], hostile, b"not an image")
    detail = response.json()["detail"]
    assert response.status_code == 400 and detail.startswith("pwned.jpeg: ") and "\n" not in detail
    image = xray_paths(1)[0].read_bytes()
    body = multipart_head("C:\\scans\\evil\x1b[2Jname.jpeg") + image + b"\r\n--pneumoniacnnboundary--\r\n"
    response = httpx.post(f"{secure_server.url}/predict", content=body, headers={
        **bearer(keys["ward"]), "Content-Type": "multipart/form-data; boundary=pneumoniacnnboundary"})
    assert response.status_code == 200 and response.json()["filename"] == "evil?[2Jname.jpeg"  # no terminal escapes
    assert not target.exists()


def test_model_card_reveals_no_paths(secure_server, keys, trained_run, small_root):
    text = httpx.get(f"{secure_server.url}/model", headers=bearer(keys["ward"])).text
    for secret in (str(trained_run), str(small_root), str(Path.home()), "/tmp/"):
        assert secret not in text


def test_other_addresses_need_keys_and_an_audit_log(trained_run):
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "serve", str(trained_run / "best.pt"), "--host",
                           "0.0.0.0", "--port", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "--api-keys FILE and --audit-log FILE" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_tls(trained_run, keys, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
    running = Server(trained_run / "best.pt", "--api-keys", keys["path"], "--ssl-certfile", cert, "--ssl-keyfile",
                     key, "--idle-timeout", "2", workdir=tmp_path, scheme="https")
    try:
        path = xray_paths(1)[0]
        response = httpx.post(f"{running.url}/predict", files={"file": (path.name, path.read_bytes())},
                              headers=bearer(keys["ward"]), verify=ssl.create_default_context(cafile=str(cert)))
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{running.port}/health", timeout=5)
        # a client that connects and never starts (or finishes) its TLS handshake is closed at --idle-timeout
        # (2 s here), not after asyncio's 60 s
        with socket.create_connection(("127.0.0.1", running.port)) as silent, \
                socket.create_connection(("127.0.0.1", running.port)) as half:
            half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
            assert 1.5 < seconds_until_closed(silent, 10) < 5 and seconds_until_closed(half, 10) < 5
    finally:
        running.stop()


def test_large_images_give_their_memory_back(secure_server, keys):
    """A 49-megapixel JPEG just under the pixel guard: decoded, answered, and its memory returned."""
    buffer = io.BytesIO()
    Image.new("L", (7000, 7000), 128).save(buffer, "JPEG", quality=90)
    post_image(secure_server, keys["ward"], "warm.jpeg", buffer.getvalue())
    before = rss_mb(secure_server.pid)
    for index in range(4):
        response = post_image(secure_server, keys["ward"], f"big{index}.jpeg", buffer.getvalue())
        assert response.status_code == 200, response.text
    growth = rss_mb(secure_server.pid) - before
    assert growth < 40, f"server kept {growth:.0f} MB after four 49-megapixel images"


def test_allowed_host_patterns_as_starlette_reads_them():
    from pneumonia_cnn.serving.app import allowed_host_names
    from pneumonia_cnn.serving.auth import HostCheckMiddleware
    check = HostCheckMiddleware(None, ["localhost", "*.hospital.example"])
    assert [check.allows(h) for h in ("localhost", "xray.hospital.example", "hospital.example", "evil.example",
                                      "xray.hospital.example.evil")] == [True, True, False, False, False]
    assert HostCheckMiddleware(None, ["*"]).allows("anything.example")
    assert check.allows("")  # HTTP/1.0 without Host: a load balancer's probe, not a browser
    from pneumonia_cnn.serving.auth import host_name
    assert [host_name([(b"host", value)]) for value in (b"X.Hospital.Example.:8443", b"[::1]:80", b"a.b")] == [
        "x.hospital.example", "[::1]", "a.b"]
    assert "[fd00::5]" in allowed_host_names("fd00::5")  # an IPv6 address, as a Host header carries it


@pytest.mark.parametrize("key_id", ["ward\n", "ward 3", "", "w" * 41])
def test_a_key_id_that_is_not_letters_digits_dash_or_underscore_is_refused_and_the_file_kept(tmp_path, key_id):
    from pneumonia_cnn.errors import PneumoniaCNNError
    from pneumonia_cnn.serving.auth import add_key, read_key_file
    keys = tmp_path / "keys.txt"
    add_key(keys, "ward3")
    before = keys.read_bytes()
    with pytest.raises(PneumoniaCNNError, match=r"--id .*: use 1-40 letters, digits, '-' or '_'"):
        add_key(keys, key_id)  # "ward\n" passed a "$" and wrote a line that made the whole file unreadable
    assert keys.read_bytes() == before and list(read_key_file(keys)) == ["ward3"]


def _raw_get(server, path: str, fields: list[tuple[str, str]]) -> tuple[int, dict]:
    host = f"127.0.0.1:{server.port}"
    head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = read_response(sock)
    status = int(answer.split(b" ", 2)[1])
    return status, json.loads(answer.split(b"\r\n\r\n", 1)[1]) if status != 200 else {}


def test_two_authorization_headers_and_an_oversized_request_head_are_refused_in_one_line(secure_server, keys):
    """Two Authorization headers: the first had been taken and the others ignored (200). A 40 KB header field or
    150 fields had been answered 200 (h11 takes a head that arrives in one read); nginx refuses both."""
    both = [("Authorization", f"Bearer {keys['ward']}"), ("Authorization", "Bearer bad.x")]
    response = httpx.post(f"{secure_server.url}/predict", files={"file": ("x.jpeg", xray_paths(1)[0].read_bytes())},
                          headers=httpx.Headers(both), timeout=30)
    assert (response.status_code, response.json()) == (400, {"detail": "2 Authorization headers: send one"})
    host = len(f"127.0.0.1:{secure_server.port}")
    status, body = _raw_get(secure_server, "/health", [("X-Big", "a" * 40000)])
    assert (status, body) == (431, {"detail": f"request head too large: {7 + 4 + host + 5 + 40000} bytes in 2 header "
                                              "fields and the target (at most 32768 bytes and 100 fields)"})
    status, body = _raw_get(secure_server, "/health", [(f"X-{i}", "1") for i in range(150)])
    assert status == 431 and body["detail"].endswith("bytes in 151 header fields and the target (at most 32768 "
                                                     "bytes and 100 fields)")
    assert _raw_get(secure_server, "/health", [(f"X-{i}", "b" * 300) for i in range(99)])[0] == 200  # 30 KB, 100


def test_a_key_sent_under_another_scheme_is_told_apart_from_no_key(secure_server, keys):
    """'Authorization: Basic ...' had been answered "missing API key", though a header was sent."""
    for header, said in ((None, "missing API key: send 'Authorization: Bearer KEY'"),
                         (f"Basic {keys['ward']}", "Authorization is not a Bearer key (another scheme, or empty): "
                                                   "send 'Authorization: Bearer KEY'"),
                         ("Bearer", "Authorization is not a Bearer key (another scheme, or empty): send "
                                    "'Authorization: Bearer KEY'")):
        response = httpx.get(f"{secure_server.url}/model", headers={"Authorization": header} if header else {})
        assert (response.status_code, response.json()["detail"]) == (401, said), header
