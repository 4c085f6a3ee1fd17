#!/usr/bin/env python3
"""Load and soak test of `anoscope serve` on 127.0.0.1: simulated cameras for a fixed time.

Starts the service in a subprocess on a free local port (or uses --url, local addresses only), runs N
asyncio camera clients that each post one image per frame period, reloads the model every few seconds,
mixes in a share of hostile inputs from the bad-image corpus, and at the end reports throughput, latency
percentiles, statuses and the server's resident memory (RSS) over time. It exits 1 when a criterion fails:

* no 5xx other than 503 `overloaded` (intended back-pressure) - in particular no 500, and no timeouts;
* every reload answers 200, every corpus input its documented status;
* server RSS at the end within the tolerance of its RSS after warm-up.

    python scripts/soak.py --duration 600                    # the 10-minute run of docs/reliability.md
    python scripts/soak.py --duration 20 --json out.json     # what tests/test_reliability_load.py runs

Bounded by design: --duration (at most 3600 s) and --max-requests stop it, whichever comes first.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402  (after the path set-up, like every import of this repository's modules)
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from service.localserver import LocalServer  # noqa: E402

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
MAX_DURATION_S = 3600


# -- the server ------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Server(LocalServer):
    """`python -m anoscope serve` on 127.0.0.1:<free port> serving `model_dir`, logging at info level."""

    def __init__(self, model_dir: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        super().__init__(["--model-dir", str(model_dir)], env={"ANOSCOPE_LOG_LEVEL": "info", **(env or {})}, cwd=cwd)


# -- the cameras -----------------------------------------------------------------------------------------


def camera_frames(n: int, width: int, height: int) -> list[bytes]:
    """JPEG frames like a line camera's: the dark texture, every third one with a bright defect."""
    frames = []
    for i in range(n):
        rng = np.random.default_rng(i)
        arr = rng.integers(40, 90, (height, width, 3), dtype=np.uint8)
        if i % 3 == 0:
            x, y = rng.integers(0, width - width // 8), rng.integers(0, height - height // 8)
            arr[y : y + height // 8, x : x + width // 8] = 250
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        frames.append(buf.getvalue())
    return frames


@dataclass
class Report:
    duration_s: float = 0.0
    cameras: int = 0
    requests: int = 0
    good_requests: int = 0
    images_scored: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    overloaded_503: int = 0
    errors: list[str] = field(default_factory=list)  # unexpected statuses, transport errors, corpus mismatches
    reloads: int = 0
    reload_failures: int = 0
    corpus_requests: int = 0
    throughput_rps: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # of the good requests
    rss_mb: dict[str, float] = field(default_factory=dict)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)
    rss_tolerance_mb: float = 0.0
    passed: bool = False

    def summary(self) -> str:
        lat = self.latency_ms
        rss = self.rss_mb
        return "\n".join(
            [
                f"{self.cameras} cameras for {self.duration_s:.0f} s: {self.requests} requests "
                f"({self.good_requests} good, {self.corpus_requests} from the bad-image corpus, "
                f"{self.reloads} reloads)",
                f"throughput {self.throughput_rps:.1f} requests/s, {self.images_scored} images scored",
                f"latency of good requests: p50 {lat.get('p50', 0):.1f} ms, p95 {lat.get('p95', 0):.1f} ms, "
                f"p99 {lat.get('p99', 0):.1f} ms, max {lat.get('max', 0):.1f} ms",
                f"statuses {dict(sorted(self.statuses.items()))}; 503 overloaded {self.overloaded_503}; "
                f"reload failures {self.reload_failures}",
                f"server RSS: {rss.get('start', 0):.1f} MB after warm-up, {rss.get('end', 0):.1f} MB at the end, "
                f"max {rss.get('max', 0):.1f} MB (tolerance {self.rss_tolerance_mb:.0f} MB)",
                f"errors: {len(self.errors)}" + "".join(f"\n  {e}" for e in self.errors[:20]),
                "PASS" if self.passed else "FAIL",
            ]
        )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values), q))


async def run_load(
    url: str,
    *,
    duration_s: float,
    cameras: int = 16,
    frame_period_s: float = 1.0,
    max_requests: int = 100_000,
    reload_every_s: float = 5.0,
    model: str = "demo",
    bad_share: float = 0.05,
    server_pid: int | None = None,
    warmup_s: float = 3.0,
    rss_tolerance_mb: float = 30.0,
    frame_size: tuple[int, int] = (640, 480),
    on_tick: Any = None,
) -> Report:
    """Run the cameras against `url` for `duration_s`; `on_tick(elapsed_s)` is called every second."""
    host = urlsplit(url).hostname
    if host not in LOCAL_HOSTS:
        msg = f"refusing to load {host}: this tool only targets the local machine (127.0.0.1)"
        raise ValueError(msg)
    if not 0 < duration_s <= MAX_DURATION_S:
        msg = f"--duration must be in (0, {MAX_DURATION_S}] seconds"
        raise ValueError(msg)
    from tests.badimages import QUERY, corpus

    bad_cases = [c for c in corpus() if c.group != "geometry" and c.expect != (200,)]
    frames = camera_frames(8, *frame_size)
    report = Report(cameras=cameras, rss_tolerance_mb=rss_tolerance_mb)
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    sent = 0
    start = time.monotonic()
    stop_at = start + duration_s

    def budget() -> bool:
        return time.monotonic() < stop_at and sent < max_requests

    def record_unexpected(what: str) -> None:
        if len(report.errors) < 200:
            report.errors.append(what)

    async def camera(index: int, client: httpx.AsyncClient) -> None:
        nonlocal sent
        rnd = random.Random(index)
        frame_no = 0
        next_frame = time.monotonic() + rnd.random() * frame_period_s
        while budget():
            await asyncio.sleep(max(0.0, next_frame - time.monotonic()))
            next_frame += frame_period_s
            if not budget():
                break
            sent += 1
            frame_no += 1
            if rnd.random() < bad_share:
                case = rnd.choice(bad_cases)
                try:
                    r = await client.post("/v1/predict" + QUERY, **case.request)
                except httpx.HTTPError as exc:
                    record_unexpected(f"camera {index} corpus {case.name!r}: {type(exc).__name__}: {exc}")
                    continue
                report.corpus_requests += 1
                statuses[str(r.status_code)] += 1
                if r.status_code == 503 and r.json().get("type", "").endswith(":overloaded"):
                    report.overloaded_503 += 1
                elif r.status_code not in case.expect:
                    record_unexpected(f"corpus {case.name!r}: {r.status_code}, expected {case.expect}")
                continue
            data = frames[(index + frame_no) % len(frames)]
            t0 = time.perf_counter()
            try:
                if frame_no % 2:
                    r = await client.post(
                        f"/v1/models/{model}/predict?regions=true",
                        content=data,
                        headers={
                            "Content-Type": "image/jpeg",
                            "Content-Disposition": f'inline; filename="c{index}.jpg"',
                        },
                    )
                else:
                    r = await client.post("/v1/predict", files=[("files", (f"c{index}-{frame_no}.jpg", data))])
            except httpx.HTTPError as exc:
                record_unexpected(f"camera {index}: {type(exc).__name__}: {exc}")
                continue
            elapsed_ms = (time.perf_counter() - t0) * 1000
            statuses[str(r.status_code)] += 1
            if r.status_code == 200:
                report.good_requests += 1
                report.images_scored += len(r.json()["results"])
                latencies.append(elapsed_ms)
            elif r.status_code == 503 and r.json().get("type", "").endswith(":overloaded"):
                report.overloaded_503 += 1
            else:
                record_unexpected(f"camera {index}: {r.status_code} {r.text[:200]}")

    async def reloader(client: httpx.AsyncClient) -> None:
        while True:
            await asyncio.sleep(reload_every_s)
            if not budget():
                return
            try:
                r = await client.post(f"/v1/models/{model}/reload")
            except httpx.HTTPError as exc:
                report.reload_failures += 1
                record_unexpected(f"reload: {type(exc).__name__}: {exc}")
                continue
            report.reloads += 1
            if r.status_code != 200:
                report.reload_failures += 1
                record_unexpected(f"reload: {r.status_code} {r.text[:200]}")

    async def sampler() -> None:
        while True:
            elapsed = time.monotonic() - start
            if server_pid is not None:
                value = rss_mb(server_pid)
                if value is not None:
                    report.rss_samples.append((round(elapsed, 1), round(value, 1)))
            if on_tick is not None:
                on_tick(elapsed)
            if not budget():
                return
            await asyncio.sleep(1.0)

    limits = httpx.Limits(max_connections=cameras + 4, max_keepalive_connections=cameras + 4)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        tasks = [asyncio.create_task(camera(i, client)) for i in range(cameras)]
        extra = [asyncio.create_task(sampler())]
        if reload_every_s > 0:
            extra.append(asyncio.create_task(reloader(client)))
        await asyncio.gather(*tasks)
        await asyncio.gather(*extra)

    report.duration_s = round(time.monotonic() - start, 2)
    report.requests = sum(statuses.values())
    report.statuses = dict(statuses)
    report.throughput_rps = round(report.requests / report.duration_s, 2)
    report.latency_ms = {
        "p50": round(_percentile(latencies, 50), 2),
        "p95": round(_percentile(latencies, 95), 2),
        "p99": round(_percentile(latencies, 99), 2),
        "max": round(max(latencies, default=0.0), 2),
        "mean": round(statistics.fmean(latencies), 2) if latencies else 0.0,
    }
    samples = report.rss_samples
    if samples:
        after_warmup = [v for t, v in samples if t >= warmup_s] or [samples[-1][1]]
        report.rss_mb = {"start": after_warmup[0], "end": samples[-1][1], "max": max(v for _, v in samples)}
    rss_ok = not samples or report.rss_mb["end"] - report.rss_mb["start"] <= rss_tolerance_mb
    report.passed = not report.errors and report.reload_failures == 0 and rss_ok and report.good_requests > 0
    if not rss_ok:
        report.errors.append(f"RSS grew by more than {rss_tolerance_mb} MB")
    return report


# -- the command -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600, help="seconds of load (at most 3600; default 600)")
    p.add_argument("--cameras", type=int, default=16, help="simulated cameras (default 16)")
    p.add_argument("--frame-period", type=float, default=1.0, help="seconds between one camera's frames (default 1.0)")
    p.add_argument(
        "--warmup", type=float, default=30.0,
        help="seconds of load with reloads before the measured run; RSS 'start' is taken after it (default 30)",
    )  # fmt: skip
    p.add_argument("--max-requests", type=int, default=500_000, help="stop after this many requests")
    p.add_argument("--reload-every", type=float, default=5.0, help="seconds between model reloads (0: none)")
    p.add_argument("--bad-share", type=float, default=0.05, help="share of requests from the bad-image corpus")
    p.add_argument("--rss-tolerance", type=float, default=50.0, help="MB the server's RSS may grow (default 50)")
    p.add_argument("--frame-size", default="640x480", help="camera frame size, WxH (default 640x480)")
    p.add_argument("--model-dir", type=Path, default=ROOT / "service" / "assets" / "models",
                   help="bundles to serve (default: the packaged demo)")  # fmt: skip
    p.add_argument("--model", default="demo", help="model to load and reload (default demo)")
    p.add_argument("--url", help="use a running service at this local URL instead of starting one")
    p.add_argument("--pid", type=int, help="with --url: the service's process id, for its RSS")
    p.add_argument("--json", type=Path, help="write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    width, height = (int(v) for v in args.frame_size.lower().split("x"))
    server = None
    url, pid = args.url, args.pid
    if url is None:
        server = Server(args.model_dir)
        server.wait_ready()
        url, pid = server.url, server.proc.pid
        print(f"started anoscope serve at {url} (pid {pid})", flush=True)
    with open("/proc/loadavg") as fh:
        load_before = fh.read().split()[:3]

    def tick(elapsed: float) -> None:
        if int(elapsed) % 60 == 0 and elapsed >= 1:
            print(f"  {elapsed:.0f} s, server RSS {rss_mb(pid) if pid else float('nan'):.1f} MB", flush=True)

    try:
        if args.warmup > 0:
            warm = asyncio.run(
                run_load(
                    url, duration_s=args.warmup, cameras=args.cameras, frame_period_s=args.frame_period,
                    reload_every_s=min(args.reload_every or 3.0, 3.0), model=args.model, bad_share=args.bad_share,
                    frame_size=(width, height), rss_tolerance_mb=float("inf"),
                )
            )  # fmt: skip
            print(f"warm-up: {warm.requests} requests, {warm.reloads} reloads, errors {len(warm.errors)}", flush=True)
        report = asyncio.run(
            run_load(
                url,
                duration_s=args.duration,
                cameras=args.cameras,
                frame_period_s=args.frame_period,
                max_requests=args.max_requests,
                reload_every_s=args.reload_every,
                model=args.model,
                bad_share=args.bad_share,
                server_pid=pid,
                rss_tolerance_mb=args.rss_tolerance,
                frame_size=(width, height),
                warmup_s=0.0,
                on_tick=tick,
            )
        )
    finally:
        code = server.stop() if server is not None else None
    with open("/proc/loadavg") as fh:
        load_after = fh.read().split()[:3]
    print(report.summary())
    print(f"load average (1, 5, 15 min) before {' '.join(load_before)}, after {' '.join(load_after)}; "
          f"{os.cpu_count()} CPUs")  # fmt: skip
    if server is not None:
        print(f"server exit status {code}")
    if args.json:
        data = asdict(report) | {"load_before": load_before, "load_after": load_after, "cpus": os.cpu_count()}
        args.json.write_text(json.dumps(data, indent=2))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
