"""Small real data for the trainer's tests (sklearn's bundled digits and a slice of Fashion-MNIST), and the real hub
in-process (tests/support/inproc.py) holding labeled digits (or boxes of digit scenes, from a registered detector)
for snapshots, and taking what the trainer publishes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.protocol import Box, Detection
from fleet.signing import KeyPair, generate_keypair, load_private_key, write_keypair
from tests.support.cases import make_detect_case
from tests.support.data import digits_arrays, png_bytes
from tests.support.detectors import make_detector_files
from tests.support.inproc import InProcHub, inproc_hub
from training.config import TrainArgs
from training.hub_client import HubClient

DEVICE, MODEL, DETECTOR = "dev-1", "m0", "det-0"

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
def signing_pair() -> KeyPair:
    """The fleet's key pair: the trainer signs with it, the hub trusts it."""
    return generate_keypair()


@pytest.fixture(scope="session")
def signing_key(signing_pair: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(private key file, base64 public key)."""
    priv, _ = write_keypair(signing_pair, tmp_path_factory.mktemp("keys"))
    return priv, signing_pair.public_b64


def _digits_fleet(hub: InProcHub) -> None:
    hub.enroll(DEVICE)
    hub.publish(MODEL, num_classes=10, class_names=[str(i) for i in range(10)])


@pytest.fixture
def hub(tmp_path: Path, signing_pair: KeyPair) -> Iterator[InProcHub]:
    """The real hub trusting the fleet key, with ``dev-1`` enrolled and model m0 (digits: 8x8, 10 classes) active."""
    with inproc_hub(tmp_path, signing_pair, seed=_digits_fleet, seed_key="training") as h:
        yield h


def add_case(hub: InProcHub, case_id: str, label: int, png: bytes, tags: dict[str, str] | None = None) -> str:
    """A case from ``dev-1`` with this image, labeled ``label`` (accepted by the hub); its image's sha256."""
    hub.send_case(DEVICE, model_version=MODEL, probs=[0.1] * 10, image=png, case_id=case_id, tags=tags or {})
    receipt = hub.label(case_id, label)
    assert receipt.case_state == "labeled", receipt
    return hub.cases()[case_id].image_sha256


def add_detect_cases(hub: InProcHub, n: int, *,
                     class_names: tuple[str, ...] = ("car", "person")) -> dict[str, Detection]:
    """Register detector det-0 (``class_names``) and send ``n`` digit scenes (32x32) from ``dev-1``, tagged
    ``condition=fog``, as its cases (it found the true boxes, each at score 0.5), each labeled with its true boxes
    (accepted by the hub); each box's class is its digit's parity (0 or 1). Case id -> its boxes, in id order."""
    from fleet.sim.scenes import digit_scenes

    files = make_detector_files(hub.data_dir.parent / "models", DETECTOR, class_names=list(class_names),
                                class_channels=[i % 3 for i in range(len(class_names))],
                                private_key=load_private_key(hub.keypair.private_pem))
    hub.register(files)
    s = digit_scenes(n, seed=5, size=32)
    truth = {}
    for i in range(n):
        png = png_bytes(s.images[i])
        boxes = [Box(*map(float, b), label=int(c % 2)) for b, c in zip(s.boxes[i], s.labels[i], strict=True)]
        case = make_detect_case(case_id=f"c{i:02d}", device_id=DEVICE, model_version=DETECTOR, image=png,
                                boxes=[Box(b.x1, b.y1, b.x2, b.y2, b.label, score=0.5) for b in boxes],
                                captured_at=1.0, tags={"condition": "fog"})
        r = hub.post_case(case, png)
        assert r.status_code == 201, r.text
        receipt = hub.label(case.case_id, Detection(boxes))
        assert receipt.case_state == "labeled", receipt
        truth[case.case_id] = Detection(boxes)
    return truth


def trainer(hub: InProcHub, url: str = "http://hub", token: str | None = None, **kw: Any) -> HubClient:
    """The trainer's client of the hub (``token``: another one than a trainer's), through its fault transport."""
    kw.setdefault("sleep", lambda _: None)
    return HubClient(url, hub.token("trainer") if token is None else token, transport=hub.faults, **kw)


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
    main(TrainArgs(data=f"npz:{data}", out=root / "run", task="detect", epochs=8, batch_size=8, augment="none",
                   threads=1, version="det-parent", min_slice_size=8))
    return root / "run"
