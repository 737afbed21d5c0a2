"""A bounded load test on loopback: 2,000 requests, 32 concurrent."""
import asyncio

import httpx
import pytest

from pneumonia_cnn.inference import Predictor
from tests.conftest import SHARED_DATA


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024


@pytest.mark.slow
def test_2000_requests_no_failures_no_growth_correct_answers(server, trained_run):
    url, process = server
    paths = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:10] + sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:10]
    payloads = [(p.name, p.read_bytes()) for p in paths]
    expected = {p.name: r.probability for p, r in zip(paths, Predictor(trained_run / "best.pt", "cpu").predict_files(paths))}

    async def run(count):
        failures, wrong = [], []
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            semaphore = asyncio.Semaphore(32)

            async def one(i):
                name, data = payloads[i % len(payloads)]
                async with semaphore:
                    try:
                        response = await client.post(f"{url}/predict", files={"file": (name, data)})
                    except httpx.HTTPError as error:
                        failures.append(repr(error))
                        return
                if response.status_code != 200:
                    failures.append(response.text)
                elif abs(response.json()["probability"] - expected[name]) > 1e-6:
                    wrong.append(name)
            await asyncio.wait_for(asyncio.gather(*[one(i) for i in range(count)]), timeout=600)
        return failures, wrong

    failures, wrong = asyncio.run(run(300))  # warm-up
    assert not failures and not wrong
    after_warmup = rss_mb(process.pid)
    failures, wrong = asyncio.run(run(2000))
    growth = rss_mb(process.pid) - after_warmup
    assert not failures, failures[:3]
    assert not wrong, wrong[:3]
    assert growth < 50, f"server memory grew by {growth:.0f} MB"
