"""Admission: a request beyond --max-in-flight / --max-batches-in-flight waits up to --admission-wait for a place
before 503. Refused at once, three clients sending batches of two small images in a loop had 35 of 60 refused
while the server was only scoring (a review's load test); the places still bound the memory uploads take."""
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import require_shared
from tests.serving.conftest import Server, xray_paths
from tests.serving.raw_http import request_head


def batch_files(count: int):
    return [("files", (path.name, path.read_bytes())) for path in xray_paths(count)[:count]]


def hold_a_batch_place(url: str) -> socket.socket:
    """A batch upload whose body is still arriving: it holds a place until its connection closes."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(request_head(port, "/predict/batch", chunked=False, length=10_000) + b"--")
    return sock


@pytest.fixture(scope="module")
def one_batch_server(trained_run, tmp_path_factory):
    running = Server(trained_run / "best.pt", "--max-batches-in-flight", "1", "--admission-wait", "10",
                     "--body-timeout", "60", workdir=tmp_path_factory.mktemp("admission"))
    yield running
    running.stop()


def test_a_batch_waits_for_the_place_a_finished_one_frees(one_batch_server):
    require_shared()
    holder = hold_a_batch_place(one_batch_server.url)
    answer = {}

    def send():
        start = time.monotonic()
        answer["response"] = httpx.post(f"{one_batch_server.url}/predict/batch", files=batch_files(2), timeout=60)
        answer["seconds"] = time.monotonic() - start
    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(1.5)
    assert sender.is_alive()  # waiting for the held place, not refused
    holder.close()  # the place frees: the waiting batch goes
    sender.join(60)
    assert answer["response"].status_code == 200, answer["response"].text
    assert len(answer["response"].json()["results"]) == 2 and answer["seconds"] >= 1.5
    assert answer["seconds"] < 8  # woken when the place freed, not at the end of its 10 s wait


def test_concurrent_batches_of_a_few_images_are_all_answered(one_batch_server):
    require_shared()
    statuses = []

    def client():
        for _ in range(3):
            statuses.append(httpx.post(f"{one_batch_server.url}/predict/batch", files=batch_files(2),
                                       timeout=120).status_code)
    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(180)
    assert statuses == [200] * 12


def test_a_request_that_finds_no_place_within_the_wait_gets_503(trained_run, tmp_path):
    require_shared()
    running = Server(trained_run / "best.pt", "--max-batches-in-flight", "1", "--admission-wait", "1.5",
                     "--body-timeout", "60", workdir=tmp_path)
    holder = hold_a_batch_place(running.url)
    try:
        time.sleep(0.3)
        start = time.monotonic()
        response = httpx.post(f"{running.url}/predict/batch", files=batch_files(1), timeout=60)
        seconds = time.monotonic() - start
        single = httpx.post(f"{running.url}/predict", files=[("file", batch_files(1)[0][1])], timeout=60)
    finally:
        holder.close()
        running.stop()
    assert (response.status_code, response.headers["retry-after"]) == (503, "1")
    assert response.json() == {"detail": "busy: 1 batch request(s) in progress (waited 1.5 s); retry in a second"}
    assert seconds >= 1.5
    assert single.status_code == 200  # a single image has places of its own


@pytest.mark.parametrize("value, message", [("-1", "--admission-wait -1: must be a number from 0 to 3,600"),
                                            ("nan", "--admission-wait nan: must be a number from 0 to 3,600"),
                                            ("3601", "--admission-wait 3601: must be a number from 0 to 3,600")])
def test_an_admission_wait_out_of_range_is_one_line(value, message):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "serve", "builtin", "--admission-wait", value,
                           "--port", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines()[-1].endswith(message), done.stderr
    assert "Traceback" not in done.stderr
