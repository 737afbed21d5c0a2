"""One real Orthanc per test module (it starts in about a second), and X-ray studies made from the shared
data."""
from __future__ import annotations

import pytest

from tests.conftest import SHARED_DATA, require_shared

from .orthanc import Orthanc, require_orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    require_orthanc()
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def xray_sources():
    """Two real X-rays of each class from the shared test folder."""
    require_shared()
    return {name: sorted((SHARED_DATA / "test" / name).iterdir())[:2] for name in ("NORMAL", "PNEUMONIA")}
