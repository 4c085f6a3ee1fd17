"""The synthetic dataset generator: masks match what was injected, layout, determinism, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anoscope import cli
from service.datasets import labelled_samples, list_images, load_mask
from training.synthetic import (
    DEFECTS,
    MIN_DELTA,
    TEXTURE_CHOICES,
    TEXTURES,
    add_defect,
    generate_dataset,
    make_defect_image,
    make_normal_image,
)

ROOT = Path(__file__).resolve().parents[1]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("texture", TEXTURE_CHOICES)
def test_normal_image_shape_dtype_and_variety(texture: str, channels: int) -> None:
    a = make_normal_image(_rng(1), texture, 64, channels)
    b = make_normal_image(_rng(2), texture, 64, channels)
    expected = (64, 64) if channels == 1 else (64, 64, 3)
    assert a.shape == expected and a.dtype == np.uint8
    assert a.std() > 5, "a texture, not a flat image"
    assert not np.array_equal(a, b), "each image is a fresh instance of the texture"
    assert np.array_equal(a, make_normal_image(_rng(1), texture, 64, channels))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("texture", TEXTURES)
@pytest.mark.parametrize("defect", DEFECTS)
def test_mask_is_exactly_the_changed_pixels(defect: str, texture: str, channels: int) -> None:
    for seed in range(3):
        clean = make_normal_image(_rng(seed), texture, 64, channels)
        bad, mask = add_defect(_rng(100 + seed), clean, defect)
        assert bad.shape == clean.shape and bad.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == bool
        assert 3 <= mask.sum() < 0.2 * mask.size, "visible but not most of the image"
        diff = np.abs(bad.astype(int) - clean.astype(int))
        diff = diff if diff.ndim == 2 else diff.max(axis=-1)
        assert (diff[mask] >= MIN_DELTA).all(), "every mask pixel was changed visibly"
        assert (diff[~mask] == 0).all(), "no pixel outside the mask was touched"


def test_defect_image_is_built_on_the_normal_image_from_the_same_stream() -> None:
    clean = make_normal_image(_rng(7), "grid", 64, 3)
    bad, mask = make_defect_image(_rng(7), "grid", 64, 3, "spot")
    assert mask.any()
    assert np.array_equal(bad[~mask], clean[~mask])
    assert not np.array_equal(bad[mask], clean[mask])


def test_bad_arguments_are_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="brushed"):
        make_normal_image(_rng(), "marble", 64, 3)
    with pytest.raises(ValueError, match="scratch"):
        add_defect(_rng(), np.zeros((32, 32), np.uint8), "dent")
    with pytest.raises(ValueError, match="channels"):
        make_normal_image(_rng(), "fabric", 64, 2)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_masks_and_modes(tmp_path: Path) -> None:
    root = generate_dataset(
        tmp_path / "d", texture="brushed", n_train=3, n_test_good=2, n_test_defect=2, image_size=48, channels=1
    )
    assert len(list_images(root / "train" / "good")) == 3
    samples = labelled_samples(root)
    assert sorted({s.defect_type for s in samples}) == sorted(["good", *DEFECTS])
    assert sum(s.label == 0 for s in samples) == 2 and sum(s.label == 1 for s in samples) == 2 * len(DEFECTS)
    for s in samples:
        with Image.open(s.path) as im:
            assert im.mode == "L" and im.size == (48, 48)
        if s.label:
            assert s.mask_path is not None and s.mask_path.name == f"{s.path.stem}_mask.png"
            assert load_mask(s.mask_path, (48, 48)).any()
            assert set(np.unique(np.asarray(Image.open(s.mask_path)))) <= {0, 255}
        else:
            assert s.mask_path is None


def test_rgb_dataset_and_subset_of_defects(tmp_path: Path) -> None:
    root = generate_dataset(
        tmp_path, texture="random", n_train=1, n_test_good=1, n_test_defect=1, image_size=32, defects=("crack",)
    )
    assert sorted(p.name for p in (root / "test").iterdir()) == ["crack", "good"]
    with Image.open(root / "test" / "crack" / "000.png") as im:
        assert im.mode == "RGB"


def test_deterministic_from_the_seed_and_stable_when_growing(tmp_path: Path) -> None:
    kw = {"texture": "fabric", "n_test_good": 1, "n_test_defect": 1, "image_size": 32}
    a = _tree(generate_dataset(tmp_path / "a", n_train=2, seed=3, **kw))
    b = _tree(generate_dataset(tmp_path / "b", n_train=2, seed=3, **kw))
    c = _tree(generate_dataset(tmp_path / "c", n_train=2, seed=4, **kw))
    grown = _tree(generate_dataset(tmp_path / "g", n_train=4, seed=3, **kw))
    assert a == b
    assert a["train/good/000.png"] != c["train/good/000.png"]
    assert all(grown[k] == v for k, v in a.items() if k != "synthetic.json"), "more images keep the first ones"


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    kw = {"n_train": 1, "n_test_good": 1, "n_test_defect": 1, "image_size": 32}
    generate_dataset(tmp_path, n_test_defect=2, **{k: v for k, v in kw.items() if k != "n_test_defect"})
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_dataset(tmp_path, **kw)
    generate_dataset(tmp_path, overwrite=True, **kw)
    assert [p.name for p in (tmp_path / "test" / "spot").iterdir()] == ["000.png"], "stale images removed"


def test_cli_generate_dry_run_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    args = ["generate", "--out", str(out), "--n-train", "2", "--n-test-good", "1", "--n-test-defect", "1"]
    args += ["--image-size", "32", "--channels", "1", "--texture", "grid", "--defects", "scratch,missing"]
    assert cli.main([*args, "--dry-run"]) == 0
    assert not out.exists()
    assert "would write 5 32x32 grayscale 'grid' images" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert sorted(p.name for p in (out / "ground_truth").iterdir()) == ["missing", "scratch"]
    assert cli.main(args) == 2, "a second run into the same folder is refused"
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite", "--defects", "dent"]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    assert exc.value.code == 0
    assert "ground_truth" in capsys.readouterr().out


def test_generator_does_not_import_torch() -> None:
    code = "import sys, training.synthetic; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
