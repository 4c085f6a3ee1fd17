"""`anoscope bench speed`: one model on one machine, every scoring path side by side, against the FLOP bound.

Paths (each with warm-up and repeats; medians with p5/p95):
1. eager PyTorch, one image at a time (how the paper repositories score);
2. a bare ONNX Runtime session (CPU provider, the service's session options) at several batch sizes;
3. the service end to end over HTTP on 127.0.0.1: `anoscope serve` in a subprocess, an asyncio + httpx
   load generator bounded in requests and in seconds, at several client counts, with and without
   heatmaps (decode, pre-processing, batching, inference, regions, heatmap PNG, JSON, HTTP);
4. FLOPs per image (`FlopCounterMode` on the scoring head) and the machine's measured FP32 matmul
   throughput, so each figure is also a fraction of the compute bound.

The machine may be shared, so the paths are interleaved round by round (a change in background load
hits them all alike) and every figure carries the 1-minute load average sampled while it was taken.
Next to wall-clock throughput each path also reports the CPU time it consumed per image (the bench's
own process for eager PyTorch and the bare session; the server process, and separately the load
generator, for the service): on a busy machine wall time measures the neighbours as much as the code,
while CPU time per image is what decides throughput once the machine is ours.

Speed does not depend on the weights: without `--bundle`, each model is freshly initialised and
exported with `training.export.export_bundle` (parity checked on generated normal images, on which
the score statistics are also fitted). Eager PyTorch always runs a freshly built model of the bundle's
architecture, for the same reason.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

#: Batch sizes of the bare session: the issue's 1, 8, 32, plus 4 (what 4 clients batch to) for the ratio.
DEFAULT_BATCHES = (1, 4, 8, 32)
DEFAULT_CLIENTS = (1, 4, 16)
#: The service's default `max_batch_size`: service rows are compared with the bare session at this batch.
SERVICE_MAX_BATCH = 8


# ------------------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Spread:
    """Median and 5th/95th percentiles of a sample."""

    median: float
    p5: float
    p95: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        p5, med, p95 = np.percentile(v, [5, 50, 95])
        return cls(float(med), float(p5), float(p95), int(v.size))


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    try:
        return float(os.getloadavg()[0])
    except OSError:
        return float("nan")


def time_calls(
    fn: Callable[[], object], *, repeats: int, warmup: int = 1, cpu: list[float] | None = None
) -> list[float]:
    """Seconds per call of `fn`, after `warmup` untimed calls; appends CPU seconds per call to `cpu`."""
    for _ in range(warmup):
        fn()
    out = []
    cpu_start = time.process_time()  # every thread of this process: ONNX Runtime's and PyTorch's pools too
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    if cpu is not None:
        cpu.append((time.process_time() - cpu_start) / max(repeats, 1))
    return out


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


# ------------------------------------------------------------------------------------------ machine
def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    isa = (
        "AVX-512 VNNI"
        if "avx512_vnni" in flags
        else "AVX-512"
        if "avx512f" in flags
        else "AVX2"
        if "avx2" in flags
        else ""
    )
    return f"{cpu}, {os.cpu_count()} logical cores" + (
        f", {isa} (no VNNI)" if isa and "VNNI" not in isa else f", {isa}"
    )


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def matmul_gflops(n: int = 2048, repeats: int = 7, device: str = "cpu") -> dict[str, float]:
    """Measured FP32 matmul throughput (median GFLOP/s) of torch (on `device`) and numpy, n x n x n."""
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    flops = 2.0 * n**3

    def mm() -> None:
        torch.mm(ta, tb)
        if device != "cpu":
            torch.cuda.synchronize()

    cpu: list[float] = []
    with torch.no_grad():
        t_torch = time_calls(mm, repeats=repeats, warmup=2, cpu=cpu)
    t_numpy = time_calls(lambda: a @ b, repeats=repeats, warmup=2, cpu=cpu)
    return {
        "torch": flops / float(np.median(t_torch)) / 1e9,
        "numpy": flops / float(np.median(t_numpy)) / 1e9,
        # GFLOP per CPU-second (all threads) of the better library: the bound in CPU time, which the
        # neighbours hardly move. (The key keeps its first name so older reports still render.)
        "torch_per_cpu_s": flops / min(cpu) / 1e9 if device == "cpu" else float("nan"),
        "n": n,
        "device": device,
    }


def torch_device(providers: Sequence[str]) -> str:
    """Where eager PyTorch and the matmul bound run: the GPU when a GPU provider is asked for and present."""
    import torch

    wants_gpu = any(p in ("cuda", "tensorrt") for p in providers)
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------------------------------ models
@dataclass
class RandomInit:
    """A freshly initialised detector dressed as `training.checkpoint.TrainedModel` for `export_bundle`."""

    model_config: Any
    model: Any
    score_stats: dict[str, Any]
    mean: list[float]
    std: list[float]
    train_config: dict[str, Any] = field(default_factory=lambda: {"data": "generated normals", "epochs": 0})
    score_weights: Any = None
    normalization: Any = None
    provenance: dict[str, Any] = field(default_factory=lambda: {"weights": "random initialisation (speed bench)"})
    val_paths: list[str] = field(default_factory=list)
    train_paths: list[str] = field(default_factory=list)


def generated_normals(size: int, channels: int, n: int, seed: int = 0) -> np.ndarray:
    """(n, S, S[, 3]) uint8 synthetic normal images (fabric texture)."""
    from training.synthetic import make_normal_image

    return np.stack([make_normal_image(np.random.default_rng([seed, i]), "fabric", size, channels) for i in range(n)])


def preprocess_all(
    arrays: np.ndarray, size: int, channels: int, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    from PIL import Image

    from service.images import preprocess

    return np.stack(
        [preprocess(Image.fromarray(a), image_size=size, channels=channels, mean=mean, std=std) for a in arrays]
    )


def random_init(config: Any, *, seed: int = 0, n_images: int = 16) -> tuple[RandomInit, np.ndarray]:
    """A random-init detector with score statistics fitted on generated normals, and those images."""
    import torch

    from models import build_model
    from service.bundle import ScoreWeights
    from service.postprocess import fit_score_stats
    from training.export import torch_outputs

    torch.manual_seed(seed)
    model = build_model(config).eval()
    mean, std = [0.5] * config.channels, [0.5] * config.channels
    images = preprocess_all(
        generated_normals(config.image_size, config.channels, n_images, seed),
        config.image_size,
        config.channels,
        mean,
        std,
    )
    r, d, _ = torch_outputs(model.scoring_head().eval(), images)
    trained = RandomInit(config, model, fit_score_stats(r, d), mean, std, score_weights=ScoreWeights())
    return trained, images


def model_config(family: str, size: int, width_mult: float | None, config: str = "recommended") -> Any:
    """The architecture to time: what `anoscope train` builds by default ("recommended": the family's
    recommended settings, training.config) or the plain ModelConfig defaults ("plain": the paper-like
    network, no map discriminator, width 1); `width_mult` overrides the width of either.

    The recommended settings leave alignment, region, crop and exposure to `auto`, which training
    decides from the data; the networks timed here see none, so those resolve to "none" (the choice
    for a part photographed square-on and evenly lit; the network is the same either way)."""
    from dataclasses import replace

    from models import ModelConfig

    if config == "plain":
        base = ModelConfig(family=family, image_size=size)
    else:
        from training.config import recommended

        data_driven = {name: "none" for name in ("align", "roi", "crop", "exposure")}
        base = replace(recommended(family).model, image_size=size, **data_driven)
    return base if width_mult is None else replace(base, width_mult=width_mult)


def model_name(cfg: Any) -> str:
    """e.g. skipganomaly-128-w0.25-mapD: family, size, width multiplier, map discriminator."""
    map_d = "-mapD" if getattr(cfg, "discriminator_map", False) else ""
    return f"{cfg.family}-{cfg.image_size}-w{cfg.width_mult:g}{map_d}"


def count_flops(model: Any, channels: int, size: int) -> int:
    """FLOPs of one image through the scoring head (PyTorch's FlopCounterMode: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    head = model.scoring_head().eval()
    # no_grad, not inference_mode: spectral-norm parametrisations cannot run under inference_mode here.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        head(torch.zeros(1, channels, size, size))
    return int(counter.get_total_flops())


# ------------------------------------------------------------------------------------------ service
@dataclass(frozen=True)
class Service:
    url: str
    pid: int


@contextmanager
def running_service(bundle: Path, *, log: Path, env: dict[str, str] | None = None) -> Iterator[Service]:
    """`anoscope serve` on a free port of 127.0.0.1, serving `bundle` alone; yields its URL and pid."""
    from service.localserver import LocalServer

    workdir = Path(tempfile.mkdtemp(prefix="anoscope-speed-serve-"))
    try:
        models = workdir / "models"
        models.mkdir()
        # The registry refuses links out of its model directory: hard links (or copies) stay inside it.
        shutil.copytree(bundle, models / bundle.name, copy_function=_link_or_copy)
        settings = {  # no other ANOSCOPE_* variable reaches the server: the bench decides every setting
            "ANOSCOPE_MODEL_DIR": str(models),
            "ANOSCOPE_DEFAULT_MODEL": bundle.name,
            "ANOSCOPE_PROVIDERS": "cpu",  # callers pass env={"ANOSCOPE_PROVIDERS": ...} for a GPU
            "ANOSCOPE_LOG_LEVEL": "warning",
            **(env or {}),
        }
        with LocalServer(env=settings, cwd=workdir, log=log) as server:
            server.wait_ready(timeout=180)
            yield Service(server.url, server.pid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@dataclass
class LoadResult:
    completed: int
    errors: int
    seconds: float
    latencies_s: list[float]
    server_ms: dict[str, list[float]]  # per-image stage timings the service reported
    server_cpu_s: float = float("nan")  # CPU seconds the server process used in the timed window
    client_cpu_s: float = float("nan")  # CPU seconds the load generator used in the timed window

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0


async def _load(
    url: str, body: bytes, content_type: str, clients: int, max_requests: int, max_seconds: float, pid: int | None
) -> LoadResult:
    import httpx

    headers = {"content-type": content_type}
    latencies: list[float] = []
    server: dict[str, list[float]] = {"decode": [], "inference": [], "postprocess": []}
    errors = 0
    issued = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one() -> None:
            nonlocal errors
            start = time.perf_counter()
            response = await client.post(url, content=body, headers=headers)
            elapsed = time.perf_counter() - start
            if response.status_code != 200:
                errors += 1
                return
            latencies.append(elapsed)
            for result in response.json()["results"]:
                for k, v in result["timings_ms"].items():
                    server[k].append(float(v))

        await asyncio.gather(*(one() for _ in range(clients)))  # warm-up: connections opened, one each
        latencies.clear()
        for v in server.values():
            v.clear()
        errors = 0
        server_cpu = process_cpu_seconds(pid) if pid else float("nan")
        client_cpu = time.process_time()
        start = time.perf_counter()
        deadline = start + max_seconds

        async def worker() -> None:
            nonlocal issued
            while issued < max_requests and time.perf_counter() < deadline:
                issued += 1
                await one()

        await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - start
        client_cpu = time.process_time() - client_cpu
        server_cpu = (process_cpu_seconds(pid) if pid else float("nan")) - server_cpu
    return LoadResult(len(latencies), errors, seconds, latencies, server, server_cpu, client_cpu)


def load_test(
    url: str,
    body: bytes,
    content_type: str,
    *,
    clients: int,
    max_requests: int,
    max_seconds: float,
    server_pid: int | None = None,
) -> LoadResult:
    """`clients` concurrent keep-alive clients POSTing `body` until `max_requests` or `max_seconds`.

    With `server_pid`, the server process's CPU time over the timed window is measured too."""
    return asyncio.run(_load(url, body, content_type, clients, max_requests, max_seconds, server_pid))


def request_image(size: int, channels: int, fmt: str, seed: int = 1) -> tuple[bytes, str]:
    """A generated normal image of `size` px encoded as `fmt` (png or jpeg), and its content type."""
    import io

    from PIL import Image

    arr = generated_normals(size, channels, 1, seed)[0]
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        return buf.getvalue(), "image/jpeg"
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue(), "image/png"


# ------------------------------------------------------------------------------------------ stages
def profile_stages(
    bundle: Path, body: bytes, *, heatmap: str, repeats: int, providers: Sequence[str] = ("cpu",)
) -> dict[str, Spread]:
    """Where one request's time goes inside the service, stage by stage, in-process (ms, batch of 1).

    Calls the service's own functions in the order `service.app.pipeline` does: decode, pre-process,
    inference, post-processing (regions, heatmap PNG, response models), JSON serialisation.
    """
    from service.app.pipeline import Decoded, HeatmapMode, PredictOptions, postprocess
    from service.app.schemas import ModelRef, PredictResponse
    from service.engine import OnnxEngine, preprocess_for
    from service.images import decode_image

    engine = OnnxEngine(bundle, providers=providers)
    meta = engine.metadata
    options = PredictOptions(heatmap=HeatmapMode(heatmap), regions=True)
    ref = ModelRef(name=meta.name, version=meta.version)
    stages: dict[str, list[float]] = {k: [] for k in ("decode", "preprocess", "inference", "postprocess", "json")}
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        img = decode_image(body)
        t1 = time.perf_counter()
        tiles, grid = preprocess_for(meta, img)
        t2 = time.perf_counter()
        raw = engine.run(tiles)
        t3 = time.perf_counter()
        keep = img if options.heatmap is HeatmapMode.overlay else None
        scored = postprocess(meta, ref, [Decoded(None, img.size, tiles, grid, keep, 0.0)], raw, 0.0, options)
        t4 = time.perf_counter()
        PredictResponse(results=[r for r, _ in scored]).model_dump_json()
        t5 = time.perf_counter()
        if i == 0:
            continue  # warm-up
        for k, (a, b) in zip(stages, [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5)], strict=True):
            stages[k].append((b - a) * 1000)
    return {k: Spread.of(v) for k, v in stages.items()}


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Row:
    """One path's figure for one model."""

    model: str
    precision: str
    path: str  # "eager PyTorch", "ONNX Runtime", "service"
    batch: int | None = None
    clients: int | None = None
    heatmap: str | None = None
    images_per_s: Spread | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    fraction_of_bound: float | None = None
    load: list[float] = field(default_factory=list)
    requests: int = 0
    errors: int = 0
    server_ms: dict[str, float] = field(default_factory=dict)
    #: CPU ms per image: this process (eager, bare session) or the server process (service).
    cpu_ms: float | None = None
    client_cpu_ms: float | None = None  # service rows: the load generator's CPU ms per request


@dataclass
class ModelSpeed:
    model: str
    family: str
    image_size: int
    width_mult: float
    gflops_per_image: float
    params_m: float
    bundles: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    stages_ms: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _percentiles_ms(seconds: Sequence[float]) -> dict[str, float]:
    if not seconds:
        return {}
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def _ort_session(bundle: Path, providers: Sequence[str] = ("cpu",)) -> Any:
    """A bare ONNX Runtime session built by the service's own engine: its session options (threads,
    spinning, optimisation level) and provider chain, so a change to the engine moves both sides alike."""
    from service.engine import OnnxEngine

    return OnnxEngine(bundle, providers=providers)._session  # timed through session.run, bare


def build_bundles(
    config: Any, precisions: Sequence[str], out: Path, *, log: Callable[[str], None], reuse: bool = True
) -> tuple[Any, dict[str, Path]]:
    """Random-init model and its bundles (one per precision) under `out`.

    With `reuse`, a bundle already there for the same architecture and precision is kept (the seed is
    fixed, so it holds the same weights).
    """
    from service.bundle import read_metadata
    from service.errors import BundleError
    from training.export import TOLERANCES, Tolerance, export_bundle

    trained, images = random_init(config)
    bundles = {}
    for precision in precisions:
        path = out / f"{model_name(config)}-{precision}"
        bundles[precision] = path
        if reuse:
            try:
                meta = read_metadata(path)
                if meta.network == config.to_dict() and meta.precision == precision:
                    log(f"reusing {path}")
                    continue
            except BundleError:
                pass
        tolerance = TOLERANCES[precision]
        if precision != "fp32":
            # Random weights give degenerate score spreads; speed does not depend on accuracy, so the
            # reduced-precision bundles of the speed bench are checked loosely (export's defaults still
            # apply to real models).
            tolerance = Tolerance(rtol=0.1, atol=1e-3, spread=10.0)
        start = time.perf_counter()
        export_bundle(
            trained,
            path,
            parity_images=images,
            overwrite=True,
            precision=precision,
            tolerance=tolerance,
            calibration_images=images,
        )
        log(f"exported {path.name} in {time.perf_counter() - start:.0f} s")
    return trained.model, bundles


def measure_model(
    model: Any,
    bundles: dict[str, Path],
    args: Any,
    *,
    bound_gflops: float,
    log: Callable[[str], None],
    workdir: Path,
) -> ModelSpeed:
    """Every path for one architecture, interleaved over `args.rounds` rounds."""
    import torch

    from service.bundle import read_metadata

    meta = read_metadata(next(iter(bundles.values())))
    size, channels = meta.image_size, meta.channels
    cfg = model.config
    name = model_name(cfg)
    flops = count_flops(model, channels, size)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    result = ModelSpeed(
        name, meta.family, size, float(cfg.width_mult), flops / 1e9, params, {k: str(v) for k, v in bundles.items()}
    )
    bound_ips = bound_gflops * 1e9 / flops  # images/s at the FP32 matmul rate
    images = preprocess_all(
        generated_normals(size, channels, max(args.batches), seed=7), size, channels, meta.mean, meta.std
    )
    body, content_type = request_image(args.request_size or size, channels, args.request_format)

    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    device = torch_device(providers)
    head = model.to(device).scoring_head().eval()
    x1 = torch.from_numpy(images[:1]).to(device)
    sessions = {p: _ort_session(b, providers) for p, b in bundles.items()}
    result.notes.extend(f"bare session {p}: {s.get_providers()[0]}" for p, s in sessions.items())

    def eager() -> None:
        head(x1)
        if device != "cpu":
            torch.cuda.synchronize()

    eager_t: list[float] = []
    eager_cpu: list[float] = []
    eager_load: list[float] = []
    ort_t: dict[tuple[str, int], list[float]] = {}
    ort_cpu: dict[tuple[str, int], list[float]] = {}
    ort_load: dict[tuple[str, int], list[float]] = {}
    service: dict[tuple[str, int, str], list[LoadResult]] = {}
    service_load: dict[tuple[str, int, str], list[float]] = {}

    with ExitStack() as stack:
        servers: dict[str, Service] = {}
        for p in args.service_precisions:
            if p in bundles and not args.no_service:
                servers[p] = stack.enter_context(
                    running_service(
                        bundles[p],
                        log=workdir / f"serve-{name}-{p}.log",
                        env={"ANOSCOPE_PROVIDERS": ",".join(providers)},
                    )
                )
        for r in range(args.rounds):
            log(f"{name}: round {r + 1}/{args.rounds} (load {load_average():.2f})")
            with torch.no_grad():
                eager_load.append(load_average())
                eager_t += time_calls(eager, repeats=args.repeats, warmup=1 if r == 0 else 0, cpu=eager_cpu)
            for p, sess in sessions.items():
                for b in args.batches:
                    feed = {meta.input_name: images[:b]}
                    ort_load.setdefault((p, b), []).append(load_average())
                    cpu = ort_cpu.setdefault((p, b), [])
                    ort_t.setdefault((p, b), []).extend(
                        time_calls(lambda s=sess, f=feed: s.run(None, f), repeats=args.repeats, warmup=1, cpu=cpu)
                    )
                    cpu[-1] /= b  # per image
            for p, srv in servers.items():
                for clients in args.clients:
                    for hm in args.heatmaps:
                        key = (p, clients, hm)
                        service_load.setdefault(key, []).append(load_average())
                        res = load_test(
                            f"{srv.url}/v1/predict?heatmap={hm}&regions=true",
                            body,
                            content_type,
                            clients=clients,
                            max_requests=args.requests,
                            max_seconds=args.seconds,
                            server_pid=srv.pid,
                        )
                        service.setdefault(key, []).append(res)
                        log(
                            f"  service {p} clients={clients} heatmap={hm}: {res.throughput:.1f} img/s "
                            f"({res.completed} requests, {res.errors} errors)"
                        )

    eager_ips = Spread.of([1 / t for t in eager_t])
    result.rows.append(
        Row(
            name,
            "fp32",
            "eager PyTorch",
            batch=1,
            images_per_s=eager_ips,
            latency_ms={"median": float(np.median(eager_t) * 1000)},
            fraction_of_bound=eager_ips.median / bound_ips,
            load=eager_load,
            cpu_ms=float(np.median(eager_cpu) * 1000),
        )
    )
    for (p, b), ts in ort_t.items():
        ips = Spread.of([b / t for t in ts])
        result.rows.append(
            Row(
                name,
                p,
                "ONNX Runtime",
                batch=b,
                images_per_s=ips,
                latency_ms={"median": float(np.median(ts) * 1000)},
                fraction_of_bound=ips.median / bound_ips,
                load=ort_load[(p, b)],
                cpu_ms=float(np.median(ort_cpu[(p, b)]) * 1000),
            )
        )
    for (p, clients, hm), results in service.items():
        ips = Spread.of([res.throughput for res in results])
        lat = [x for res in results for x in res.latencies_s]
        server = {
            k: float(np.median(v))
            for k, v in (
                (k, [x for res in results for x in res.server_ms[k]]) for k in ("decode", "inference", "postprocess")
            )
            if v
        }
        result.rows.append(
            Row(
                name,
                p,
                "service",
                clients=clients,
                heatmap=hm,
                images_per_s=ips,
                latency_ms=_percentiles_ms(lat),
                fraction_of_bound=ips.median / bound_ips,
                load=service_load[(p, clients, hm)],
                requests=sum(res.completed for res in results),
                errors=sum(res.errors for res in results),
                server_ms=server,
                cpu_ms=float(np.median([res.server_cpu_s / max(res.completed, 1) for res in results]) * 1000),
                client_cpu_ms=float(np.median([res.client_cpu_s / max(res.completed, 1) for res in results]) * 1000),
            )
        )
    if args.stage_repeats:
        for hm in args.heatmaps:
            stages = profile_stages(
                bundles["fp32"] if "fp32" in bundles else next(iter(bundles.values())),
                body,
                heatmap=hm,
                repeats=args.stage_repeats,
                providers=providers,
            )
            result.stages_ms[hm] = {k: asdict(v) for k, v in stages.items()}
    return result


# ------------------------------------------------------------------------------------------ report
def _fmt_spread(s: Spread | None, digits: int = 1) -> str:
    if s is None or s.n == 0:
        return "n/a"
    return f"{s.median:.{digits}f} ({s.p5:.{digits}f}–{s.p95:.{digits}f})"


def _bare_match(row: Row, rows: Sequence[Row]) -> Row | None:
    """The bare-session row a service row compares with: same precision, the batch the service forms."""
    batch = min(row.clients or 1, SERVICE_MAX_BATCH)
    for wanted in (batch, 1):
        for r in rows:
            if r.path == "ONNX Runtime" and r.precision == row.precision and r.batch == wanted and r.images_per_s:
                return r
    return None


def _ratio(row: Row, rows: Sequence[Row]) -> str:
    """Service rows: throughput as a share of the bare session's (wall clock; and by CPU time per image)."""
    if row.path != "service" or row.images_per_s is None:
        return ""
    bare = _bare_match(row, rows)
    if bare is None or bare.images_per_s is None:
        return ""
    text = f"{row.images_per_s.median / bare.images_per_s.median:.0%}"
    if row.cpu_ms and bare.cpu_ms and np.isfinite(row.cpu_ms):
        text += f"; CPU {bare.cpu_ms / row.cpu_ms:.0%}"
    return f"{text} (b{bare.batch})"


def _bound(row: Row, gflops: float, per_cpu_s: float) -> str:
    """Share of the compute bound: by wall clock (matmul GFLOP/s) and by CPU time (matmul GFLOP per CPU-s)."""
    text = f"{(row.fraction_of_bound or 0):.0%}"
    if row.cpu_ms and np.isfinite(per_cpu_s) and np.isfinite(row.cpu_ms):
        text += f"; {gflops / (row.cpu_ms / 1000) / per_cpu_s:.0%}"
    return text


def _cpu(row: Row) -> str:
    if row.cpu_ms is None or not np.isfinite(row.cpu_ms):
        return ""
    if row.client_cpu_ms is not None and np.isfinite(row.client_cpu_ms):
        return f"{row.cpu_ms:.0f} + {row.client_cpu_ms:.0f}"
    return f"{row.cpu_ms:.0f}"


def _networks(settings: dict[str, Any]) -> str:
    """The heading's note on which networks were timed, when not the recommended ones (several sections
    of one page would otherwise share a title)."""
    notes = []
    if settings.get("config") == "plain":
        notes.append("the plain networks")
    if settings.get("width_mult"):
        notes.append("width " + " and ".join(f"{w:g}" for w in settings["width_mult"]))
    return ": " + ", ".join(notes) if notes else ""


def speed_table(report: dict[str, Any]) -> str:
    """The markdown section for docs/benchmarks.md."""
    m = report["machine"]
    providers = str(report.get("settings", {}).get("providers", "cpu"))
    gpu = m["matmul"].get("device", "cpu") != "cpu"
    lines = [
        ("## Speed on GPU" if gpu else "## Speed on CPU") + _networks(report.get("settings", {})),
        "",
        "`anoscope bench speed`: eager PyTorch, a bare ONNX Runtime session and the service over HTTP, side by "
        "side on one machine, against the FP32 compute bound; docs/performance.md explains the figures, what was "
        "optimised and what was not, and how to measure a GPU.",
        "",
        f"Measured {report['date']} on {m['hardware']}; execution providers {providers}. "
        f"FP32 matmul {m['matmul']['n']}³: torch ({m['matmul'].get('device', 'cpu')}) "
        f"{m['matmul']['torch']:.0f} GFLOP/s, numpy "
        f"{m['matmul']['numpy']:.0f} GFLOP/s; the compute bound below uses {m['bound_gflops']:.0f} GFLOP/s "
        f"(wall clock) and {m['matmul'].get('torch_per_cpu_s', float('nan')):.0f} GFLOP per CPU-second. "
        f"Load average (1/5/15 min) at the start {report['load_start']}, at the end {report['load_end']}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Weights: {report['weights']}. Service requests: one {report['request']} per request, "
        "regions on; the load generator runs on the same cores as the service. Images/s: median over every "
        "timed call (bare paths) or window (service) of every round, with p5–p95. Service latency: p50 / p95 / p99 "
        "over every request of every round. CPU ms/img: CPU time per image of the bench process (eager, bare "
        "session: all its threads, spin-waiting included) or of the server process + the load generator "
        "(service). `vs bare ORT`: service throughput over the bare session's at the batch the service forms "
        "(min(clients, 8)), by wall clock and by CPU time per image. `% of bound`: GFLOP/s achieved over the "
        "matmul rate, and GFLOP per CPU-second over the matmul's (the second does not depend on how much of "
        "the machine the neighbours took).",
        "",
        "| model | GFLOP/img | precision | path | batch / clients | heatmap | images/s | latency ms | "
        "CPU ms/img | % of bound (wall; CPU) | vs eager | vs bare ORT | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in report["models"]:
        rows = [
            Row(**{**r, "images_per_s": Spread(**r["images_per_s"]) if r["images_per_s"] else None})
            for r in model["rows"]
        ]
        eager = next((r for r in rows if r.path == "eager PyTorch"), None)
        per_cpu_s = float(m["matmul"].get("torch_per_cpu_s", float("nan")))
        for r in rows:
            where = f"b{r.batch}" if r.batch is not None else f"{r.clients} clients"
            if r.latency_ms.keys() >= {"p50", "p95", "p99"}:
                lat = f"{r.latency_ms['p50']:.0f} / {r.latency_ms['p95']:.0f} / {r.latency_ms['p99']:.0f}"
            else:
                lat = f"{r.latency_ms.get('median', float('nan')):.0f} per batch"
            vs_eager = ""
            if eager is not None and eager.images_per_s and r.images_per_s and r is not eager:
                vs_eager = f"{r.images_per_s.median / eager.images_per_s.median:.1f}x"
            load = f"{min(r.load):.1f}–{max(r.load):.1f}" if r.load else ""
            errors = f" ({r.errors} errors)" if r.errors else ""
            lines.append(
                f"| {model['model']} | {model['gflops_per_image']:.2f} | {r.precision} | {r.path}{errors} | {where} | "
                f"{r.heatmap or ''} | {_fmt_spread(r.images_per_s)} | {lat} | {_cpu(r)} | "
                f"{_bound(r, model['gflops_per_image'], per_cpu_s)} | {vs_eager} | {_ratio(r, rows)} | {load} |"
            )
    stage_lines = []
    for model in report["models"]:
        for hm, stages in model.get("stages_ms", {}).items():
            names = ("decode", "preprocess", "inference", "postprocess", "json")
            cells = " | ".join(f"{stages[k]['median']:.2f}" for k in names)
            stage_lines.append(f"| {model['model']} | {hm} | {cells} |")
    if stage_lines:
        lines += [
            "",
            "Where a request's time goes inside the service (in-process, one image, median ms; the request image "
            "above; post-processing = regions + heatmap + response models):",
            "",
            "| model | heatmap | decode | pre-process | inference | post-process | JSON |",
            "|---|---|---|---|---|---|---|",
            *stage_lines,
        ]
    notes = [f"{model['model']}: {n}" for model in report["models"] for n in model.get("notes", [])]
    if notes:
        lines += ["", *[f"* {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def _gpu_name() -> str:
    import torch

    return f"; GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""


def loadavg_str() -> str:
    try:
        return " / ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def run_speed(args: Any, command: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole benchmark; returns the report (also written to `args.out`/speed.json)."""
    import torch

    from models import ModelConfig, build_model
    from service.bundle import read_metadata

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = loadavg_str()
    log(f"machine: {hardware()}; load {load_start}; torch threads {torch.get_num_threads()}")
    mm = matmul_gflops(repeats=args.matmul_repeats, device=torch_device(args.providers.split(",")))
    bound = max(mm["torch"], mm["numpy"])
    log(f"fp32 matmul: torch {mm['torch']:.0f} GFLOP/s, numpy {mm['numpy']:.0f} GFLOP/s")
    models: list[ModelSpeed] = []
    weights = "random initialisation (speed does not depend on the weights)"
    if args.bundle:
        meta = read_metadata(args.bundle)
        model = build_model(ModelConfig.from_dict(meta.network)).eval()
        models.append(
            measure_model(model, {meta.precision: Path(args.bundle)}, args, bound_gflops=bound, log=log, workdir=out)
        )
        weights = f"the bundle {args.bundle} (eager PyTorch: the same architecture, random weights)"
    else:
        for family in args.family:
            for size in args.image_size:
                for width in args.width_mult or [None]:
                    config = model_config(family, size, width, args.config)
                    model, bundles = build_bundles(
                        config, args.precisions, out / "bundles", log=log, reuse=not args.fresh
                    )
                    speed = measure_model(model, bundles, args, bound_gflops=bound, log=log, workdir=out)
                    models.append(speed)
                    _write(out, args, command, mm, bound, load_start, weights, models)
    return _write(out, args, command, mm, bound, load_start, weights, models)


def _write(
    out: Path,
    args: Any,
    command: str,
    mm: dict[str, float],
    bound: float,
    load_start: str,
    weights: str,
    models: list[ModelSpeed],
) -> dict[str, Any]:
    fmt = args.request_format.upper()
    size = f"{args.request_size} px" if args.request_size else "model-size"
    report = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "machine": {
            "hardware": hardware() + _gpu_name(),
            "matmul": mm,
            "bound_gflops": bound,
            "python": platform.python_version(),
        },
        "load_start": load_start,
        "load_end": loadavg_str(),
        "weights": weights,
        "request": f"{size} {fmt}",
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "func"},
        "models": [asdict(m) for m in models],
    }
    (out / "speed.json").write_text(json.dumps(report, indent=2, default=str))
    return report
