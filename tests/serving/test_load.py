"""A bounded load test on loopback: 32 concurrent clients, 10% of requests with Grad-CAM (the full 5,000-request
run is benchmarks/load.py; its figures are in the README)."""
import asyncio
import random

import httpx
import pytest

from tests.conftest import SHARED_DATA
from tests.serving.conftest import Server, rss_mb


def load_paths():
    folders = (SHARED_DATA / "test" / "NORMAL", SHARED_DATA / "test" / "PNEUMONIA")
    return [path for folder in folders for path in sorted(folder.iterdir())[:10]]


async def run_load(url, payloads, count, seed, concurrency=32, gradcam_share=0.1):
    """[(name, gradcam, status, body or error)] for ``count`` requests, ``concurrency`` at a time."""
    rng = random.Random(seed)
    plan = [(payloads[i % len(payloads)], rng.random() < gradcam_share) for i in range(count)]
    semaphore, results = asyncio.Semaphore(concurrency), []
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(item):
            (name, data), gradcam = item
            async with semaphore:
                try:
                    response = await client.post(f"{url}/predict" + ("?gradcam=true" if gradcam else ""),
                                                 files={"file": (name, data)})
                    is_json = response.headers.get("content-type") == "application/json"
                    body = response.json() if is_json else response.text
                    results.append((name, gradcam, response.status_code, body))
                except httpx.HTTPError as error:
                    results.append((name, gradcam, None, repr(error)))
        await asyncio.gather(*[one(item) for item in plan])
    return results


@pytest.fixture(params=["onnx", "torch"])
def engine_server(request, server, trained_run, tmp_path):
    """The scorer on ONNX Runtime (the CPU default) and on torch, where Grad-CAM's hooks once fired on the
    batched forwards of the same model."""
    if request.param == "onnx":
        yield server
        return
    running = Server(trained_run / "best.pt", "--engine", "torch", workdir=tmp_path)
    yield running.url, running.process
    running.stop()


def test_gradcam_mixed_into_32_clients_gives_identical_answers_and_flat_memory(engine_server):
    url, process = engine_server
    payloads = [(p.name, p.read_bytes()) for p in load_paths()]
    alone = {name: httpx.post(f"{url}/predict", files={"file": (name, data)}).json() for name, data in payloads}
    with_map = {name: httpx.post(f"{url}/predict?gradcam=true", files={"file": (name, data)}).json()
                for name, data in payloads[:4]}
    asyncio.run(run_load(url, payloads, 200, seed=1))  # warm-up
    after_warmup = rss_mb(process.pid)
    results = asyncio.run(run_load(url, payloads, 600, seed=2))
    growth = rss_mb(process.pid) - after_warmup
    failures = [r for r in results if r[2] != 200]
    assert not failures, failures[:3]
    assert sum(gradcam for _, gradcam, _, _ in results) >= 40
    for name, gradcam, _, body in results:
        expected = alone[name]
        # equal to 1e-6: batch composition changes float rounding in torch's kernels (ONNX Runtime's are exact)
        assert body["probability"] == pytest.approx(expected["probability"], abs=1e-6)
        assert body["ood_score"] == pytest.approx(expected["ood_score"], abs=1e-4)
        assert body["label"] == expected["label"] and body["in_distribution"] == expected["in_distribution"]
        assert ("gradcam_png_base64" in body) == gradcam
        if gradcam and name in with_map:
            assert body["gradcam_png_base64"] == with_map[name]["gradcam_png_base64"]  # the same map under load
    assert growth < 50, f"server memory grew by {growth:.0f} MB"


def test_a_batch_being_decoded_does_not_hold_up_a_single_upload(server):
    """A batch's files went into the decode threads single uploads use (two on a 2-core machine): one X-ray
    waited 24 s behind a batch of 24 large 16-bit PNGs. A batch now decodes on a thread of its own. Here 8
    legal 7000 x 7000 16-bit PNGs (about a second each to decode), then one X-ray while they decode."""
    import io
    import threading
    import time

    import numpy as np
    from PIL import Image
    url = server[0]
    pixels = np.zeros((7000, 7000), np.uint16)
    pixels[:, 3500:] = 40000
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    batch = {}

    def send_batch():
        start = time.monotonic()
        batch["response"] = httpx.post(f"{url}/predict/batch", timeout=300,
                                       files=[("files", (f"large{i}.png", buffer.getvalue())) for i in range(8)])
        batch["seconds"] = time.monotonic() - start

    sender = threading.Thread(target=send_batch)
    sender.start()
    time.sleep(1.0)  # the batch is uploaded and decoding
    xray = load_paths()[0]
    start = time.monotonic()
    single = httpx.post(f"{url}/predict", files={"file": (xray.name, xray.read_bytes())}, timeout=300)
    single_seconds = time.monotonic() - start
    sender.join()
    assert single.status_code == 200 and batch["response"].status_code == 200
    assert all("probability" in r for r in batch["response"].json()["results"])
    assert single_seconds < batch["seconds"] / 3, (single_seconds, batch["seconds"])
