"""Load test of ``serve`` on loopback: N requests from C concurrent clients, a share of them with Grad-CAM.

    python benchmarks/load.py CHECKPOINT                     # 5,000 requests, 32 clients, 10% Grad-CAM
    python benchmarks/load.py CHECKPOINT --requests 500 --out /tmp/load.json

Starts the server itself (with API keys and an audit log, as a hospital would run it), learns each image's
answer from one request alone, then checks every loaded response against it. Reports failures, wrong
answers, p50/p95/p99 latency, throughput and the server's memory (RSS) after warm-up and at the end, and
checks that the audit log holds one row per answered request. Writes JSON (default
benchmarks/load_results.json).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT.parent / "shared" / "data" / "chest_xray_224"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (on a shared machine the load generator's own share counts)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint, workdir: Path, extra=(), device: str = "cpu"):
    paths = [str(PROJECT / "src"), os.environ.get("PYTHONPATH")]  # a GPU machine adds its own wheels' folder
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))
    key = subprocess.run([sys.executable, "-m", "pneumonia_cnn", "api-key", str(workdir / "keys.txt"), "--id",
                          "load"], capture_output=True, text=True, env=env, check=True).stdout.strip()
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "serve", str(checkpoint), "--port", str(port),
                                "--device", device, "--api-keys", str(workdir / "keys.txt"), "--audit-log",
                                str(workdir / "audit.sqlite"), *extra], env=env, stdout=subprocess.DEVNULL,
                               stderr=open(workdir / "server.log", "w"))
    import httpx
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url, key
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"server did not start: {(workdir / 'server.log').read_text()[-2000:]}")


LISTS = ("latencies", "failures", "wrong", "answered", "plain", "gradcam")  # what each client process collects


def load(url, key, payloads, expected, count, concurrency, gradcam_share, seed=0, device="cpu", processes=1):
    """The requests from ``concurrency`` clients spread over ``processes`` client processes (one process's
    httpx saturates a core near 64 connections: it, not the server, then set the pace). Returns (latencies,
    failures, wrong, answered request ids, {largest |probability - expected|, labels that differ from the
    image's answer alone, latency by kind, the clients' CPU seconds})."""
    rng = random.Random(seed)
    plan = [(i % len(payloads), rng.random() < gradcam_share) for i in range(count)]
    shares = [(url, key, payloads, expected, plan[i::processes], concurrency // processes +
               (i < concurrency % processes), device) for i in range(processes)]
    if processes == 1:
        parts = [run_clients(*shares[0])]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            parts = pool.starmap(run_clients, shares)
    merged = {name: [item for part in parts for item in part[name]] for name in LISTS}
    drift = {"largest": max(part["drift"]["largest"] for part in parts),
             "labels_changed": sum(part["drift"]["labels_changed"] for part in parts),
             "client_cpu_seconds": sum(part["cpu_seconds"] for part in parts)}
    drift["by_kind"] = {kind: {"count": len(values), "p50_ms": 1000 * percentile(values, 0.50),
                               "p95_ms": 1000 * percentile(values, 0.95), "p99_ms": 1000 * percentile(values, 0.99)}
                        for kind, values in (("plain", merged["plain"]), ("gradcam", merged["gradcam"]))}
    return merged["latencies"], merged["failures"], merged["wrong"], merged["answered"], drift


def run_clients(url, key, payloads, expected, plan, concurrency, device) -> dict:
    cpu = time.process_time()
    part = asyncio.run(clients(url, key, payloads, expected, plan, concurrency, device))
    return {**part, "cpu_seconds": time.process_time() - cpu}


async def clients(url, key, payloads, expected, plan, concurrency, device) -> dict:
    import httpx
    part = {name: [] for name in LISTS}
    part["drift"] = drift = {"largest": 0.0, "labels_changed": 0}
    # on a CPU an image's answer is bitwise the same in any batch; on a GPU cuDNN's float32 rounding depends on
    # the batch it was scored in (2e-8 measured on an H100)
    same_answer = 1e-9 if device == "cpu" else 1e-6
    headers = {"Authorization": f"Bearer {key}"}
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def client(http):
        while not queue.empty():
            index, gradcam = queue.get_nowait()
            name, data = payloads[index]
            start = time.perf_counter()
            try:
                response = await http.post(f"{url}/predict" + ("?gradcam=true" if gradcam else ""),
                                           files={"file": (name, data)}, headers=headers)
            except httpx.HTTPError as error:
                part["failures"].append(repr(error))
                continue
            part["latencies"].append(time.perf_counter() - start)
            # which kind sets the tail: a Grad-CAM answer also waits for the one Grad-CAM thread
            part["gradcam" if gradcam else "plain"].append(part["latencies"][-1])
            if response.status_code != 200:
                part["failures"].append(f"{response.status_code} {response.text[:200]}")
                continue
            body = response.json()
            part["answered"].append(body["request_id"])
            difference = abs(body["probability"] - expected[name][0])
            drift["largest"] = max(drift["largest"], difference)
            drift["labels_changed"] += body["label"] != expected[name][1]
            if difference > same_answer or (gradcam and "gradcam_png_base64" not in body):
                part["wrong"].append(name)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
    return part


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--gradcam-share", type=float, default=0.10)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="the server's --device (cpu, cuda)")
    parser.add_argument("--client-processes", type=int, help="default: one per 16 clients")
    parser.add_argument("--data", default=str(SHARED_DATA), help="a folder with test/NORMAL and test/PNEUMONIA")
    parser.add_argument("--out", default=str(PROJECT / "benchmarks" / "load_results.json"))
    args = parser.parse_args(argv)
    import httpx
    data = Path(args.data)
    if not all((data / "test" / label).is_dir() for label in ("NORMAL", "PNEUMONIA")):
        parser.error(f"--data {data}: no test/NORMAL and test/PNEUMONIA folders there")
    paths = (sorted((data / "test" / "NORMAL").iterdir())[:args.images // 2]
             + sorted((data / "test" / "PNEUMONIA").iterdir())[:args.images - args.images // 2])
    payloads = [(p.name, p.read_bytes()) for p in paths]
    processes = args.client_processes or max(1, -(-args.concurrency // 16))
    load_at_start = os.getloadavg()[0]  # the machine may be shared: other work slows the figures down
    with tempfile.TemporaryDirectory() as folder:
        process, url, key = start_server(args.checkpoint, Path(folder), device=args.device)
        try:
            auth = {"Authorization": f"Bearer {key}"}
            alone = {name: httpx.post(f"{url}/predict", files={"file": (name, data)}, headers=auth,
                                      timeout=60).json() for name, data in payloads}
            expected = {name: (body["probability"], body["label"]) for name, body in alone.items()}
            load(url, key, payloads, expected, args.warmup, args.concurrency, args.gradcam_share, seed=1,
                 processes=processes)
            rss_after_warmup = rss_mb(process.pid)
            start = time.perf_counter()
            latencies, failures, wrong, answered, drift = load(
                url, key, payloads, expected, args.requests, args.concurrency, args.gradcam_share,
                device=args.device, processes=processes)
            elapsed = time.perf_counter() - start
            server_cpu = cpu_seconds(process.pid)
            rss_end = rss_mb(process.pid)
            model = httpx.get(f"{url}/model", headers=auth).json()
        finally:
            process.terminate()
            process.wait(timeout=60)
        with sqlite3.connect(Path(folder) / "audit.sqlite") as connection:
            logged = {row[0] for row in connection.execute("SELECT request_id FROM predictions")}
    result = {
        "requests": args.requests, "concurrency": args.concurrency, "gradcam_share": args.gradcam_share,
        "model": {"name": model["model"], "input": model["preprocessing"]["size"],
                  "engine": model["scoring"]["engine"]},
        "device": args.device, "failures": len(failures), "wrong_answers": len(wrong),
        "largest_probability_difference": drift["largest"], "labels_changed": drift["labels_changed"],
        "failure_examples": failures[:5],
        "answered_not_in_audit_log": len(set(answered) - logged),
        "p50_ms": 1000 * percentile(latencies, 0.50), "p95_ms": 1000 * percentile(latencies, 0.95),
        "p99_ms": 1000 * percentile(latencies, 0.99), "latency_by_kind": drift["by_kind"],
        "throughput_per_s": len(latencies) / elapsed,
        "seconds": elapsed, "client_processes": processes,
        "client_cpu_seconds": drift["client_cpu_seconds"], "server_cpu_seconds_whole_run": server_cpu,
        "server_rss_mb_after_warmup": rss_after_warmup, "server_rss_mb_end": rss_end,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "load_average_at_start": load_at_start},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "failure_examples"}, indent=2))
    return 0 if not failures and not wrong and not result["answered_not_in_audit_log"] else 1


if __name__ == "__main__":
    sys.exit(main())
