"""A bounded load test of `torchmnist serve`, against 127.0.0.1 only.

Starts `torchmnist serve RUN` on a free localhost port, sends `--requests` POST /api/predict
requests (a drawn digit as a PNG), `--concurrency` at a time from threads, stops by itself, and
prints the errors, the median and 99th-percentile latency, the requests per second and how the
server batched them, with the hardware and torch version.

    python benchmarks/serve_load.py RUN --requests 2000 --concurrency 16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

import torch
from PIL import Image, ImageDraw

from torchmnist.commands import bench


def digit_png() -> bytes:
    image = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(image).line([(70, 60), (200, 60), (120, 240)], fill=0, width=22)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder or checkpoint to serve")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "torchmnist", "serve", args.run, "--port",
                               str(port), "--device", "cpu"], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(url + "/api/health", timeout=1).close()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.1)
        png = digit_png()

        def one(_: int) -> tuple[float, bool]:
            start = time.perf_counter()
            request = urllib.request.Request(url + "/api/predict", data=png,
                                             headers={"content-type": "image/png"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    ok = response.status == 200 and json.loads(response.read())["class"] == "7"
            except (urllib.error.URLError, ConnectionError):
                ok = False
            return time.perf_counter() - start, ok

        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(one, range(min(50, args.requests))))  # warm-up, not counted
            start = time.perf_counter()
            results = list(pool.map(one, range(args.requests)))
            seconds = time.perf_counter() - start
        with urllib.request.urlopen(url + "/api/health") as response:
            health = json.loads(response.read())
    finally:
        server.terminate()
        server.wait()
    latencies = sorted(r[0] for r in results)
    errors = sum(not r[1] for r in results)
    print(bench.describe(bench.environment(torch.device("cpu"))))
    print(f"client and server on one machine, {os.cpu_count()} cores")
    print(f"{args.requests} requests, {args.concurrency} at a time: {errors} errors; latency "
          f"p50 {1000 * statistics.median(latencies):.1f} ms, p99 "
          f"{1000 * latencies[int(0.99 * (len(latencies) - 1))]:.1f} ms; "
          f"{args.requests / seconds:.0f} requests/s; server: {health['requests']} requests in "
          f"{health['batches']} forward passes (largest {health['largest_batch']})")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
