"""Datasets for the demo: scikit-learn's bundled digits by default, or an npz, or an image folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


@dataclass
class Dataset:
    """Train and test images as uint8 ``(n, h, w)`` or ``(n, h, w, 3)``, labels as int64 ``(n,)``."""

    name: str
    x_train: npt.NDArray[np.uint8]
    y_train: npt.NDArray[np.int64]
    x_test: npt.NDArray[np.uint8]
    y_test: npt.NDArray[np.int64]
    class_names: list[str]

    @property
    def channels(self) -> int:
        return 1 if self.x_train.ndim == 3 else int(self.x_train.shape[-1])


def load_dataset(source: str | None, *, seed: int = 0, test_fraction: float = 0.25) -> Dataset:
    """``None`` or ``"digits"``: scikit-learn's digits; a ``.npz`` path; or a folder of class subfolders."""
    if source in (None, "digits"):
        return _digits(seed=seed, test_fraction=test_fraction)
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        return _npz(path)
    if path.is_dir():
        return _folder(path, seed=seed, test_fraction=test_fraction)
    raise ValueError(
        f"--dataset {source!r} is neither 'digits', an existing .npz file (x_train, y_train, x_test, y_test) "
        "nor an existing folder with one subfolder of images per class"
    )


def _digits(*, seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    y = d.target.astype(np.int64)
    return _split("digits", x, y, [str(i) for i in range(10)], seed=seed, test_fraction=test_fraction)


def _npz(path: Path) -> Dataset:
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks array(s) {missing}; expected x_train, y_train, x_test, y_test")
        arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        names = [str(n) for n in z["class_names"]] if "class_names" in z.files else None
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 4 and x.shape[-1] == 1:
            x = arrays[f"x_{split}"] = x[..., 0]
        if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] != 3):
            raise ValueError(f"{path}: x_{split} must be (n, h, w) or (n, h, w, 3); received shape {x.shape}")
        if y.shape != (len(x),):
            raise ValueError(f"{path}: y_{split} must have shape ({len(x)},); received {y.shape}")
        if x.dtype != np.uint8:
            if x.max() <= 1.0:
                x = x * 255.0
            arrays[f"x_{split}"] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    k = int(max(arrays["y_train"].max(), arrays["y_test"].max())) + 1
    return Dataset(
        name=path.stem,
        x_train=arrays["x_train"], y_train=arrays["y_train"].astype(np.int64),
        x_test=arrays["x_test"], y_test=arrays["y_test"].astype(np.int64),
        class_names=names or [str(i) for i in range(k)],
    )


def _folder(path: Path, *, seed: int, test_fraction: float) -> Dataset:
    from PIL import Image

    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{path} must hold at least 2 class subfolders; found {classes}")
    images: list[npt.NDArray[np.uint8]] = []
    labels: list[int] = []
    shape: tuple[int, ...] | None = None
    for label, name in enumerate(classes):
        for f in sorted((path / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(f) as im:
                arr = np.asarray(im.convert("L" if im.mode in ("L", "1", "P", "I;16") else "RGB"))
            if shape is None:
                shape = arr.shape
            if arr.shape != shape:
                with Image.open(f) as im:
                    mode = "L" if len(shape) == 2 else "RGB"
                    arr = np.asarray(im.convert(mode).resize((shape[1], shape[0])))
            images.append(arr)
            labels.append(label)
    if not images:
        raise ValueError(f"{path}: no images found (looked for {sorted(IMAGE_SUFFIXES)})")
    return _split(path.name, np.stack(images), np.asarray(labels, np.int64), classes,
                  seed=seed, test_fraction=test_fraction)


def _split(name: str, x: npt.NDArray[np.uint8], y: npt.NDArray[np.int64], classes: list[str],
           *, seed: int, test_fraction: float) -> Dataset:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = max(len(classes), int(round(len(x) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return Dataset(name, x[train], y[train], x[test], y[test], classes)


def sample_test(data: Dataset, n: int, *, seed: int = 0) -> Dataset:
    """``data`` with about ``n`` test images (never more than ``max(n, classes)``), sampled per class in proportion
    to the class's share, each class keeping at least one, so that every test condition stays cheap to evaluate
    on a large set."""
    if n < 1:
        raise ValueError(f"the test size must be a positive number of images; received {n}")
    if len(data.y_test) <= n:
        return data
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(data.y_test, return_counts=True)
    quota = np.maximum(1, np.floor(counts * n / len(data.y_test)).astype(np.int64))
    keep = np.concatenate([rng.choice(np.flatnonzero(data.y_test == c), size=min(q, m), replace=False)
                           for c, q, m in zip(classes, quota, counts, strict=True)])
    keep.sort()
    return Dataset(data.name, data.x_train, data.y_train, data.x_test[keep], data.y_test[keep], data.class_names)
