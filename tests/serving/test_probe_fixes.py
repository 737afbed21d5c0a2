"""What a probe of ``serve`` found (2026-11-28): --keep-images without --audit-log started and kept nothing, a batch
whose client had left was decoded to its last file, query parameters the server does not take (?threshold=,
?prevalence=, /predict/batch?gradcam=true) were ignored in silence, and refusals named Starlette's limit of 1,000
files, no reason for a body the parser could not read, and a file sent as filename*= only as "text"."""
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.serving.conftest import Server, free_port, xray_paths
from tests.serving.raw_http import BOUNDARY, multipart_head, request_head


def test_keep_images_without_an_audit_log_is_refused_at_start(tmp_path):
    """The folder was never made nor checked (/proc/x started too), and no image was kept, without a word."""
    from pneumonia_cnn.errors import PneumoniaCNNError
    from pneumonia_cnn.serving.service import ServeOptions
    for keep in (tmp_path / "kept", "/proc/x"):
        with pytest.raises(PneumoniaCNNError) as refused:
            ServeOptions(keep_images=str(keep))
        assert str(refused.value) == (f"--keep-images {keep} needs --audit-log FILE (the kept images are found "
                                      f"through its rows): give both, or neither")
    ServeOptions(keep_images=str(tmp_path / "kept"), audit_log=str(tmp_path / "audit.sqlite"))  # both: as before
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "serve", "builtin", "--port", str(free_port()),
                           "--keep-images", str(tmp_path / "kept")], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "--audit-log FILE" in done.stderr
    assert not (tmp_path / "kept").exists()


def _batch_request(port: int, images: list[bytes]) -> bytes:
    body = b"".join(multipart_head(f"{index}.jpeg", "files") + image + b"\r\n" for index, image in enumerate(images))
    body += f"--{BOUNDARY}--\r\n".encode()
    return request_head(port, "/predict/batch", chunked=False, length=len(body)) + body


def _batch_499s(url: str) -> float:
    import re
    found = re.search(r'http_requests_total\{endpoint="/predict/batch",status="499"\} (\S+)', httpx.get(
        f"{url}/metrics").text)
    return float(found.group(1)) if found else 0.0


def test_a_batch_whose_client_left_stops_decoding(trained_run, tmp_path, monkeypatch):
    """40 files, each decode 0.25 s, the client gone as the first begins: all 40 were still decoded (its 499 and
    empty audit log came after); now only those already on a decode thread finish."""
    import sqlite3

    import uvicorn

    from pneumonia_cnn.serving import service
    from pneumonia_cnn.serving.app import create_app
    decoded, started, real = [], threading.Event(), service.read_upload

    def slow_read(predictor, data, name):
        started.set()
        time.sleep(0.25)
        decoded.append(name)
        return real(predictor, data, name)
    monkeypatch.setattr(service, "read_upload", slow_read)
    app = create_app(trained_run / "best.pt", service.ServeOptions(device="cpu", audit_log=str(tmp_path / "a.sqlite")))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(_batch_request(port, [path.read_bytes() for path in xray_paths(5)] * 4))
            assert started.wait(30)
        deadline = time.monotonic() + 30
        while _batch_499s(f"http://127.0.0.1:{port}") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)  # what was still queued would decode now (twelve files' time on two threads)
        answered_499 = _batch_499s(f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(60)
    assert answered_499 == 1 and len(decoded) <= 2 * service.DECODE_THREADS, f"{len(decoded)} of 40 decoded"
    assert sqlite3.connect(tmp_path / "a.sqlite").execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 0


def test_query_parameters_the_server_does_not_take_are_refused(server):
    """Each named with why, in one line; ?gradcam=true on /predict still gives its heat map."""
    url, _ = server
    image = xray_paths(1)[0].read_bytes()
    one, batch = {"file": ("a.jpeg", image)}, [("files", ("a.jpeg", image))]
    refused = {
        "/predict?threshold=0.01&prevalence=0.5":
            "threshold: not a request parameter; the decision threshold is the checkpoint's, fitted on validation "
            "(evaluate --threshold POLICY --save-as FILE writes a checkpoint with another one, to serve); "
            "prevalence: not a request parameter; the server's rate is set when it starts "
            "(serve --prevalence RATE|estimate)",
        "/predict/batch?gradcam=true": "gradcam: not taken by /predict/batch; heat maps are made one image at a "
                                       "time (/predict?gradcam=true)",
        "/predict?gradcam=true&gradcam=false": "gradcam: given 2 times; give it once",
        "/predict?gradcm=true": "gradcm: not a parameter of /predict (it takes ?gradcam=)",
        "/predict/batch?adapt-batch=1": "adapt-batch: not a request parameter; batch adaptation is set when the "
                                        "server starts (serve --adapt-batch)",
    }
    for path, detail in refused.items():
        answer = httpx.post(f"{url}{path}", files=batch if "batch" in path else one)
        assert (answer.status_code, answer.json()) == (400, {"detail": detail}), path
    answer = httpx.post(f"{url}/predict?gradcam=true", files=one, timeout=60)
    assert answer.status_code == 200 and answer.json()["gradcam_png_base64"]
    assert httpx.post(f"{url}/predict/batch", files=batch * 2).status_code == 200


def test_refusals_of_a_body_name_the_servers_limit_and_the_reason(server):
    url, _ = server
    many = ("more than 256 files: /predict/batch takes at most 256 files per request (serve --max-batch-files); "
            "send the rest in another request")
    for count in (1001, 257):
        answer = httpx.post(f"{url}/predict/batch", files=[("files", (f"{i}.jpeg", b"x")) for i in range(count)])
        assert (answer.status_code, answer.json()) == (413, {"detail": many}), count
    answer = httpx.post(f"{url}/predict/batch", files=[("files", (f"{i}.jpeg", b"x")) for i in range(256)])
    assert answer.status_code == 200 and len(answer.json()["results"]) == 256  # the limit itself is taken
    answer = httpx.post(f"{url}/predict", files={"file": ("x" * 5000 + ".jpeg", b"x")})
    assert (answer.status_code, answer.json()) == (400, {"detail": "multipart/form-data body not readable: a part's "
                                                         "header is longer than the parser's limit (about 4 KB): "
                                                         "shorten the file name"})
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename*=UTF-8''%E8%82%BA.jpeg\r\n\r\n"
            f"xx\r\n--{BOUNDARY}--\r\n").encode()
    answer = httpx.post(f"{url}/predict", content=body,
                        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert (answer.status_code, answer.json()) == (400, {"detail": (
        "field 'file': its file name is given only as filename*= (RFC 5987), which multipart/form-data does not "
        "use (RFC 7578, section 4.2): send filename=\"chest.jpeg\"")})
    answer = httpx.post(f"{url}/predict", content=b"--x", headers={"Content-Type": "multipart/form-data"})
    assert answer.json() == {"detail": "multipart/form-data body not readable: the Content-Type header has no "
                                       "boundary=...; let the HTTP client set it"}
    answer = httpx.post(f"{url}/predict", data={f"x{i}": "1" for i in range(20)}, files={"file": ("a.jpeg", b"x")})
    assert answer.json() == {"detail": "more than 16 text fields: send the image(s) as file field(s) ('file' for "
                                       "/predict, 'files' for /predict/batch)"}
    body = f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"\r\nX\r\n\r\nxx\r\n--{BOUNDARY}--\r\n"
    answer = httpx.post(f"{url}/predict", content=body.encode(),
                        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    assert answer.json() == {"detail": "multipart/form-data body not readable: Found invalid character 13 in header"}


def test_a_batch_over_the_limit_given_directly_says_what_to_do():
    from pneumonia_cnn.serving.service import too_many_files
    assert too_many_files(256, 300) == ("300 files: /predict/batch takes at most 256 files per request (serve "
                                        "--max-batch-files); send the rest in another request")


def test_the_batch_file_limit_is_a_flag(tmp_path):
    running = Server("builtin", "--max-batch-files", "3", workdir=tmp_path)
    try:
        over = httpx.post(f"{running.url}/predict/batch", files=[("files", (f"{i}.jpeg", b"x")) for i in range(4)])
        at = httpx.post(f"{running.url}/predict/batch", files=[("files", (f"{i}.jpeg", b"x")) for i in range(3)])
    finally:
        running.stop()
    assert (over.status_code, over.json()) == (413, {"detail": "more than 3 files: /predict/batch takes at most 3 "
                                                               "files per request (serve --max-batch-files); send "
                                                               "the rest in another request"})
    assert at.status_code == 200 and len(at.json()["results"]) == 3
