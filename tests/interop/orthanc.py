"""A real Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``) for the tests: its own configuration, storage
and loopback ports under a temporary folder, started in about a second and stopped at the end."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port

ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = next((p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                                    "/usr/lib/orthanc/libOrthancDicomWeb.so") if Path(p).exists()), None)


def require_orthanc():
    if ORTHANC is None or DICOMWEB_PLUGIN is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does)")


class Orthanc:
    """One Orthanc process. ``modalities`` maps a name to (AE title, host, port) for its C-STORE/C-ECHO SCU."""

    def __init__(self, folder: Path, modalities: dict | None = None, aet: str = "ORTHANC", users: dict | None = None):
        self.folder, self.aet, self.modalities, self.users = Path(folder), aet, modalities, users
        self.folder.mkdir(parents=True, exist_ok=True)
        self._configure()
        self.process = None
        self.http = requests.Session()
        self.http.auth = next(iter(users.items())) if users else None

    def _configure(self):
        """Fresh ports and the configuration file that names them."""
        aet, modalities, users = self.aet, self.modalities, self.users
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb = f"{self.url}/dicom-web"
        config = {"Name": "pneumonia-cnn-test", "StorageDirectory": str(self.folder / "storage"),
                  "IndexDirectory": str(self.folder / "storage"), "HttpPort": self.http_port,
                  "DicomPort": self.dicom_port, "DicomAet": aet, "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
                  "HttpBindAddress": "127.0.0.1",
                  "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
                  "DicomModalities": {name: list(m) for name, m in (modalities or {}).items()},
                  "DicomAlwaysAllowStore": True, "StableAge": 1, "ConcurrentJobs": 1}
        (self.folder / "orthanc.json").write_text(json.dumps(config, indent=1))

    def start(self, attempts: int = 3) -> Orthanc:
        """Started and answering; started again on fresh ports when another process took one of its ports
        between the probe and Orthanc's bind."""
        for attempt in range(attempts):
            try:
                return self._start_once()
            except RuntimeError as error:
                if "already in use" not in str(error) or attempt == attempts - 1:
                    raise
                self.log.close()
                self._configure()
        raise AssertionError("unreachable")

    def _start_once(self) -> Orthanc:
        self.log = open(self.folder / "orthanc.log", "wb")  # noqa: SIM115 - open while Orthanc runs
        self.process = subprocess.Popen([ORTHANC, str(self.folder / "orthanc.json")], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).status_code in (200, 401):
                    return self
            except requests.RequestException:  # refused while starting, or accepted and not yet answered (a
                # ReadTimeout is no ConnectionError)
                time.sleep(0.1)
        raise RuntimeError("Orthanc did not answer within 30 s")

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.process:
            self.log.close()

    # ---------- the REST calls the tests need
    def upload(self, path) -> dict:
        response = self.http.post(f"{self.url}/instances", data=Path(path).read_bytes(), timeout=30)
        response.raise_for_status()
        return response.json()

    def instances(self) -> list[str]:
        return self.http.get(f"{self.url}/instances", timeout=10).json()

    def tags(self, orthanc_id: str) -> dict:
        return self.http.get(f"{self.url}/instances/{orthanc_id}/simplified-tags", timeout=10).json()

    def file(self, orthanc_id: str) -> bytes:
        return self.http.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30).content

    def instances_of_modality(self, modality: str) -> list[str]:
        return [i for i in self.instances() if self.tags(i).get("Modality") == modality]

    def send(self, modality: str, orthanc_ids) -> dict:
        response = self.http.post(f"{self.url}/modalities/{modality}/store", json={"Resources": list(orthanc_ids),
                                 "Synchronous": True}, timeout=60)
        response.raise_for_status()
        return response.json()

    def echo(self, modality: str) -> bool:
        return self.http.post(f"{self.url}/modalities/{modality}/echo", json={}, timeout=30).ok

    def clear(self):
        for orthanc_id in self.http.get(f"{self.url}/patients", timeout=10).json():
            self.http.delete(f"{self.url}/patients/{orthanc_id}", timeout=10)
