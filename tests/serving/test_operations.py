"""Running it: metrics, drift in /health and /metrics, reload without dropping requests, graceful shutdown,
site batches with --adapt-batch and --prevalence."""
import asyncio
import io
import os
import signal
import socket
import threading
import time

import httpx
import numpy as np
import torch
from PIL import Image

from pneumonia_cnn.inference import Predictor
from tests.conftest import SHARED_DATA
from tests.serving.conftest import Server, bearer, xray_paths
from tests.serving.raw_http import multipart_head, read_response, request_head, status_of


def noise_png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (128, 128), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_metrics_and_drift_in_health_and_metrics(trained_run, keys, tmp_path):
    running = Server(trained_run / "best.pt", "--api-keys", keys["path"], "--drift-window", "30", workdir=tmp_path)
    auth = bearer(keys["ward"])
    try:
        assert httpx.get(f"{running.url}/health").json()["drift"]["status"] == "collecting"
        flagged = unlabelled = 0
        for seed in range(30):
            response = httpx.post(f"{running.url}/predict", files={"file": (f"n{seed}.png", noise_png(seed))},
                                  headers=auth)
            flagged += response.json()["in_distribution"] is False
            unlabelled += response.json()["label"] is None  # not an X-ray: no label
        httpx.post(f"{running.url}/predict", files={"file": ("bad.png", b"nope")}, headers=auth)
        drift = httpx.get(f"{running.url}/health").json()["drift"]
        text = httpx.get(f"{running.url}/metrics", headers=auth).text
    finally:
        running.stop()
    assert flagged >= 25
    assert drift["status"] == "drift" and drift["images"] == 30 and drift["ood_scores"]["psi"] > 0.25
    assert metric(text, "pneumonia_cnn_drift_status") == 2
    assert metric(text, 'pneumonia_cnn_drift_psi{score="ood_scores"}') == drift["ood_scores"]["psi"]
    assert metric(text, "pneumonia_cnn_ood_flags_total") == flagged
    assert metric(text, "pneumonia_cnn_predictions_total") == 30
    assert metric(text, 'pneumonia_cnn_predictions_total{label="none"}') == unlabelled == 30
    assert metric(text, "pneumonia_cnn_probability_count") == 30
    assert metric(text, "pneumonia_cnn_image_errors_total") == 1
    assert metric(text, 'pneumonia_cnn_http_requests_total{endpoint="/predict",status="200"}') == 30
    assert metric(text, 'pneumonia_cnn_http_requests_total{endpoint="/predict",status="400"}') == 1
    assert metric(text, 'pneumonia_cnn_http_request_seconds_count{endpoint="/predict"}') == 31
    assert metric(text, "pneumonia_cnn_batch_size_sum") == 30
    assert "drift: the last 30 images differ from the validation reference" in running.log()



def test_the_drift_window_counts_a_resent_file_once(trained_run, tmp_path):
    """As the offline check does: the same file sent again (a retry, a double click) is not a new image for the
    window; it had counted each time."""
    running = Server(trained_run / "best.pt", "--drift-window", "30", workdir=tmp_path)
    try:
        for seed in (0, 1, 2, 3, 4, 0, 0, 3):
            assert httpx.post(f"{running.url}/predict",
                              files={"file": (f"n{seed}.png", noise_png(seed))}).status_code == 200
        drift = httpx.get(f"{running.url}/health").json()["drift"]
    finally:
        running.stop()
    assert drift["status"] == "collecting" and drift["images"] == 5 and drift["copies_counted_once"] == 3

def variant_checkpoint(source, target, run_id, threshold):
    checkpoint = torch.load(source, weights_only=True, map_location="cpu")
    checkpoint["run_id"], checkpoint["threshold"] = run_id, threshold
    torch.save(checkpoint, str(target) + ".tmp")
    os.replace(str(target) + ".tmp", target)


def test_reload_under_load_drops_nothing(trained_run, keys, tmp_path):
    model = tmp_path / "model.pt"
    variant_checkpoint(trained_run / "best.pt", model, "model-a", 0.5)
    running = Server(model, "--api-keys", keys["path"], workdir=tmp_path)
    auth, answers, failures = bearer(keys["ward"]), [], []
    payloads = [(p.name, p.read_bytes()) for p in xray_paths(4)]

    stop = threading.Event()

    async def load():
        async with httpx.AsyncClient(timeout=60) as http:
            async def client(offset):
                index = offset
                while not stop.is_set():
                    name, data = payloads[index % len(payloads)]
                    index += 1
                    try:
                        response = await http.post(f"{running.url}/predict", files={"file": (name, data)},
                                                    headers=auth)
                        (answers if response.status_code == 200 else failures).append(response.json())
                    except httpx.HTTPError as error:
                        failures.append(repr(error))
            await asyncio.gather(*[client(i) for i in range(16)])
    try:
        loader = threading.Thread(target=lambda: asyncio.run(load()))
        loader.start()
        while len(answers) < 40:
            time.sleep(0.02)
        variant_checkpoint(trained_run / "best.pt", model, "model-b", 0.3)
        reloaded = httpx.post(f"{running.url}/admin/reload", headers=bearer(keys["admin"]), timeout=120)
        answered_at_reload = len(answers)
        while len(answers) < answered_at_reload + 40:
            time.sleep(0.02)
        stop.set()
        loader.join(timeout=60)
        assert reloaded.json() == {"status": "reloaded", "model": "model-b", "previous": "model-a"}
        assert not failures, failures[:3]
        models = [a["model"] for a in answers]
        # answered after the reload by the old model: only requests admitted before it, at most one per client
        # (not "the first 16 after it": one client's old request can finish after 16 of the others' new ones)
        after = models[answered_at_reload:]
        assert models[0] == "model-a" and len(after) >= 40 and after.count("model-a") <= 16  # >= 24 from model-b
        for answer in answers:  # each answer is whole: its label follows its own model's threshold
            assert answer["threshold"] == {"model-a": 0.5, "model-b": 0.3}[answer["model"]]
            assert answer["label"] == ("PNEUMONIA" if answer["probability"] >= answer["threshold"] else "NORMAL")
        model.write_bytes(b"half-copied checkpoint")
        failed = httpx.post(f"{running.url}/admin/reload", headers=bearer(keys["admin"]), timeout=120)
        assert failed.status_code == 500 and failed.json()["status"] == "failed" and failed.json()["model"] == "model-b"
        variant_checkpoint(trained_run / "best.pt", model, "model-c", 0.5)
        running.process.send_signal(signal.SIGHUP)
        for _ in range(300):
            if httpx.get(f"{running.url}/health").json()["model"] == "model-c":
                break
            time.sleep(0.1)
        assert httpx.get(f"{running.url}/health").json()["model"] == "model-c"
    finally:
        running.stop()


def test_graceful_shutdown_finishes_requests_in_flight(trained_run, tmp_path):
    running = Server(trained_run / "best.pt", workdir=tmp_path)
    image = xray_paths(1)[0].read_bytes()
    body = multipart_head("inflight.jpeg") + image + b"\r\n--pneumoniacnnboundary--\r\n"
    with socket.create_connection(("127.0.0.1", running.port)) as sock:
        sock.sendall(request_head(running.port, chunked=False, length=len(body)))
        sock.sendall(body[:len(body) // 2])
        time.sleep(0.3)
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:  # no new connections once shutting down
            socket.create_connection(("127.0.0.1", running.port), timeout=2).close()
            refused = False
        except OSError:
            refused = True
        sock.sendall(body[len(body) // 2:])
        response = read_response(sock, timeout=20)
    assert status_of(response) == 200 and b'"probability"' in response
    assert refused
    assert running.process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn exits by the signal it handled


def site_batch(count=40):
    paths = sorted((SHARED_DATA / "val" / "PNEUMONIA").iterdir())[:count // 2]
    return paths + sorted((SHARED_DATA / "val" / "NORMAL").iterdir())[:count - count // 2]


def test_site_batch_with_adapt_batch_equals_the_library(best_like_run, tmp_path):
    running = Server(best_like_run / "best.pt", "--adapt-batch", workdir=tmp_path)
    paths = site_batch(40)
    try:
        response = httpx.post(f"{running.url}/predict/batch", timeout=300,
                              files=[("files", (p.name, p.read_bytes())) for p in paths]
                              + [("files", ("x.png", b"no"))])
        single = httpx.post(f"{running.url}/predict", files={"file": (paths[0].name, paths[0].read_bytes())}).json()
        drift = httpx.get(f"{running.url}/health").json()["drift"]
    finally:
        running.stop()
    assert response.status_code == 200, response.text
    body = response.json()
    # the drift window compares scores with the validation reference, scored without adaptation: an adapted
    # batch's scores are left out of it (they had been mixed in), the single image is in
    assert any("re-estimated on this batch" in n for n in body["notes"]) and drift["images"] == 1
    library = Predictor(best_like_run / "best.pt", "cpu", adapt_batch=True)
    expected = library.predict_files([str(p) for p in paths])
    assert body["notes"] == library.last_notes
    assert any("batch-norm statistics re-estimated" in n or "not adapted" in n for n in body["notes"])
    assert body["results"][-1] == {"filename": "x.png", "error": body["results"][-1]["error"]}
    for result, prediction in zip(body["results"], expected):
        assert abs(result["probability"] - prediction.probability) < 1e-6 and result["label"] == prediction.label
    plain = Predictor(best_like_run / "best.pt", "cpu").predict_files([str(paths[0])])[0]
    assert abs(single["probability"] - plain.probability) < 1e-6  # single images are never adapted


def test_prevalence_is_passed_to_the_predictor(trained_run, tmp_path):
    running = Server(trained_run / "best.pt", "--prevalence", "0.3", workdir=tmp_path)
    path = xray_paths(1)[0]
    try:
        body = httpx.post(f"{running.url}/predict", files={"file": (path.name, path.read_bytes())}).json()
    finally:
        running.stop()
    expected = Predictor(trained_run / "best.pt", "cpu", prevalence=0.3).predict_files([path])[0]
    unadjusted = Predictor(trained_run / "best.pt", "cpu").predict_files([path])[0]
    assert abs(body["probability"] - expected.probability) < 1e-9
    assert abs(body["probability"] - unadjusted.probability) > 1e-3
    assert body["notes"] == ["probabilities stated for a pneumonia rate of 0.300 (given)"]


def test_estimated_prevalence_applies_to_site_batches_only(trained_run, tmp_path):
    running = Server(trained_run / "best.pt", "--prevalence", "estimate", workdir=tmp_path)
    paths = site_batch(40)
    try:
        batch = httpx.post(f"{running.url}/predict/batch", timeout=120,
                           files=[("files", (p.name, p.read_bytes())) for p in paths]).json()
        single = httpx.post(f"{running.url}/predict", files={"file": (paths[0].name, paths[0].read_bytes())}).json()
    finally:
        running.stop()
    library = Predictor(trained_run / "best.pt", "cpu", prevalence="estimate")
    expected = library.predict_files([str(p) for p in paths])
    assert batch["notes"] == library.last_notes and "estimated from this batch" in batch["notes"][0]
    for result, prediction in zip(batch["results"], expected):
        assert abs(result["probability"] - prediction.probability) < 1e-9
    plain = Predictor(trained_run / "best.pt", "cpu").predict_files([str(paths[0])])[0]
    assert abs(single["probability"] - plain.probability) < 1e-9
    assert [note.split(":")[0] for note in single["notes"]] == ["prevalence not estimated"]


def test_a_port_in_use_is_one_line_and_no_serving_line(trained_run):
    """uvicorn logged "serving ... on http://127.0.0.1:PORT" and then its own bind error; the socket is now bound
    before that line, and a port in use is the one-line error every command gives."""
    import subprocess
    import sys
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "serve", str(trained_run / "best.pt"), "--port",
                               str(port), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "serving" not in done.stderr


def test_accepted_connections_send_without_delay():
    """The listening socket named no protocol, so asyncio left TCP_NODELAY off on accepted connections: uvicorn
    sends a response's head and body apart, and Nagle with the client's delayed ACK added about 40 ms to every
    request after the first on a kept-alive connection (/health: 2.7 ms, then 44 ms each)."""
    import asyncio
    import socket

    from pneumonia_cnn.serving.app import bound_socket

    async def accepted_nodelay() -> int:
        listening = bound_socket("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        async def on_connect(reader, writer):
            sock = writer.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()
        server = await asyncio.start_server(on_connect, sock=listening)
        _, writer = await asyncio.open_connection(*listening.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 5)
        finally:
            writer.close()
            server.close()
    assert asyncio.run(accepted_nodelay()) != 0


def test_a_kept_alive_connection_outlives_the_clients_idle_limit(server):
    """uvicorn's keep-alive time-out was 5 s, httpx's idle limit too: under load (64 clients) a client reused a
    connection as the server closed it, and the request failed with ReadError('') unanswered. A kept-alive
    connection now stays open for --idle-timeout (15 s), so the client closes first."""
    from tests.serving.raw_http import read_response
    url, _ = server
    host, port = url.split("//")[1].split(":")
    request = f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(7)  # past uvicorn's 5 s and httpx's own limit
        sock.sendall(request)
        assert read_response(sock).startswith(b"HTTP/1.1 200")


def test_a_client_that_reset_before_its_refusal_is_closed_quietly():
    """Refusing a body in progress half-closes the connection (write_eof); a client that had reset it meanwhile
    made that raise "Transport endpoint is not connected", logged as an internal error with a traceback (2 in 500
    under a load test). The connection is now just closed."""
    from types import SimpleNamespace

    import h11

    from pneumonia_cnn.serving.limits import LingeringClose

    class ResetTransport:
        closed = False

        def is_closing(self):
            return self.closed

        def can_write_eof(self):
            return True

        def write_eof(self):
            raise OSError(107, "Transport endpoint is not connected")

        def close(self):
            self.closed = True

        def resume_reading(self):
            raise AssertionError("lingering on a connection the client reset")

    class Protocol(LingeringClose):
        conn = SimpleNamespace(their_state=h11.SEND_BODY)
    transport, protocol = ResetTransport(), Protocol()
    protocol.close_gently(transport)
    assert transport.closed and not protocol.lingering


def test_a_request_too_malformed_for_the_http_parser_is_counted(server):
    """uvicorn's parser answers it before the app sees it: it was missing from /metrics."""
    url, _ = server
    host, port = url.split("//")[1].split(":")

    def counted() -> float:
        text = httpx.get(f"{url}/metrics").text
        line = next((line for line in text.splitlines()
                     if line.startswith('pneumonia_cnn_http_requests_total{endpoint="other",status="400"}')), None)
        return float(line.split()[-1]) if line else 0.0
    before = counted()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GARBAGE \x00\x01 NOT-HTTP\r\n\r\n")
        from tests.serving.raw_http import read_response
        assert read_response(sock).startswith(b"HTTP/1.1 400")
    assert counted() == before + 1


def test_the_drift_warning_is_logged_once_per_episode(caplog):
    """A window hovering at the drift level moves between warning and drift: one warning until it is back at ok
    (each re-entry into drift from warning was logged again, 14 times in 2 minutes under a load test)."""
    from pneumonia_cnn.serving.service import Service

    class Window:  # the monitor's reports, in the order a hovering window gives them
        statuses = iter(["ok", "drift", "warning", "drift", "warning", "drift", "ok", "warning", "drift"])

        def report(self):
            return {"status": next(self.statuses), "images": 100,
                    "raw_scores": {"psi": 0.5, "ks_pvalue": 1e-5}}

    class Metrics:
        def set_drift(self, report):
            pass

    service = Service.__new__(Service)  # the drift bookkeeping alone: no model loaded
    service.drift, service.metrics, service.drift_alerted = Window(), Metrics(), False
    with caplog.at_level("WARNING", logger="pneumonia_cnn.serving.service"):
        for _ in range(9):
            service.drift_report()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(" over ")[0].split(" (")[0] for line in lines] == [
        "drift: the last 100 images differ from the validation reference",
        "drift: back within the levels",
        "drift: the last 100 images differ from the validation reference"]


def test_a_reload_of_the_same_model_keeps_the_drift_window_and_its_alert(trained_run, tmp_path):
    """Rotating an API key is a reload of the same checkpoint: it had emptied the window and cleared a drift alert
    until 100 new images came. Another model (another run id) starts a window of its own."""
    served = tmp_path / "served.pt"
    variant_checkpoint(trained_run / "best.pt", served, "model-a", 0.5)
    running = Server(served, "--drift-window", "30", workdir=tmp_path)
    try:
        for seed in range(30):
            httpx.post(f"{running.url}/predict", files={"file": (f"n{seed}.png", noise_png(seed))}, timeout=60)
        assert httpx.get(f"{running.url}/health").json()["drift"]["status"] == "drift"
        reloaded = httpx.post(f"{running.url}/admin/reload", timeout=120).json()
        drift = httpx.get(f"{running.url}/health").json()["drift"]
        for seed in range(30, 35):  # still drifting: no second warning
            httpx.post(f"{running.url}/predict", files={"file": (f"n{seed}.png", noise_png(seed))}, timeout=60)
        httpx.get(f"{running.url}/health")
        variant_checkpoint(trained_run / "best.pt", served, "model-b", 0.5)
        other = httpx.post(f"{running.url}/admin/reload", timeout=120).json()
        after_other = httpx.get(f"{running.url}/health").json()["drift"]
    finally:
        running.stop()
    assert reloaded == {"status": "reloaded", "model": "model-a", "previous": "model-a"}
    assert (drift["status"], drift["images"]) == ("drift", 30)
    assert running.log().count("differ from the validation reference") == 1
    assert other["model"] == "model-b" and (after_other["status"], after_other["images"]) == ("collecting", 0)


def test_the_window_is_kept_only_for_the_same_validation_scores():
    from pneumonia_cnn.monitoring import same_reference
    scores = {"raw_scores": np.array([0.1, 0.9]), "ood_scores": np.array([1.0, 2.0])}
    assert same_reference(scores, {name: values.copy() for name, values in scores.items()})
    assert same_reference(None, None)
    assert not same_reference(scores, None) and not same_reference(None, scores)
    assert not same_reference(scores, {"raw_scores": np.array([0.1, 0.9])})  # a detector refitted away
    assert not same_reference(scores, {**scores, "raw_scores": np.array([0.1, 0.8])})  # another model's scores
