"""Load on `sentilens serve` over loopback: N concurrent clients x M requests each, bounded in count and time.

The server runs the tiny LLaVA (``--model tiny``, trained one epoch on the synthetic set; accuracy is not
the point) in a subprocess on 127.0.0.1 and an ephemeral port; each client sends ``POST /v1/predict``
(multipart: a synthetic PNG + its text) one after the other. Reported per scenario: requests/s, client-side
latency p50/p95/p99, the server's own ``latency_ms`` median, and status counts (errors must be 0 while
the clients are fewer than the queue). The same load runs in one go against three servers: micro-batching
as by default (``--max-batch 8``, no collection wait), with a 5 ms collection window, and off
(``--max-batch 1``), so their throughput ratios are measured on the same machine at the same time; a last
scenario overflows a queue of 2 to show 503s (with Retry-After), never 500s.

Usage: ``python benchmarks/serve_load.py [--clients 1,4,16] [--requests 25] [--max-seconds 60]
[--out benchmarks/results/serve_load.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from sentilens.data.records import read_manifest
from sentilens.data.synth import make_synthetic
from sentilens.machine import cpu_name
from sentilens.mllm.train import mllm_train_config, train_mllm
from sentilens.runs import write_json

STARTED = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
CONFIGS = {
    "batching_no_wait": ["--max-batch", "8", "--max-wait-ms", "0"],
    "batching_wait_5ms": ["--max-batch", "8", "--max-wait-ms", "5"],
    "no_batching": ["--max-batch", "1"],
}
"""Micro-batching as served by default (takes the requests already waiting), with a 5 ms collection
window, and off."""


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class Server:
    def __init__(self, run: Path, log: Path, options: list[str]):
        self.log = log
        self.output = log.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "sentilens", "serve", "--run", str(run), "--port", "0",
                                         *options], stdout=self.output, stderr=subprocess.STDOUT,
                                        env={**os.environ, "SENTILENS_QUIET": "1"})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.process.poll() is None:
            found = STARTED.search(log.read_text(errors="replace"))
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not start:\n{log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)
        self.output.close()


async def load(url: str, posts: list[tuple[bytes, str]], clients: int, requests: int, max_seconds: float) -> dict:
    """``clients`` tasks, each sending up to ``requests`` predictions in turn until ``max_seconds`` have passed."""
    latencies: list[float] = []
    server_ms: list[float] = []
    statuses: dict[str, int] = {}
    deadline = time.monotonic() + max_seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        for i in range(requests):
            if time.monotonic() > deadline:
                return
            image, text = posts[(index * requests + i) % len(posts)]
            started = time.perf_counter()
            response = await http.post("/v1/predict", files={"image": ("post.png", image, "image/png")},
                                       data={"text": text})
            latencies.append((time.perf_counter() - started) * 1000)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if response.status_code == 200:
                server_ms.append(response.json()["latency_ms"])
            elif response.status_code == 503 and "retry-after" not in response.headers:
                statuses["503_without_retry_after"] = statuses.get("503_without_retry_after", 0) + 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await http.post("/v1/predict", files={"image": ("post.png", posts[0][0], "image/png")},
                        data={"text": posts[0][1]})  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(i, http) for i in range(clients)))
        wall = time.perf_counter() - started
    done = len(latencies)
    ok = statuses.get("200", 0)
    return {"clients": clients, "requests": done, "seconds": round(wall, 3),
            "ok_per_second": round(ok / wall, 2),
            "latency_ms": {"p50": round(percentile(latencies, 50), 2), "p95": round(percentile(latencies, 95), 2),
                           "p99": round(percentile(latencies, 99), 2)},
            "server_latency_ms_p50": round(statistics.median(server_ms), 2) if server_ms else None,
            "statuses": statuses, "errors": done - ok}


def scenario(run: Path, tmp: Path, name: str, options: list[str], posts, clients: list[int], requests: int,
             max_seconds: float) -> list[dict]:
    server = Server(run, tmp / f"{name}.log", options)
    try:
        return [asyncio.run(load(server.url, posts, n, requests, max_seconds)) for n in clients]
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16", help="Concurrent clients per scenario, comma-separated.")
    parser.add_argument("--requests", type=int, default=25, help="Requests per client.")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="Time bound of each load.")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        make_synthetic(tmp / "data", n=200, seed=0)
        train_mllm(mllm_train_config({"data": tmp / "data", "out": tmp / "run", "base_model": "tiny", "epochs": 1,
                                "batch_size": 8, "global_batch_size": 8, "eval_batch_size": 16}))
        posts = [(Path(p.image).read_bytes(), p.text) for p in read_manifest(tmp / "data")["test"] if p.image]
        queue = ["--queue-size", "64"]
        loads = {name: scenario(tmp / "run", tmp, name, [*options, *queue], posts, clients, args.requests,
                                args.max_seconds) for name, options in CONFIGS.items()}
        overload = scenario(tmp / "run", tmp, "overload", ["--max-batch", "1", "--queue-size", "2"], posts,
                            [max(clients)], args.requests, args.max_seconds)

    baseline = loads["no_batching"]
    result = {
        "benchmark": "sentilens serve under concurrent load on loopback (POST /v1/predict, multipart image + text)",
        "model": "tiny LLaVA (96 px CLIP ViT, 36 visual tokens; 2-layer Llama), CPU",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                    "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "requests_per_client": args.requests,
        "max_seconds": args.max_seconds,
        "configs": {name: " ".join(options) for name, options in CONFIGS.items()},
        **loads,
        "throughput_over_no_batching": {
            name: {str(row["clients"]): round(row["ok_per_second"] / base["ok_per_second"], 3)
                   for row, base in zip(rows, baseline, strict=True)}
            for name, rows in loads.items() if name != "no_batching"},
        "overload_queue_2": overload,
        "errors_below_queue_limit": sum(row["errors"] for rows in loads.values() for row in rows),
    }
    write_json(args.out, result)
    print(f"written to {args.out}")
    for label, rows in (*loads.items(), ("overload", overload)):
        for row in rows:
            print(f"{label:16s} clients={row['clients']:3d} ok/s={row['ok_per_second']:8.2f} "
                  f"p50={row['latency_ms']['p50']:8.2f} p95={row['latency_ms']['p95']:8.2f} "
                  f"p99={row['latency_ms']['p99']:8.2f} statuses={row['statuses']}")


if __name__ == "__main__":
    main()
