"""The service never imports torch, torchvision, `models` or `training`.

A fresh interpreter starts the app (lifespan, model load, warm-up), serves a prediction with a heatmap
and regions, loads the `anoscope serve` command module, scores a file with `anoscope predict`, and
reports what it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = ("torch", "torchvision", "models", "training")

SCRIPT = r"""
import io, json, sys
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient

from service.app.main import create_app
from service.settings import Settings
import service.serve  # the `anoscope serve` command module
import service.localserver  # the harness the soak script and the speed bench start the service with

img = np.full((48, 64, 3), 60, np.uint8)
img[10:20, 30:40] = 250
buf = io.BytesIO()
Image.fromarray(img).save(buf, format="PNG")
app = create_app(Settings(_env_file=None, model_dir=sys.argv[1], providers=("cpu",)))
with TestClient(app) as client:
    r = client.post("/v1/predict?heatmap=overlay&regions=true", files=[("files", ("x.png", buf.getvalue()))])
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["regions"], r.text
    assert client.get("/metrics").status_code == 200
from anoscope import cli  # `anoscope predict`: the same request path, offline
path = sys.argv[1] + "/part.png"
open(path, "wb").write(buf.getvalue())
assert cli.main(["predict", "--bundle", sys.argv[1] + "/toy", path, "--providers", "cpu"]) == 0
roots = sorted({name.split(".")[0] for name in sys.modules})
print(json.dumps(roots))
"""


@pytest.mark.slow
def test_serving_a_prediction_imports_no_torch(tmp_path):
    from tests.toy_bundle import make_toy_bundle

    make_toy_bundle(tmp_path / "models" / "toy")
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ANOSCOPE_")}
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "models")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    loaded = set(json.loads(r.stdout.strip().splitlines()[-1]))
    assert {"service", "fastapi", "onnxruntime"} <= loaded  # it really ran
    assert loaded.isdisjoint(FORBIDDEN), sorted(loaded & set(FORBIDDEN))
