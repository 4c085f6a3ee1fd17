"""`anoscope bench latent-search`: AnoGAN's f-AnoGAN encoder (one pass) against the iterative latent search.

AnoGAN (Schlegl et al. 2017) scores an image by searching the latent space for the z whose G(z) is
closest to it, 500 Adam steps per image; f-AnoGAN replaces the search by a trained encoder, z = E(x),
one forward pass. anoscope ships the encoder (it is what the bundle exports) and keeps
`models.anogan.latent_search` as the reference scorer. This bench measures both on the same trained
checkpoint and the same labelled images, through the same evaluation code `anoscope evaluate` uses
(`training.evaluate.score_samples` and `compute_report`), so only the scorer differs:

* `encoder (ONNX Runtime)`: the exported bundle, as the service runs it;
* `encoder (PyTorch)`: the scoring head on the checkpoint, the same computation in eager PyTorch;
* `search N (init)`: `latent_search` with N steps, started from E(x) ("encoder") or from z ~ N(0, 1)
  ("random", the original AnoGAN), in eager PyTorch.

The combined score z-scores each raw score with the bundle's statistics, which were fitted on the
*encoder's* scores of the validation normals; the residual and discrimination AUROCs do not depend on
them and are the fair comparison of the scorers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.bundle import BundleMetadata
    from service.engine import RawOutput

# torch, ONNX Runtime and the evaluation code are imported where they are used, so that building the
# `anoscope bench` parser stays cheap.

DEFAULT_STEPS = (500,)
DEFAULT_INITS = ("encoder", "random")


class TorchScorer:
    """An `service.engine.Engine` that scores with a trained AnoGAN in PyTorch: the head, or a latent search."""

    def __init__(
        self,
        model: Any,
        metadata: BundleMetadata,
        *,
        steps: int = 0,
        init: str = "encoder",
        lr: float = 0.01,
        feature_weight: float = 0.1,
        seed: int = 0,
    ) -> None:
        import torch

        from models.anogan import AnoGAN

        if not isinstance(model, AnoGAN):
            msg = f"the latent search needs an AnoGAN checkpoint (got a {type(model).__name__})"
            raise TypeError(msg)
        self.model = model.eval()
        self._metadata = metadata
        self.steps, self.init, self.lr, self.feature_weight = steps, init, lr, feature_weight
        self.generator = torch.Generator().manual_seed(seed)  # random inits, reproducible per run

    @property
    def metadata(self) -> BundleMetadata:
        return self._metadata

    @property
    def provider(self) -> str:
        import torch

        return f"PyTorch ({torch.get_num_threads()} threads)"

    @property
    def label(self) -> str:
        return "encoder (PyTorch)" if self.steps == 0 else f"search {self.steps} ({self.init} init)"

    def run(self, batch: np.ndarray) -> RawOutput:
        import torch

        from models.anogan import latent_search
        from service.engine import RawOutput

        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.steps == 0:
            with torch.no_grad():
                r, d, amap = self.model.scoring_head()(x)
        else:
            r, d, amap = latent_search(
                self.model,
                x,
                steps=self.steps,
                lr=self.lr,
                feature_weight=self.feature_weight,
                init=self.init,  # type: ignore[arg-type]
                generator=self.generator,
            )
        return RawOutput(r.numpy(), d.numpy(), amap[:, 0].numpy())


@dataclass
class ScorerRow:
    scorer: str
    steps: int
    n_images: int
    seconds: float
    image_auroc: float | None
    image_auroc_residual: float | None
    image_auroc_discrimination: float | None
    pixel_auroc: float | None

    @property
    def ms_per_image(self) -> float:
        return 1000 * self.seconds / max(self.n_images, 1)


def _row(scorer: str, steps: int, engine: Any, samples: list[Any], batch_size: int, max_pixel_side: int) -> ScorerRow:
    from training.evaluate import compute_report, score_samples

    scored = score_samples(engine, samples, batch_size=batch_size, max_pixel_side=max_pixel_side)
    report = compute_report(scored, engine.metadata, max_pixel_side=max_pixel_side)
    image, pixel = report["image"], report["pixel"]
    return ScorerRow(
        scorer=scorer,
        steps=steps,
        n_images=len(samples),
        seconds=scored.seconds,
        image_auroc=image["auroc"],
        image_auroc_residual=image["auroc_residual"],
        image_auroc_discrimination=image["auroc_discrimination"],
        pixel_auroc=None if pixel is None else pixel["auroc"],
    )


def run_latent_bench(
    bundle: Path,
    data: Path,
    *,
    checkpoint: Path | None = None,
    steps: tuple[int, ...] = DEFAULT_STEPS,
    inits: tuple[str, ...] = DEFAULT_INITS,
    limit: int | None = None,
    batch_size: int = 16,
    max_pixel_side: int = 256,
    seed: int = 0,
    log: Any = print,
) -> list[ScorerRow]:
    """One row per scorer (see the module docstring), all on the same samples of `data`."""

    from service.bundle import read_metadata
    from service.engine import OnnxEngine
    from training.checkpoint import load_trained
    from training.evaluate import load_samples

    meta = read_metadata(bundle)
    if meta.family != "anogan":
        msg = f"{bundle} is a {meta.family} bundle; the latent search exists only for AnoGAN"
        raise ValueError(msg)
    source = checkpoint or meta.provenance.get("checkpoint")
    if not source or not Path(source).exists():
        msg = f"the checkpoint {source!r} that {bundle} was exported from is not here; pass --checkpoint"
        raise FileNotFoundError(msg)
    trained = load_trained(source)
    samples = load_samples(data)
    if limit is not None and limit < len(samples):
        # Every k-th sample keeps the normal/defect mix and every defect type (samples are sorted by folder).
        idx = np.linspace(0, len(samples) - 1, limit).round().astype(int)
        samples = [samples[i] for i in sorted(set(idx.tolist()))]
    onnx = OnnxEngine(bundle, providers=("cpu",))
    rows = [_row("encoder (ONNX Runtime)", 0, onnx, samples, batch_size, max_pixel_side)]
    log(f"encoder (ONNX Runtime): {rows[-1].ms_per_image:.1f} ms/image")
    scorers = [TorchScorer(trained.model, meta)]
    scorers += [TorchScorer(trained.model, meta, steps=n, init=i, seed=seed) for n in steps if n > 0 for i in inits]
    for scorer in scorers:
        rows.append(_row(scorer.label, scorer.steps, scorer, samples, batch_size, max_pixel_side))
        log(f"{scorer.label}: {rows[-1].ms_per_image:.1f} ms/image")
    return rows


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def latent_table(rows: list[ScorerRow], *, bundle: Path, data: Path, command: str) -> str:
    import torch

    from training.speed import hardware

    first = rows[0]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d', time.gmtime())} on {hardware()}, {torch.get_num_threads()} "
        f"PyTorch thread(s); bundle `{bundle}`, {first.n_images} images of `{data}`.",
        "",
        f"Command: `{command}`",
        "",
        "| scorer | image AUROC | (residual / discr.) | pixel AUROC | ms / image | vs encoder (PyTorch) |",
        "|---|---|---|---|---|---|",
    ]
    base = next((r.ms_per_image for r in rows if r.scorer == "encoder (PyTorch)"), None)
    for r in rows:
        ratio = f"{r.ms_per_image / base:.0f}x" if base and r.steps else ""
        lines.append(
            f"| {r.scorer} | {_fmt(r.image_auroc)} | {_fmt(r.image_auroc_residual)} / "
            f"{_fmt(r.image_auroc_discrimination)} | {_fmt(r.pixel_auroc)} | {r.ms_per_image:.1f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def build_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="an exported AnoGAN bundle")
    parser.add_argument("--data", type=Path, required=True, help="labelled images (an MVTec category folder)")
    parser.add_argument(
        "--checkpoint", type=Path, help="the run or checkpoint the bundle came from (default: its provenance)"
    )
    parser.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS), help="search steps to measure")
    parser.add_argument(
        "--inits", nargs="+", default=list(DEFAULT_INITS), choices=list(DEFAULT_INITS), help="where each search starts"
    )
    parser.add_argument("--limit", type=int, help="score only this many images, spread evenly over the folders")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0 = default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write latent.json here")
    parser.add_argument("--write-docs", metavar="MD", help="write the table into this markdown file")
    parser.add_argument("--section", default="latent-search-cpu", help="marker name of the section in --write-docs")


def main(args: argparse.Namespace) -> int:
    import torch

    from service.errors import AnoscopeError
    from training.bench import bench_command, write_section

    problems = [
        "--steps must be >= 0" if any(n < 0 for n in args.steps) else "",
        "--limit must be >= 2 (a normal and a defective image)" if args.limit is not None and args.limit < 2 else "",
        "--batch-size must be >= 1" if args.batch_size < 1 else "",
    ]
    if any(problems):
        print(f"error: {'; '.join(p for p in problems if p)}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = run_latent_bench(
            args.bundle,
            args.data,
            checkpoint=args.checkpoint,
            steps=tuple(args.steps),
            inits=tuple(args.inits),
            limit=args.limit,
            batch_size=args.batch_size,
            seed=args.seed,
            log=lambda line: print(f"[latent] {line}", flush=True),
        )
    except (AnoscopeError, ValueError, FileNotFoundError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = latent_table(rows, bundle=args.bundle, data=args.data, command=bench_command("latent-search"))
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "latent.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    if args.write_docs:
        write_section(Path(args.write_docs), args.section, table)
    return 0
