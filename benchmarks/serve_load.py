"""A bounded load test of `torchmnist serve`, alone or side by side with LitServe, on 127.0.0.1.

Starts each server in turn on a free localhost port, serving the same run with the same batching
settings and each number of `--workers`, and sends it `--requests` POST requests (a drawn 7 as
{"image": base64 PNG}, which both read the same way) at each `--concurrency`: from Python
threads that each keep one HTTP connection open, or with `--client ab` from ApacheBench, which
leaves more of a small machine to the servers. Prints, per server, workers and concurrency:
errors, requests per second, median and 99th-percentile latency, with the hardware and torch
version. Stops by itself.

    python benchmarks/serve_load.py RUN --requests 2000 --concurrency 16
    pip install litserve
    python benchmarks/serve_load.py RUN --servers torchmnist,litserve --workers 1,2 \\
        --concurrency 1,8,64 --requests 1500 --rounds 2 --client ab
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from torchmnist.commands import bench

HERE = Path(__file__).resolve().parent


def digit_png() -> bytes:
    image = Image.new("L", (280, 280), 255)
    ImageDraw.Draw(image).line([(70, 60), (200, 60), (120, 240)], fill=0, width=22)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def start(server: str, run: str, port: int, max_batch: int, max_wait_ms: float,
          workers: int):
    if server == "torchmnist":
        command = [sys.executable, "-m", "torchmnist", "serve", run, "--port", str(port),
                   "--device", "cpu", "--max-batch", str(max_batch), "--max-wait-ms",
                   str(max_wait_ms), "--workers", str(workers)]
        path, ready = "/api/predict", "/api/ready"
    else:
        command = [sys.executable, str(HERE / "litserve_server.py"), run, "--port", str(port),
                   "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
                   "--workers", str(workers)]
        path, ready = "/predict", "/health"
    # A session of its own, so that stopping it stops every process it started (LitServe's
    # workers outlive a SIGTERM to its main process, and busy-wait).
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            connection.request("GET", ready)
            if connection.getresponse().status == 200:
                return process, path
        except OSError:
            pass
        if process.poll() is not None:
            raise SystemExit(f"{server} exited with {process.returncode} while starting")
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"{server} did not become ready in 120 s")


def load_with_ab(port: int, path: str, body: bytes, requests: int, concurrency: int) -> dict:
    """The same load from ApacheBench (`ab`, Debian's apache2-utils): a C client, which leaves
    more of a small machine's cores to the servers than Python threads do."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as payload:
        payload.write(body)
        payload.flush()
        url = f"http://127.0.0.1:{port}{path}"
        for n in (max(50, 4 * concurrency), requests):  # warm-up, then the measured run
            done = subprocess.run(["ab", "-q", "-k", "-n", str(n), "-c", str(concurrency), "-p",
                                   payload.name, "-T", "application/json", url],
                                  capture_output=True, text=True, check=True).stdout
    found = {}
    for line in done.splitlines():
        words = line.split()
        if line.startswith(("Failed requests:", "Non-2xx responses:")):
            found["errors"] = found.get("errors", 0) + int(words[-1])
        elif line.startswith("Requests per second:"):
            found["requests_per_s"] = float(words[3])
        elif words[:1] in (["50%"], ["99%"]):
            found[f"p{words[0][:-1]}_ms"] = float(words[1])
    return {"errors": found.get("errors", 0), "requests_per_s": found["requests_per_s"],
            "p50_ms": found["p50_ms"], "p99_ms": found["p99_ms"]}


def load(port: int, path: str, body: bytes, requests: int, concurrency: int) -> dict:
    """`requests` requests, `concurrency` at a time, each thread on its own kept-alive
    connection; the latencies of those answered 200 with the class 7."""
    local = threading.local()

    def one(_: int) -> tuple[float, bool]:
        if not hasattr(local, "connection"):
            local.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start_time = time.perf_counter()
        try:
            local.connection.request("POST", path, body=body,
                                     headers={"content-type": "application/json"})
            response = local.connection.getresponse()
            ok = response.status == 200 and json.loads(response.read())["class"] == "7"
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            local.connection.close()
            del local.connection
            ok = False
        return time.perf_counter() - start_time, ok

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(max(50, 4 * concurrency))))  # warm-up, not counted
        began = time.perf_counter()
        results = list(pool.map(one, range(requests)))
        seconds = time.perf_counter() - began
    latencies = sorted(r[0] for r in results)
    return {"errors": sum(not ok for _, ok in results),
            "requests_per_s": round(requests / seconds, 1),
            "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2)}


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group, then SIGKILL to whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder or checkpoint to serve")
    parser.add_argument("--servers", default="torchmnist")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", default="16", help="comma-separated, e.g. 1,8,64")
    parser.add_argument("--rounds", type=int, default=1, help="servers taken in turn, N times")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--workers", default="1", help="server processes: comma-separated, "
                        "each tried (torchmnist serve --workers, LitServe workers_per_device)")
    parser.add_argument("--client", choices=("python", "ab"), default="python")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    body = json.dumps({"image": base64.b64encode(digit_png()).decode()}).encode()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    measure = load_with_ab if args.client == "ab" else load
    servers = [(server, int(workers)) for workers in args.workers.split(",")
               for server in args.servers.split(",")]
    for round_number in range(args.rounds):
        for server, workers in servers:
            port = free_port()
            process, path = start(server, args.run, port, args.max_batch, args.max_wait_ms,
                                  workers)
            try:
                for concurrency in levels:
                    result = measure(port, path, body, args.requests, concurrency)
                    rows.append({"server": server, "workers": workers,
                                 "round": round_number + 1, "concurrency": concurrency,
                                 **result})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            finally:
                stop(process)
    environment = bench.environment(torch.device("cpu"))
    if args.json:
        print(json.dumps({"environment": environment, "max_batch": args.max_batch,
                          "max_wait_ms": args.max_wait_ms, "requests": args.requests,
                          "rows": rows}))
    else:
        print(bench.describe(environment))
        print(f"client ({args.client}) and servers on one machine, {os.cpu_count()} cores; "
              f"{args.requests} requests a row; batches of up to {args.max_batch}, waiting up "
              f"to {args.max_wait_ms} ms")
        for row in rows:
            print(f"{row['server']:>10} x{row['workers']}  round {row['round']}  "
                  f"{row['concurrency']:>3} at a time:"
                  f" {row['errors']} errors, {row['requests_per_s']:.0f} requests/s, p50 "
                  f"{row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms")
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
