"""`sentilens serve` under abuse, on 127.0.0.1 only, every attack bounded in count and time.

The server runs the tiny LLaVA (trained one epoch on the synthetic set, as in serve_load.py) with its default
limits, in a subprocess on an ephemeral loopback port. In every scenario the same legitimate load runs beside
the attack: ``--legit-clients`` clients sending ``POST /v1/predict`` (multipart PNG + text) one after the other,
and a probe calling ``/healthz`` every 100 ms. Scenarios:

- ``baseline``: no attack;
- ``slowloris``: ``--slow-connections`` sockets that send a request line and then one header line a second,
  never finishing (reconnecting when cut off, at most 4x that many connections in all), plus a tenth as many
  that send complete headers and then drip their body;
- ``oversized_list``: two clients posting, again and again, a 10.2 MB batch of 3.4 million empty posts
  (under the 10 MiB body cap; before the structural budget one such body blocked the event loop for 11 s);
- ``burst``: ``--burst`` clients each sending one prediction at the same instant (they are legitimate too:
  their answers count, a 503 with Retry-After being an answer);
- ``idle_flood``: ``--idle-sockets`` connections (1,100: past the default socket cap of 1,024) opened at once
  from the same address as the legitimate clients, sending nothing; each one the server closes is opened again
  (at most 10x that many connections in all), so the flood stays as large as the attacker can make it.

Per scenario: legitimate requests answered (any HTTP response) and answered with 200 within 2 s, their
latency p50/p99, /healthz p99 latency and failures on a kept-alive connection and on a new connection each
time (``healthz_fresh``: what a newcomer meets), and the server's RSS before and after (and its peak,
sampled every 100 ms), from /proc.

Usage: ``python benchmarks/abuse.py [--seconds 15] [--legit-clients 4] [--slow-connections 200] [--burst 200]
[--idle-sockets 1100] [--out benchmarks/results/abuse.json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import Server, percentile  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

from sentilens.data.records import read_manifest  # noqa: E402
from sentilens.data.synth import make_synthetic  # noqa: E402
from sentilens.machine import environment  # noqa: E402
from sentilens.mllm.train import mllm_train_config, train_mllm  # noqa: E402
from sentilens.runs import write_json  # noqa: E402

ANSWER_WITHIN_S = 2.0
HEALTH_EVERY_S = 0.1


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Legit:
    """The legitimate side of a scenario: predictions in turn, /healthz probes, RSS samples."""

    def __init__(self, url: str, pid: int, posts: list[tuple[bytes, str]]):
        self.url, self.pid, self.posts = url, pid, posts
        self.answers: list[tuple[float, str]] = []  # (seconds, status or error name) per prediction
        self.health_ms: list[float] = []
        self.health_failures = 0
        self.fresh_ms: list[float] = []
        self.fresh_failures = 0
        self.peak_rss = 0.0

    async def predict(self, http: httpx.AsyncClient, index: int) -> None:
        image, text = self.posts[index % len(self.posts)]
        started = time.perf_counter()
        try:
            response = await http.post("/v1/predict", files={"image": ("post.png", image, "image/png")},
                                       data={"text": text})
            status = str(response.status_code)
        except httpx.HTTPError as err:
            status = type(err).__name__
        self.answers.append((time.perf_counter() - started, status))

    async def clients(self, n: int, until: float) -> None:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, limits=limits) as http:
            async def one(index: int) -> None:
                i = index
                while time.monotonic() < until:
                    await self.predict(http, i)
                    i += n
            await asyncio.gather(*(one(i) for i in range(n)))

    async def probe(self, until: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            while time.monotonic() < until:
                started = time.perf_counter()
                try:
                    ok = (await http.get("/healthz")).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.health_ms.append((time.perf_counter() - started) * 1000)
                self.health_failures += not ok
                self.peak_rss = max(self.peak_rss, rss_mb(self.pid))
                await asyncio.sleep(HEALTH_EVERY_S)

    async def fresh_probe(self, until: float) -> None:
        """/healthz on a new connection each time: what a client arriving during the attack meets."""
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
                    ok = (await http.get("/healthz")).status_code == 200
            except httpx.HTTPError:
                ok = False
            self.fresh_ms.append((time.perf_counter() - started) * 1000)
            self.fresh_failures += not ok
            await asyncio.sleep(HEALTH_EVERY_S)

    def summary(self) -> dict:
        done = len(self.answers)
        statuses: dict[str, int] = {}
        for _, status in self.answers:
            statuses[status] = statuses.get(status, 0) + 1
        answered = sum(t <= ANSWER_WITHIN_S and status.isdigit() for t, status in self.answers)
        ok = sum(t <= ANSWER_WITHIN_S and status == "200" for t, status in self.answers)
        seconds = [t for t, _ in self.answers]
        return {"requests": done, "statuses": statuses,
                "answered_within_2s_rate": round(answered / done, 4) if done else None,
                "ok_within_2s_rate": round(ok / done, 4) if done else None,
                "latency_ms": {"p50": round(percentile(seconds, 50) * 1000, 1),
                               "p99": round(percentile(seconds, 99) * 1000, 1)} if done else None,
                "healthz": probes(self.health_ms, self.health_failures),
                "healthz_fresh": probes(self.fresh_ms, self.fresh_failures)}


def probes(ms: list[float], failures: int) -> dict:
    return {"probes": len(ms), "failures": failures, "p99_ms": round(percentile(ms, 99), 1) if ms else None,
            "max_ms": round(max(ms), 1) if ms else None}


async def slowloris(port: int, connections: int, until: float) -> dict:
    """Header drippers (and a tenth as many body drippers), reconnecting when cut, at most 4x in all."""
    counts = {"opened": 0, "cut_by_server": 0, "answered": {}}
    budget = 4 * connections
    lifetimes: list[float] = []

    async def dripper(body: bool) -> None:
        while time.monotonic() < until and counts["opened"] < budget:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            counts["opened"] += 1
            opened = time.monotonic()
            head = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            writer.write(head + (b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{" if body else b""))
            try:
                while time.monotonic() < until:
                    await writer.drain()
                    try:
                        data = await asyncio.wait_for(reader.read(65536), timeout=1.0)
                    except asyncio.TimeoutError:
                        writer.write(b" " if body else b"X-Drip: 1\r\n")
                        continue
                    if data:
                        status = data.split(b" ", 2)[1].decode(errors="replace")
                        counts["answered"][status] = counts["answered"].get(status, 0) + 1
                    counts["cut_by_server"] += 1
                    lifetimes.append(time.monotonic() - opened)
                    break
            except (ConnectionError, OSError):
                counts["cut_by_server"] += 1
                lifetimes.append(time.monotonic() - opened)
            finally:
                writer.close()

    await asyncio.gather(*(dripper(False) for _ in range(connections)),
                         *(dripper(True) for _ in range(max(1, connections // 10))))
    counts["longest_held_s"] = round(max(lifetimes), 1) if lifetimes else None
    return counts


async def idle_flood(port: int, sockets: int, until: float) -> dict:
    """``sockets`` connections that send nothing, each reopened when the server closes it, at most 10x in all."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < sockets + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, sockets + 256) if hard != resource.RLIM_INFINITY
                                                    else sockets + 256, hard))
    counts = {"sockets": sockets, "opened": 0, "cut_by_server": 0, "open_failures": 0}
    budget = 10 * sockets
    held = 0
    held_samples: list[int] = []

    async def holder() -> None:
        nonlocal held
        while time.monotonic() < until and counts["opened"] < budget:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                counts["open_failures"] += 1
                await asyncio.sleep(0.1)
                continue
            counts["opened"] += 1
            held += 1
            try:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(reader.read(1), timeout=max(until - time.monotonic(), 0.0))
                if time.monotonic() < until:
                    counts["cut_by_server"] += 1
            except (ConnectionError, OSError):
                counts["cut_by_server"] += 1
            finally:
                held -= 1
                writer.close()

    async def sample() -> None:
        while time.monotonic() < until:
            held_samples.append(held)
            await asyncio.sleep(0.1)

    await asyncio.gather(sample(), *(holder() for _ in range(sockets)))
    held_samples = held_samples[10:] or held_samples or [0]  # from the first second on: the flood is open
    counts["held_by_attacker"] = {"min": min(held_samples), "mean": round(sum(held_samples) / len(held_samples)),
                                  "max": max(held_samples),
                                  "share_of_time_over_1024": round(sum(h > 1024 for h in held_samples)
                                                                   / len(held_samples), 3)}
    return counts


async def oversized(url: str, until: float) -> dict:
    body = b'{"posts": [' + b",".join([b"{}"] * 3_400_000) + b"]}"
    statuses: dict[str, int] = {}
    seconds: list[float] = []

    async def attacker(http: httpx.AsyncClient) -> None:
        while time.monotonic() < until:
            started = time.perf_counter()
            response = await http.post("/v1/predict/batch", content=body, headers={"content-type": "application/json"})
            seconds.append(time.perf_counter() - started)
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(attacker(http), attacker(http))
    return {"body_bytes": len(body), "posts": 3_400_000, "statuses": statuses,
            "refusal_ms_p50": round(percentile(seconds, 50) * 1000, 1) if seconds else None}


async def burst(url: str, n: int, burst_side: Legit) -> dict:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        await asyncio.gather(*(burst_side.predict(http, i) for i in range(n)))
    summary = burst_side.summary()
    del summary["healthz"], summary["healthz_fresh"]
    return {"clients": n, "burst_requests": summary}


def attack_in_process(name: str, url: str, pid: int, posts, args, seconds: float) -> dict:
    """One attack on its own event loop, in a worker process (monotonic clocks are shared across processes)."""
    until = time.monotonic() + seconds
    if name == "slowloris":
        return asyncio.run(slowloris(urlsplit(url).port, args.slow_connections, until))
    if name == "idle_flood":
        return asyncio.run(idle_flood(urlsplit(url).port, args.idle_sockets, until))
    if name == "oversized_list":
        return asyncio.run(oversized(url, until))
    return asyncio.run(burst(url, args.burst, Legit(url, pid, posts)))


async def run_scenario(name: str, server: Server, posts, args, pool: ProcessPoolExecutor) -> dict:
    legit = Legit(server.url, server.process.pid, posts)
    before = rss_mb(server.process.pid)
    until = time.monotonic() + args.seconds
    attack: dict = {}
    tasks = [legit.clients(args.legit_clients, until), legit.probe(until), legit.fresh_probe(until)]
    if name != "baseline":
        # The attack runs in another process, so that sending it never delays the measuring side (nor its GIL).
        loop = asyncio.get_running_loop()
        tasks.append(loop.run_in_executor(pool, attack_in_process, name, server.url, server.process.pid, posts,
                                          args, until - time.monotonic()))
    results = await asyncio.gather(*tasks)
    if len(results) > 3:
        attack = results[3]
    await asyncio.sleep(1.0)
    after = rss_mb(server.process.pid)
    return {"attack": attack, "legitimate": legit.summary(),
            "server_rss_mb": {"before": round(before, 1), "after": round(after, 1),
                              "peak": round(max(legit.peak_rss, after), 1), "growth": round(after - before, 1)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="Duration of each scenario (a bound).")
    parser.add_argument("--legit-clients", type=int, default=4)
    parser.add_argument("--slow-connections", type=int, default=200)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--idle-sockets", type=int, default=1100)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "abuse.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        make_synthetic(tmp / "data", n=200, seed=0)
        train_mllm(mllm_train_config({"data": tmp / "data", "out": tmp / "run", "base_model": "tiny", "epochs": 1,
                                "batch_size": 8, "global_batch_size": 8, "eval_batch_size": 16}))
        posts = [(Path(p.image).read_bytes(), p.text) for p in read_manifest(tmp / "data")["test"] if p.image]
        server = Server(tmp / "run", tmp / "server.log", [])
        try:
            assert urlsplit(server.url).hostname == "127.0.0.1"
            with ProcessPoolExecutor(max_workers=1) as pool:
                scenarios = {name: asyncio.run(run_scenario(name, server, posts, args, pool))
                             for name in ("baseline", "slowloris", "oversized_list", "burst", "idle_flood")}
        finally:
            server.stop()
        log = (tmp / "server.log").read_text(errors="replace")

    legit_rates = [s["legitimate"]["answered_within_2s_rate"] for s in scenarios.values()]
    result = {
        "benchmark": "sentilens serve under abuse on 127.0.0.1 (default limits), legitimate load beside each attack",
        "model": "tiny LLaVA (96 px CLIP ViT, 36 visual tokens; 2-layer Llama), CPU",
        "environment": {**environment(), "load_average_1min_at_end": round(os.getloadavg()[0], 2)},
        "settings": {"seconds": args.seconds, "legit_clients": args.legit_clients,
                     "slow_connections": args.slow_connections, "burst": args.burst,
                     "idle_sockets": args.idle_sockets,
                     "answered_within_s": ANSWER_WITHIN_S},
        "scenarios": scenarios,
        "min_legit_answered_within_2s_rate": min(legit_rates),
        "max_healthz_fresh_ms": max(s["legitimate"]["healthz_fresh"]["max_ms"] for s in scenarios.values()),
        "max_rss_growth_mb": max(s["server_rss_mb"]["growth"] for s in scenarios.values()),
        "server_log_tracebacks": log.count("Traceback"),
    }
    write_json(args.out, result)
    print(f"written to {args.out}")
    for name, s in scenarios.items():
        print(f"{name:15s} legit answered<=2s {s['legitimate']['answered_within_2s_rate']} "
              f"ok<=2s {s['legitimate']['ok_within_2s_rate']} healthz p99 {s['legitimate']['healthz']['p99_ms']} ms "
              f"failures {s['legitimate']['healthz']['failures']} new-connection healthz max "
              f"{s['legitimate']['healthz_fresh']['max_ms']} ms failures "
              f"{s['legitimate']['healthz_fresh']['failures']} rss {s['server_rss_mb']}")


if __name__ == "__main__":
    main()
