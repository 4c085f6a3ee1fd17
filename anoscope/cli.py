"""The `anoscope` console command.

Each verb lives in its own module, imported only when that verb runs, so `anoscope serve` and
`anoscope calibrate` never pull in PyTorch, and `anoscope --help` answers instantly.
A command module exposes `build_parser(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType

from anoscope import __version__


@dataclass(frozen=True)
class Verb:
    module: str
    summary: str
    extra: str  # the optional-dependency group the verb needs


VERBS: dict[str, Verb] = {
    "generate": Verb("training.synthetic", "write a synthetic textured-surface dataset (MVTec layout)", "service"),
    "train": Verb("training.train", "train a GAN detector on a folder of normal images", "train"),
    "export": Verb("training.export", "export a checkpoint to an ONNX bundle, checking parity", "train"),
    "evaluate": Verb("training.evaluate", "measure a bundle on labelled data: AUROC, F1, plots", "service"),
    "predict": Verb("service.predict_files", "score image files offline, as the service would answer", "service"),
    "calibrate": Verb("service.calibrate", "set a bundle's thresholds from line images", "service"),
    "serve": Verb("service.serve", "run the inspection REST service", "service"),
    "bench": Verb("training.bench", "accuracy and speed benchmarks on real data", "train"),
}


def _load(name: str) -> ModuleType:
    verb = VERBS[name]
    try:
        return importlib.import_module(verb.module)
    except ModuleNotFoundError as exc:
        missing = exc.name or "a dependency"
        msg = (
            f"`anoscope {name}` needs {missing!r}, which is not installed here. "
            f"Install the '{verb.extra}' extra: pip install 'anoscope[{verb.extra}]'"
        )
        raise SystemExit(msg) from exc


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {verb.summary}" for name, verb in VERBS.items())
    parser = argparse.ArgumentParser(
        prog="anoscope",
        description="Train GAN anomaly detectors on good parts, export them, and serve them.",
        epilog=f"commands:\n{lines}\n\nRun `anoscope <command> --help` for a command's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"anoscope {__version__}")
    parser.add_argument("command", choices=sorted(VERBS), metavar="command", help="one of the commands below")
    return parser


#: Options whose value is itself a command line (`bench accuracy --train-args "--position-statistics"`).
COMMAND_LINE_OPTIONS = ("--train-args",)


def _attach_command_lines(argv: list[str]) -> list[str]:
    """argparse takes a value that starts with a dash and holds no space for an option of its own, so
    `--train-args --flag` would fail; such a value is attached as `--train-args=--flag`."""
    out: list[str] = []
    words = iter(argv)
    for word in words:
        value = next(words, None) if word in COMMAND_LINE_OPTIONS else None
        out.append(word if value is None else f"{word}={value}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in VERBS:
        top.error(f"unknown command {name!r}; choose one of: {', '.join(VERBS)}")
    module = _load(name)
    parser = argparse.ArgumentParser(
        prog=f"anoscope {name}",
        description=(module.__doc__ or VERBS[name].summary).strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    module.build_parser(parser)
    args = parser.parse_args(_attach_command_lines(rest))
    return int(module.main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
