"""Small real data for the trainer's tests: sklearn's bundled digits and a slice of Fashion-MNIST."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.signing import generate_keypair, write_keypair
from tests.support.data import digits_arrays
from training.config import TrainArgs

FASHION = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "fashion-mnist" / "fashion_mnist.npz"


@pytest.fixture(scope="session")
def digits_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits with a ``night`` condition (a third of the images, darkened) as slice tags."""
    x, y = digits_arrays()
    tags = np.array(["night" if i % 3 == 0 else "day" for i in range(len(x))])
    x = x.copy()
    x[tags == "night"] //= 3
    path = tmp_path_factory.mktemp("digits") / "digits.npz"
    n = 1400
    np.savez(path, x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:], tags_train=tags[:n],
             tags_test=tags[n:], class_names=np.array([str(i) for i in range(10)]))
    return path


@pytest.fixture(scope="session")
def fashion_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FASHION.is_file():
        pytest.skip(f"{FASHION} is not present")
    with np.load(FASHION) as z:
        path = tmp_path_factory.mktemp("fashion") / "fashion_small.npz"
        np.savez(path, x_train=z["x_train"][:2000], y_train=z["y_train"][:2000],
                 x_test=z["x_test"][:500], y_test=z["y_test"][:500])
    return path


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(private key file, base64 public key)."""
    pair = generate_keypair()
    priv, _ = write_keypair(pair, tmp_path_factory.mktemp("keys"))
    return priv, pair.public_b64


@pytest.fixture
def make_args(digits_npz: Path, tmp_path: Path) -> Callable[..., TrainArgs]:
    """Fast defaults: digits, a narrow smallcnn, 2 epochs, one thread (robust on a busy machine)."""

    def make(**kw: Any) -> TrainArgs:
        base: dict[str, Any] = dict(data=f"npz:{digits_npz}", out=tmp_path / "run", epochs=2, width=8,
                                    threads=1, cache_dir=tmp_path / "cache")
        base.update(kw)
        return TrainArgs(**base)

    return make


@pytest.fixture(scope="session")
def trained(digits_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with a digits model trained well enough to be a parent (checkpoint.pt, report.json)."""
    from training.train import main

    out = tmp_path_factory.mktemp("parent") / "run"
    main(TrainArgs(data=f"npz:{digits_npz}", out=out, epochs=6, width=8, threads=1, version="parent-1"))
    return out


# --- detection: synthetic scenes of sklearn's digits (fleet.sim.scenes), small enough for CPU tests


def write_scenes_npz(path: Path, *, n_train: int, n_test: int, size: int, seed: int = 1,
                     digits: tuple[int, ...] = (0, 1, 2, 3)) -> Path:
    """Train scenes from training digits, test scenes from held-out digits (``digits`` are the classes); a third of
    the test scenes darkened and tagged ``night`` (the rest ``day``), so the test set has slices."""
    from fleet.sim.scenes import digit_scenes

    train = digit_scenes(n_train, seed=seed, size=size, digits=digits)
    test = digit_scenes(n_test, seed=seed + 1000, size=size, split="test", digits=digits)
    tags = np.array(["night" if i % 3 == 0 else "day" for i in range(n_test)])
    test.images[tags == "night"] //= 3
    np.savez(path, **train.to_npz_arrays("_train"), **test.to_npz_arrays("_test"), tags_test=tags,
             class_names=np.array(train.class_names))
    return path


@pytest.fixture(scope="session")
def scenes_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64x64 scenes for the mechanics (resume, replay, export): 48 train, 24 test."""
    return write_scenes_npz(tmp_path_factory.mktemp("scenes") / "scenes64.npz", n_train=48, n_test=24, size=64)


@pytest.fixture
def make_det_args(scenes_npz: Path, tmp_path: Path) -> Callable[..., TrainArgs]:
    """Fast detector defaults: 64x64 scenes, fcos_tiny at width 8, 1 epoch, one thread."""

    def make(**kw: Any) -> TrainArgs:
        base: dict[str, Any] = dict(data=f"npz:{scenes_npz}", out=tmp_path / "det", task="detect", epochs=1,
                                    width=8, threads=1, batch_size=8, cache_dir=tmp_path / "cache")
        base.update(kw)
        return TrainArgs(**base)

    return make


@pytest.fixture(scope="session")
def trained_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with fcos_tiny trained on 96x96 scenes of four digits well enough to find them (the learning
    test's run and the export tests' model): scenes96.npz beside it, checkpoint.pt, report.json, model.onnx."""
    from training.train import main

    root = tmp_path_factory.mktemp("detector")
    data = write_scenes_npz(root / "scenes96.npz", n_train=200, n_test=48, size=96)
    main(TrainArgs(data=f"npz:{data}", out=root / "run", task="detect", epochs=4, batch_size=8, augment="none",
                   threads=1, version="det-parent", min_slice_size=8))
    return root / "run"
