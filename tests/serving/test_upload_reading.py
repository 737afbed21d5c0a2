"""The server reads an upload as ``predict`` reads a file of that name (one reading path): the same answer for
the same bytes, and no 500 for what ``predict`` gives a row."""
import json

import httpx
import numpy as np
import pytest
from PIL import Image

from pneumonia_cnn import builtin
from tests.conftest import SHARED_DATA, require_shared
from tests.data.test_reader_defects import run_cli, write_dicom
from tests.serving.conftest import Server


@pytest.fixture(scope="module")
def builtin_server(tmp_path_factory):
    running = Server(builtin.checkpoint_path(), "--engine", "torch", workdir=tmp_path_factory.mktemp("uploads"))
    yield running.url
    running.stop()


def test_the_server_and_predict_answer_alike_for_the_same_files(builtin_server, tmp_path):
    """A PNG called .dcm was refused by predict and scored by the server; a colour multi-frame DICOM was a
    traceback in predict and a 500 from the server. Each file now gets the same answer from both."""
    require_shared()
    xray = sorted((SHARED_DATA / "test" / "NORMAL").glob("*.jpeg"))[0]
    gray = np.asarray(Image.open(xray).convert("L"))
    Image.fromarray(gray).save(tmp_path / "png_as.dcm", format="PNG")
    rgb = np.repeat(gray[..., None], 3, axis=2)
    write_dicom(tmp_path / "frames.dcm", np.stack([rgb, rgb[::-1]]), "RGB", frames=2)
    (tmp_path / "text.dcm").write_text("This is a text file, not a DICOM.\n")
    files = sorted(tmp_path.iterdir())
    code, out, err = run_cli("predict", "builtin", *files, "--format", "json", "--engine", "torch")
    assert code == 0 and "Traceback" not in err, err
    rows = {row["path"].rsplit("/", 1)[-1]: row for row in json.loads(out)}
    for path in files:
        response = httpx.post(f"{builtin_server}/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)
        row = rows[path.name]
        if row["error"]:
            assert response.status_code == 400, (path.name, response.text)
            assert response.json()["detail"] == f"{path.name}: {row['error']}"
        else:
            assert response.status_code == 200, (path.name, response.text)
            assert response.json()["probability"] == pytest.approx(row["probability"], abs=1e-6), path.name
    assert rows["text.dcm"]["error"] and not rows["png_as.dcm"]["error"] and not rows["frames.dcm"]["error"]
