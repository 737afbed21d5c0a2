"""ONNX Runtime's idle threads: they spin by default (a batch job's cores are its own) and sleep in ``serve`` and
``listen``, whose scoring shares the cores with Grad-CAM, decoding and the network threads (docs/hospital.md)."""
import threading

import pytest

from pneumonia_cnn.errors import PneumoniaCNNError
from pneumonia_cnn.inference import Predictor
from pneumonia_cnn.inference.sessions import IDLE_THREADS
from tests.serving.conftest import xray_paths

SPIN = "session.intra_op.allow_spinning"


def spinning(predictor) -> str:
    return predictor.scorer.engine.sessions[0].get_session_options().get_session_config_entry(SPIN)


def test_sessions_spin_unless_told_to_sleep_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.delenv(IDLE_THREADS, raising=False)
    assert spinning(Predictor("builtin", "cpu", engine="onnx")) == "1"
    monkeypatch.setenv(IDLE_THREADS, " Sleep ")
    assert spinning(Predictor("builtin", "cpu", engine="onnx")) == "0"
    monkeypatch.setenv(IDLE_THREADS, "nap")
    with pytest.raises(PneumoniaCNNError, match=r"^PNEUMONIA_CNN_IDLE_THREADS='nap': use spin or sleep$"):
        Predictor("builtin", "cpu", engine="onnx")


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """serve sets torch's thread count for its process: the rest of the test session keeps its own."""
    import torch

    from pneumonia_cnn.serving.batcher import process_torch_threads
    threads = torch.get_num_threads()
    process_torch_threads.cache_clear()  # read again from this thread's count, as at a server's start
    yield threads
    torch.set_num_threads(threads)
    process_torch_threads.cache_clear()


class Stop(Exception):
    """Raised by the stand-ins below once the model is loaded: nothing is served."""


def test_serve_and_listen_score_with_sleeping_threads_unless_told(monkeypatch, tmp_path):
    from pneumonia_cnn.cli import main
    from pneumonia_cnn.interop import listener
    from pneumonia_cnn.serving import app
    seen = []

    class Server:  # in place of uvicorn's: records the served model's sessions instead of serving
        def __init__(self, config):
            self.service = config.app.state.service

        def run(self, sockets):
            seen.append(spinning(self.service.served.predictor))
            raise Stop

    class Listener:  # in place of the DICOM node: records the predictor it was given
        def __init__(self, predictor, *args, **kwargs):
            seen.append(spinning(predictor))
            raise Stop

    monkeypatch.setattr(app, "handshake_limited_server", lambda config, seconds: Server(config))
    monkeypatch.setattr(listener, "Listener", Listener)
    for name in (IDLE_THREADS, "PNEUMONIA_CNN_MALLOC"):  # serve sets both: recorded, each comes back as it was
        monkeypatch.setenv(name, "spin")
        monkeypatch.delenv(name)
    for given, expected in ((None, "0"), ("spin", "1")):  # the operator's own setting wins
        for start in (lambda: app.run_server("builtin", port=0),
                      lambda: main(["listen", "builtin", "--port", "11112", "--send-to", "127.0.0.1:104:PACS",
                                    "--spool", str(tmp_path / "spool")])):
            if given is None:
                monkeypatch.delenv(IDLE_THREADS, raising=False)  # each command sets it itself
            else:
                monkeypatch.setenv(IDLE_THREADS, given)
            with pytest.raises(Stop):
                start()
            assert seen.pop() == expected


def test_serve_gives_torch_one_thread_beside_a_scorer_that_is_not_torch(monkeypatch, torch_threads_restored):
    """On a CPU scored by ONNX Runtime, torch makes only the heat maps, beside the scorer's threads: one thread
    (1.3x the requests per second under Grad-CAM load on 2 cores), unless OMP_NUM_THREADS is given; a torch
    scorer keeps every thread. Decided for each model loaded: a reload to a torch scorer (an ``auto`` engine that
    fell back) scores with every thread again, and an engine loaded after the heat maps' one thread (OpenVINO
    sizes its pool from torch's count) gets every thread too."""
    import torch
    from fastapi.testclient import TestClient

    import pneumonia_cnn.inference as inference
    from pneumonia_cnn.serving import batcher, service
    from pneumonia_cnn.serving.app import create_app
    from pneumonia_cnn.serving.service import ServeOptions
    threads = torch_threads_restored
    if threads < 2:
        pytest.skip("torch has one thread here: nothing to take away")
    seen = {"scorer": [], "gradcam": [], "load": [], "batch": []}
    from pneumonia_cnn.inference.predictor import Predictor

    def batch_recorded(function):
        def wrapper(*arguments, **keywords):
            result = function(*arguments, **keywords)
            if threading.current_thread().name.startswith("site-batch"):
                seen["batch"].append(torch.get_num_threads())
            return result
        return wrapper

    def recorded(kind, function):
        def wrapper(*arguments, **keywords):  # the count the work ran with: read once it is done
            result = function(*arguments, **keywords)
            seen[kind].append(torch.get_num_threads())
            return result
        return wrapper
    monkeypatch.setattr(batcher, "_assess", recorded("scorer", batcher._assess))
    monkeypatch.setattr(service, "grad_cam", recorded("gradcam", service.grad_cam))
    monkeypatch.setattr(inference, "Predictor", recorded("load", inference.Predictor))
    monkeypatch.setattr(Predictor, "assess", batch_recorded(Predictor.assess))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    image = ("a.jpeg", xray_paths(1)[0].read_bytes())
    app = create_app("builtin", ServeOptions(device="cpu", engine="onnx"), allowed_hosts=["testserver"])
    with TestClient(app) as client:
        def heat_map_threads():
            assert client.post("/predict?gradcam=true", files={"file": image}).status_code == 200
            assert client.post("/predict/batch", files=[("files", image)]).status_code == 200
            assert seen["batch"].pop() == seen["gradcam"][-1]  # the site-batch thread: as the heat maps'
            return seen["scorer"].pop(), seen["gradcam"].pop()
        assert heat_map_threads() == (1, 1)
        app.state.service.options.engine = "torch"
        assert client.post("/admin/reload").json()["status"] == "reloaded"
        assert seen["load"][-1] == threads  # loaded in a thread started after the one-thread heat maps
        assert heat_map_threads() == (threads, threads)
        app.state.service.options.engine = "onnx"
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        assert client.post("/admin/reload").json()["status"] == "reloaded"
        assert heat_map_threads() == (threads, threads)
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert client.post("/admin/reload").json()["status"] == "reloaded"
        assert heat_map_threads() == (1, 1)


def test_serve_and_listen_refuse_a_bad_idle_threads_value_whichever_engine_scores(monkeypatch, capsys, tmp_path):
    """It was said only when an ONNX Runtime session was made: a torch or GPU server ignored it."""
    from pneumonia_cnn.cli import main
    from pneumonia_cnn.serving import app
    from pneumonia_cnn.serving.service import ServeOptions
    monkeypatch.setenv(IDLE_THREADS, "nap")
    monkeypatch.setattr(app, "handshake_limited_server", lambda config, seconds: pytest.fail("served"))
    with pytest.raises(PneumoniaCNNError, match=r"^PNEUMONIA_CNN_IDLE_THREADS='nap': use spin or sleep$"):
        app.run_server("builtin", port=0, options=ServeOptions(device="cpu", engine="torch"))
    assert main(["listen", "builtin", "--port", "11112", "--send-to", "127.0.0.1:104:PACS", "--spool",
                 str(tmp_path / "spool")]) == 2
    assert capsys.readouterr().err == "error: PNEUMONIA_CNN_IDLE_THREADS='nap': use spin or sleep\n"
