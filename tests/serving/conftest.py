import socket
import subprocess
import sys
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, *extra):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "serve", str(checkpoint), "--port", str(port),
                                "--device", "cpu", *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stdout.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("server did not start in 30 s")


@pytest.fixture(scope="package")
def server(trained_run):
    process, url = start_server(trained_run / "best.pt", "--max-upload-mb", "2")
    yield url, process
    process.terminate()
    process.wait(timeout=10)
