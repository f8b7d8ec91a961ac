#!/usr/bin/env python3
"""Load test of `lcpn serve`: images/s and latency with 1, 8 and 32 concurrent clients, against
`lcpn predict`'s batched throughput on the same models and images, and the server's memory over
many requests with garbage uploads mixed in.

    python scripts/load_test.py --models trained_models --images dataset_example
        [--clients 1,8,32] [--requests 320] [--seconds 60] [--batch-size 32]
        [--memory-requests 2000] [--memory-seconds 1200] [--garbage 0.05]
        [--max-batch 64] [--max-wait-ms 10] [--runtime torch|onnx] [--out load.json]

It starts its own `lcpn serve` on a free 127.0.0.1 port (never another host) and stops it at the
end. Every client sends one image per request, one request after another; each level stops after
--requests requests or --seconds seconds, whichever comes first. The batched baseline is
`Cascade.predict` over the same images with --batch-size (and --runtime): what `lcpn
predict` does once its models are loaded, measured in this process before the server starts.
The memory phase sends --memory-requests requests (or runs --memory-seconds) from 32 clients, a --garbage share of them
random bytes (answered 422), and samples the server process's resident memory (RSS) every 100.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from lcpn.cascade import open_cascade
from lcpn.feed import collect_images

HOST = "127.0.0.1"
START_TIMEOUT_S = 900  # loading and warming every node on a busy 2-core machine takes minutes


def batched_throughput(models: str, images: list[str], batch_size: int, runtime: str) -> float:
    """Images per second of `lcpn predict`'s path (models loaded once, batches of batch_size)."""
    cascade = open_cascade(models, runtime, "cpu")
    list(cascade.predict(images[:batch_size], batch_size))  # warm-up
    start = time.perf_counter()
    predictions = list(cascade.predict(images, batch_size))
    assert not any(p.error for p in predictions)
    return len(images) / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log) -> subprocess.Popen:
    """`lcpn serve` in a child process, logging to ``log`` (a file: an unread pipe would block it)."""
    command = [sys.executable, "-m", "lcpn", "serve", "--models", args.models, "--host", HOST, "--port", str(port),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
               "--device", "cpu", "--runtime", args.runtime]  # fmt: skip
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise SystemExit(f"the server stopped: {log.read()}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.kill()
    raise SystemExit(f"the server did not start within {START_TIMEOUT_S} s")


async def run_clients(url: str, payloads: list[tuple[str, bytes]], clients: int, requests: int, seconds: float,
                      on_answer=None) -> dict:  # fmt: skip
    """``clients`` clients, one image per request, until ``requests`` are sent or ``seconds`` pass."""
    latencies, statuses, sent = [], {}, 0
    stop_at = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < stop_at:
            name, data = payloads[sent % len(payloads)]
            sent += 1
            start = time.perf_counter()
            response = await http.post(f"{url}/v1/predict", files=[("files", (name, data))])
            latencies.append(time.perf_counter() - start)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if on_answer:
                on_answer(len(latencies))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    ordered = sorted(latencies)
    return {
        "clients": clients, "requests": len(latencies), "seconds": round(wall, 2),
        "images_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        "statuses": statuses,
    }  # fmt: skip


def batching(url: str) -> dict:
    return httpx.get(f"{url}/v1/model", timeout=30).json()["batching"]


def serve_and_measure(args, url: str, server: subprocess.Popen, payloads, baseline: float) -> tuple[list, dict]:
    """The client levels, then the memory phase, against a started server; stops it at the end."""
    try:
        process = psutil.Process(server.pid)
        asyncio.run(run_clients(url, payloads, 8, 64, 30))  # warm-up
        levels = []
        for clients in map(int, args.clients.split(",")):
            before = batching(url)
            result = asyncio.run(run_clients(url, payloads, clients, args.requests, args.seconds))
            after = batching(url)
            batches = max(1, after["batches"] - before["batches"])
            result["mean_batch"] = round((after["images"] - before["images"]) / batches, 1)
            result["share_of_batched"] = round(result["images_per_s"] / baseline, 2)
            levels.append(result)
            print(json.dumps(result), flush=True)

        rng = random.Random(0)
        mixed = [(f"garbage_{i}.jpg", rng.randbytes(rng.randint(0, 4096))) if rng.random() < args.garbage
                 else payloads[i % len(payloads)] for i in range(args.memory_requests)]  # fmt: skip
        rss = [(0, process.memory_info().rss)]

        def sample(done: int) -> None:
            if done % 100 == 0:
                rss.append((done, process.memory_info().rss))

        memory = asyncio.run(run_clients(url, mixed, 32, args.memory_requests, args.memory_seconds, sample))
        memory["rss_mb"] = {done: round(value / 2**20, 1) for done, value in rss}
        print(json.dumps(memory), flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return levels, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="trained_models")
    parser.add_argument("--images", nargs="+", default=["dataset_example"], help="image files or folders")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients per level, comma-separated")
    parser.add_argument("--requests", type=int, default=320, help="most requests per level")
    parser.add_argument("--seconds", type=float, default=60, help="most seconds per level")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the `lcpn predict` baseline")
    parser.add_argument("--memory-requests", type=int, default=2000)
    parser.add_argument("--memory-seconds", type=float, default=1200, help="most seconds of the memory phase")
    parser.add_argument("--garbage", type=float, default=0.05, help="share of garbage uploads in the memory phase")
    parser.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: --models is an `lcpn export` folder, served and baselined with onnxruntime",
    )
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=10)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    images = collect_images(args.images)
    payloads = [(Path(p).name, Path(p).read_bytes()) for p in images]
    baseline = batched_throughput(args.models, images, args.batch_size, args.runtime)
    print(f"lcpn predict (batches of {args.batch_size}, {len(images)} images): {baseline:.1f} images/s", flush=True)

    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryFile("w+") as log:
        levels, memory = serve_and_measure(args, url, start_server(args, port, log), payloads, baseline)

    print(f"\n| clients | images/s | share of `lcpn predict` ({baseline:.1f} img/s) | p50 ms | p99 ms | mean batch |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in levels:
        print(f"| {r['clients']} | {r['images_per_s']} | {r['share_of_batched']:.0%} | {r['p50_ms']} | {r['p99_ms']} "
              f"| {r['mean_batch']} |")  # fmt: skip
    values = list(memory["rss_mb"].values())
    print(f"\nserver RSS over {memory['requests']} requests ({args.garbage:.0%} garbage, statuses "
          f"{memory['statuses']}): {values[0]} MB at the start, {values[len(values) // 4]} MB after a quarter, "
          f"{max(values)} MB at most, {values[-1]} MB at the end")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"batched_images_per_s": baseline, "levels": levels, "memory": memory,
                                        "cpus": os.cpu_count()}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
