import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import SHARED_DATA, free_port


class Server:
    """A real ``pneumonia-cnn serve`` process on loopback; its output goes to ``log_path``."""

    def __init__(self, checkpoint, *extra, workdir: Path, host: str = "127.0.0.1", scheme: str = "http", env=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # another process may take the free port before the server binds it
            self.port = free_port()
            self.log_path = self.workdir / f"server-{self.port}.log"
            self.url = f"{scheme}://127.0.0.1:{self.port}"
            command = [sys.executable, "-m", "pneumonia_cnn", "serve", str(checkpoint), "--host", host, "--port",
                       str(self.port), "--device", "cpu", *map(str, extra)]
            self.log_file = open(self.log_path, "w")  # noqa: SIM115 - the server writes it until stop()
            self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})})
            try:
                return self.wait_ready()
            except RuntimeError:
                self.log_file.close()
                if attempt == 2 or "Address already in use" not in self.log():
                    raise

    def wait_ready(self):
        for _ in range(600):
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1, verify=False).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.process.kill()
        raise RuntimeError("server did not start in 60 s")

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


def start_server(checkpoint, *extra):
    """(process, url) of a plain loopback server; the caller terminates it (tests/test_decision.py uses this)."""
    import tempfile
    running = Server(checkpoint, *extra, workdir=Path(tempfile.mkdtemp(prefix="serve-")))
    return running.process, running.url


def add_key(path, key_id, role="predict") -> str:
    done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "api-key", str(path), "--id", key_id, "--role", role],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def xray_paths(count=3):
    paths = sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:count]
    paths += sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:count]
    return paths


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024


@pytest.fixture(scope="package")
def server(trained_run, tmp_path_factory):
    """Loopback, no keys, no audit log: the developer's setup."""
    running = Server(trained_run / "best.pt", "--max-upload-mb", "2", workdir=tmp_path_factory.mktemp("plain"))
    yield running.url, running.process
    running.stop()


@pytest.fixture(scope="package")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    path = folder / "keys.txt"
    return {"path": path, "ward": add_key(path, "ward3"), "admin": add_key(path, "ops", "admin")}


@pytest.fixture(scope="package")
def secure_server(trained_run, keys, tmp_path_factory):
    """As deployed: keys, an audit log, tight limits and time-outs so that the tests can reach them."""
    workdir = tmp_path_factory.mktemp("secure")
    (workdir / "tmp").mkdir()
    running = Server(trained_run / "best.pt", "--api-keys", keys["path"], "--audit-log", workdir / "audit.sqlite",
                     "--max-upload-mb", "2", "--body-timeout", "2", "--idle-timeout", "2", "--max-in-flight", "4",
                     "--admission-wait", "0",  # refused at once while the held uploads last (test_admission.py waits)
                     "--drift-window", "40", "--allowed-hosts", "xray.hospital.example", workdir=workdir,
                     env={"TMPDIR": str(workdir / "tmp")})
    running.audit_path = workdir / "audit.sqlite"
    running.tmp = workdir / "tmp"
    yield running
    running.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}
