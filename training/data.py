"""In-memory labeled image sets: loading (npz, image folder), conforming, replay mixing and balancing.

Every set is held as uint8 ``(n, c, h, w)`` with int64 labels and one tag dict per image (:class:`Tags`: one
int32 code per image into a table of the distinct dicts, since a fleet's images share a handful of conditions);
sets this small (edge-case snapshots, replay buffers, MNIST-sized bases) train fastest straight from memory.
Images become floats only on the training device (see :mod:`training.augment`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.errors import InvalidInput
from training.config import check_new_repeats

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SOURCE_KINDS = ("npz", "folder", "hub", "coco")
CHUNK_IMAGES = 4096  # images copied at a time when hashing or spilling a set to a mapped file


class Tags(Sequence[dict[str, str]]):
    """One tag dict per image, held as ``codes`` ((n,) int32) into ``table`` (the distinct dicts): a million
    images under a few conditions cost 4 MB, not the 392 MiB of a million dicts (bench_tags.py). Indexing gives
    a copy of the image's dict (changing it changes nothing here); :meth:`take`, :meth:`with_tag` and
    :meth:`concat` stay compact."""

    def __init__(self, codes: np.ndarray, table: Sequence[dict[str, str]]) -> None:
        self.codes = np.asarray(codes, dtype=np.int32)
        self.table = [dict(t) for t in table]
        assert self.codes.ndim == 1 and (not len(self.codes) or 0 <= self.codes.min() <= self.codes.max()
                                         < len(self.table)), (self.codes.shape, len(self.table))

    @classmethod
    def of(cls, tags: Iterable[dict[str, str]] | Tags) -> Tags:
        """``tags`` as Tags (a Tags is returned as it is)."""
        if isinstance(tags, Tags):
            return tags
        codes, table = _interned(tags)
        return cls(codes, table)

    @classmethod
    def empty(cls, n: int) -> Tags:
        """``n`` images without tags."""
        return cls(np.zeros(n, dtype=np.int32), [{}])

    @classmethod
    def parsed(cls, raw: np.ndarray) -> Tags:
        """Tags from an array of tag strings (:func:`parse_tags`), each distinct string parsed once."""
        raw = np.asarray(raw)
        distinct, codes = np.unique(raw if raw.dtype.kind == "U" else raw.astype(str), return_inverse=True)
        return cls(codes.reshape(-1), [parse_tags(s) for s in distinct.tolist()])

    @classmethod
    def concat(cls, parts: Sequence[Tags]) -> Tags:
        table: list[dict[str, str]] = []
        codes = []
        for part in parts:
            codes.append(part.codes + len(table))
            table.extend(part.table)
        joined = cls(np.concatenate(codes) if codes else np.zeros(0, np.int32), table or [{}])
        return joined.compacted()

    def compacted(self) -> Tags:
        """The same tags with each distinct dict once in the table."""
        remap, table = _interned(self.table)
        return Tags(remap[self.codes], table or [{}])

    def take(self, index: np.ndarray) -> Tags:
        return Tags(self.codes[np.asarray(index, dtype=np.int64)], self.table)

    def with_tag(self, key: str, value: str) -> Tags:
        """Every image also carries ``key=value``."""
        return Tags(self.codes, [{**t, key: value} for t in self.table]).compacted()

    def masks(self) -> dict[str, np.ndarray]:
        """One boolean mask per ``key=value`` found, sorted by it."""
        out: dict[str, np.ndarray] = {}
        for code, t in enumerate(self.table):
            hit = self.codes == code
            if hit.any():
                for k, v in t.items():
                    key = f"{k}={v}"
                    out[key] = out[key] | hit if key in out else hit
        return dict(sorted(out.items()))

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return Tags(self.codes[i], self.table)
        return dict(self.table[int(self.codes[i])])

    def __iter__(self) -> Iterator[dict[str, str]]:
        for code in self.codes.tolist():
            yield dict(self.table[code])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Tags, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Tags({len(self)} images, {len(self.table)} distinct)"


def _interned(dicts: Iterable[dict[str, str]]) -> tuple[np.ndarray, list[dict[str, str]]]:
    """``dicts`` -> (one int32 code each, the distinct dicts in order of first appearance)."""
    index: dict[tuple[tuple[str, str], ...], int] = {}
    codes = np.asarray([index.setdefault(tuple(sorted(t.items())), len(index)) for t in dicts], dtype=np.int32)
    return codes, [dict(k) for k in index]


@dataclass
class ImageSet:
    """Labeled images: ``images`` (n, c, h, w) uint8, ``labels`` (n,) int64, one tag dict per image (given as a
    list of dicts or as :class:`Tags`; held as Tags)."""

    images: np.ndarray
    labels: np.ndarray
    tags: Tags
    name: str = ""
    ids: list[str] | None = None

    def __post_init__(self) -> None:
        assert self.images.ndim == 4 and self.images.dtype == np.uint8, (self.images.shape, self.images.dtype)
        assert self.labels.shape == (len(self.images),), (self.labels.shape, self.images.shape)
        self.tags = Tags.of(self.tags)
        assert len(self.tags) == len(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, index: np.ndarray) -> ImageSet:
        index = np.asarray(index, dtype=np.int64)
        ids = [self.ids[i] for i in index] if self.ids is not None else None
        return ImageSet(self.images[index], self.labels[index], self.tags.take(index), self.name, ids)

    def with_tag(self, key: str, value: str) -> ImageSet:
        """A copy whose every image also carries ``key=value`` (e.g. ``source=base``)."""
        return ImageSet(self.images, self.labels, self.tags.with_tag(key, value), self.name, self.ids)

    def fingerprint(self) -> str:
        """sha256 over shapes, labels and pixels: tells whether a resumed run sees the same data. Read a chunk of
        images at a time, so a memory-mapped set is never loaded whole."""
        h = hashlib.sha256(repr((self.images.shape, len(self.labels))).encode())
        h.update(np.ascontiguousarray(self.labels).tobytes())
        for i in range(0, len(self.images), CHUNK_IMAGES):
            h.update(np.ascontiguousarray(self.images[i: i + CHUNK_IMAGES]).data)
        return h.hexdigest()

    @property
    def mapped(self) -> bool:
        """Whether the images are read from a memory-mapped file (``--stream``) rather than held in memory."""
        return isinstance(self.images, np.memmap) or isinstance(getattr(self.images, "base", None), np.memmap)


@dataclass
class Source:
    """A parsed ``--data``/``--base`` value: ``npz:PATH``, ``folder:PATH`` or ``hub:URL``."""

    kind: str
    location: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.location}"


@dataclass
class Splits:
    """What a source yields: a training set, a held-out test set (maybe empty) and class names if known."""

    train: ImageSet
    test: ImageSet | None
    class_names: list[str] | None = None
    meta: dict[str, object] = field(default_factory=dict)


def parse_source(text: str, *, what: str = "--data") -> Source:
    """Parse ``npz:PATH`` | ``folder:PATH`` | ``hub:URL`` | ``coco:PATH`` (detection); a bare path ending in .npz
    or a directory also works."""
    kind, sep, rest = text.partition(":")
    if sep and kind in SOURCE_KINDS and rest:
        return Source(kind, rest)
    if text.endswith(".npz"):
        return Source("npz", text)
    if Path(text).is_dir():
        return Source("folder", text)
    raise InvalidInput(f"{what} must be npz:PATH, folder:PATH, coco:PATH or hub:URL; received {text!r}")


def parse_tags(value: object) -> dict[str, str]:
    """``"night"`` -> ``{"condition": "night"}``; ``"condition=night;device=d1"`` -> a dict; ``""`` -> ``{}``."""
    text = str(value).strip()
    if not text:
        return {}
    if "=" not in text:
        return {"condition": text}
    out: dict[str, str] = {}
    for part in text.replace(",", ";").split(";"):
        if part.strip():
            k, _, v = part.partition("=")
            out[k.strip()] = v.strip()
    return out


def to_nchw_uint8(x: np.ndarray, *, what: str) -> np.ndarray:
    """Accept (n, h, w), (n, h, w, c) or (n, c, h, w) with c in {1, 3}; uint8, or floats in [0, 1] or [0, 255]."""
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        elif x.shape[1] not in (1, 3):
            raise InvalidInput(f"{what}: images must have 1 or 3 channels; received shape {x.shape}")
    else:
        raise InvalidInput(f"{what}: images must be (n, h, w), (n, h, w, c) or (n, c, h, w); received shape {x.shape}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.number):
        raise InvalidInput(f"{what}: images must be numeric; received dtype {x.dtype}")
    xf = x.astype(np.float32)
    if not np.all(np.isfinite(xf)):
        raise InvalidInput(f"{what}: images hold NaN or infinite values")
    lo, hi = float(xf.min(initial=0)), float(xf.max(initial=0))
    if lo < 0 or hi > 255:
        raise InvalidInput(f"{what}: pixel values must lie in [0, 1] or [0, 255]; received range [{lo}, {hi}]")
    if hi <= 1.0:
        xf = xf * 255.0
    return np.ascontiguousarray(np.clip(np.rint(xf), 0, 255).astype(np.uint8))


def check_labels(y: np.ndarray, n: int, *, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise InvalidInput(f"{what}: labels must have shape ({n},) to match the images; received {y.shape}")
    if n and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0):
        raise InvalidInput(f"{what}: labels must be integers >= 0; received dtype {y.dtype}, min {y.min()}")
    return y.astype(np.int64)


def load_npz(path: str | Path, *, name: str = "data", mmap: bool = False) -> Splits:
    """Load ``x_train, y_train[, x_test, y_test, tags_train, tags_test, class_names]`` from an .npz file.

    A regression set may instead hold just ``x, y[, tags]``; that becomes the training split. With ``mmap``,
    images stored uncompressed as uint8 (n, c, h, w) or (n, h, w) are mapped from the file, not read
    (:func:`map_npz_member`); others are read, and the log says so.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"npz file {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        if {"x_train", "y_train"} <= keys:
            pairs = {"train": ("x_train", "y_train", "tags_train"), "test": ("x_test", "y_test", "tags_test")}
        elif {"x", "y"} <= keys:
            pairs = {"train": ("x", "y", "tags")}
        elif {"x_test", "y_test"} <= keys:
            pairs = {"train": ("x_test", "y_test", "tags_test")}
        else:
            raise InvalidInput(
                f"{path}: expected arrays x_train, y_train (and optionally x_test, y_test, tags_train, tags_test, "
                f"class_names); received {sorted(keys)}"
            )
        sets: dict[str, ImageSet] = {}
        for split, (xk, yk, tk) in pairs.items():
            if xk not in keys:
                continue
            if yk not in keys:
                raise InvalidInput(f"{path}: {xk} is present but {yk} is missing")
            x = mapped_npz_images(path, xk) if mmap else None
            if x is None:
                if mmap:
                    log.info("%s:%s is compressed or not uint8 (n, c, h, w): read into memory", path, xk)
                x = to_nchw_uint8(z[xk], what=f"{path}:{xk}")
            y = check_labels(z[yk], len(x), what=f"{path}:{yk}")
            if tk in keys:
                raw = z[tk]
                if raw.shape != (len(x),):
                    raise InvalidInput(f"{path}:{tk} must have shape ({len(x)},); received {raw.shape}")
                tags = Tags.parsed(raw)
            else:
                tags = Tags.empty(len(x))
            sets[split] = ImageSet(x, y, tags, name=f"{name}:{split}")
        names = [str(s) for s in z["class_names"].tolist()] if "class_names" in keys else None
    return Splits(train=sets["train"], test=sets.get("test"), class_names=names)


def mapped_npz_images(path: Path, key: str) -> np.ndarray | None:
    """The images ``key`` of an npz mapped from the file as (n, c, h, w) uint8 (:func:`map_npz_member`), or None
    when they are compressed, not uint8, or not images of 1 or 3 channels."""
    x = map_npz_member(path, key)
    if x is None or x.dtype != np.uint8:
        return None
    if x.ndim == 3:
        return x[:, None]
    return x if x.ndim == 4 and x.shape[1] in (1, 3) else None


def load_folder(
    path: str | Path,
    *,
    channels: int | None = None,
    size: tuple[int, int] | None = None,
    class_names: Sequence[str] | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    name: str = "data",
) -> Splits:
    """Load ``ROOT/<class>/*.png`` (or ``ROOT/train/<class>`` and ``ROOT/test/<class>``).

    Classes already known (``class_names``) keep their index; new folder names are appended in sorted
    order. Without a test folder, ``test_fraction`` of each class is held out (by a hash of the file
    name, so the split is stable when images are added).
    """
    root = Path(path)
    if not root.is_dir():
        raise InvalidInput(f"image folder {root} does not exist")
    split_dirs = {"train": root / "train", "test": root / "test"}
    has_splits = split_dirs["train"].is_dir()
    names = list(class_names or [])
    files: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    for split, base in (split_dirs.items() if has_splits else [("train", root)]):
        if not base.is_dir():
            continue
        for d in sorted(p for p in base.iterdir() if p.is_dir()):
            files[split] += [(f, d.name) for f in sorted(d.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files["train"]:
        raise InvalidInput(f"image folder {root} holds no images in class subfolders (expected ROOT/<class>/*.png)")
    for _, cls in files["train"] + files["test"]:
        if cls not in names:
            names.append(cls)
    if not has_splits:
        held = [_hash_fraction(f.name) < test_fraction for f, _ in files["train"]]
        files = {"train": [p for p, h in zip(files["train"], held, strict=True) if not h],
                 "test": [p for p, h in zip(files["train"], held, strict=True) if h]}
    first = _open_image(files["train"][0][0])
    c = channels or (1 if first.mode in ("L", "1", "I", "I;16", "LA") else 3)
    hw = size or (first.height, first.width)
    out = {}
    for split, items in files.items():
        if items:
            x = np.stack([decode_image(p.read_bytes(), channels=c, size=hw, what=str(p)) for p, _ in items])
            y = np.array([names.index(cls) for _, cls in items], dtype=np.int64)
            out[split] = ImageSet(x, y, Tags.empty(len(items)), name=f"{name}:{split}", ids=[p.name for p, _ in items])
    return Splits(train=out["train"], test=out.get("test"), class_names=names)


def decode_image(data: bytes, *, channels: int, size: tuple[int, int], what: str) -> np.ndarray:
    """PNG/JPEG bytes -> (c, h, w) uint8, converted to ``channels`` and resized to ``size`` (h, w)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidInput(f"{what}: not a readable image ({exc})") from exc
    img = img.convert("L" if channels == 1 else "RGB")
    if (img.height, img.width) != tuple(size):
        img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def conform(images: ImageSet, shape: tuple[int, int, int], *, spill: Path | None = None) -> ImageSet:
    """Convert channels (1 <-> 3) and resize to ``shape`` = (c, h, w) when the set differs.

    With ``spill`` (a folder), the set is converted :data:`CHUNK_IMAGES` at a time into a memory-mapped file
    there (see :func:`spill_images`), so a mapped set larger than memory is conformed without loading it."""
    if images.shape == shape:
        return images
    x = images.images
    if spill is not None:
        chunks = (_conform_pixels(x[i: i + CHUNK_IMAGES], shape) for i in range(0, len(x), CHUNK_IMAGES))
        out = _spill(chunks, len(x), shape, spill)
    else:
        out = np.ascontiguousarray(_conform_pixels(x, shape))
    log.info("conformed %s from %s to %s%s", images.name, images.shape, shape, " (spilled to disk)" if spill else "")
    return ImageSet(out, images.labels, images.tags, images.name, images.ids)


def _conform_pixels(x: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    if x.shape[1] != c:
        if c == 3:
            x = np.repeat(x, 3, axis=1)
        else:
            x = np.rint(np.tensordot(np.array([0.299, 0.587, 0.114]), x.astype(np.float32), axes=([0], [1])))
            x = x.astype(np.uint8)[:, None]
    if x.shape[2:] != (h, w):
        from PIL import Image

        mode = "L" if c == 1 else "RGB"
        resized = []
        for img in x:
            pil = Image.fromarray(img[0] if c == 1 else img.transpose(1, 2, 0), mode)
            arr = np.asarray(pil.resize((w, h), Image.Resampling.BILINEAR), dtype=np.uint8)
            resized.append(arr[None] if c == 1 else arr.transpose(2, 0, 1))
        x = np.stack(resized) if resized else np.zeros((0, c, h, w), np.uint8)
    return x


def concat(sets: Sequence[ImageSet], *, name: str, spill: Path | None = None) -> ImageSet:
    """Concatenate sets of the same image shape; ids are kept only if every set has them.

    With ``spill`` (a folder), the images are copied a chunk at a time into a memory-mapped file there instead
    of into memory (see :func:`spill_images`)."""
    sets = [s for s in sets if s is not None and len(s)]
    if not sets:
        raise InvalidInput(f"{name}: no images to concatenate")
    shapes = {s.shape for s in sets}
    if len(shapes) > 1:
        raise InvalidInput(f"{name}: image shapes differ {sorted(shapes)}; conform them first")
    ids = sum((s.ids for s in sets), []) if all(s.ids is not None for s in sets) else None  # type: ignore[arg-type]
    if spill is not None:
        images = sets[0].images if len(sets) == 1 and sets[0].mapped else spill_images([s.images for s in sets], spill)
    else:
        images = np.concatenate([s.images for s in sets])
    return ImageSet(images, np.concatenate([s.labels for s in sets]), Tags.concat([s.tags for s in sets]), name, ids)


def spill_images(parts: Sequence[np.ndarray], folder: Path) -> np.ndarray:
    """``parts`` one after another in a new ``.npy`` file in ``folder``, copied :data:`CHUNK_IMAGES` at a time,
    then mapped read-only. The file is unlinked as soon as it is mapped: the mapping keeps it readable, and the
    disk space comes back when the process ends, however it ends."""
    chunks = (part[i: i + CHUNK_IMAGES] for part in parts for i in range(0, len(part), CHUNK_IMAGES))
    return _spill(chunks, sum(len(p) for p in parts), parts[0].shape[1:], folder)


def _spill(chunks: Iterable[np.ndarray], n: int, item_shape: tuple[int, ...], folder: Path) -> np.ndarray:
    """:func:`spill_images` of ``n`` images of ``item_shape`` that arrive in ``chunks``."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".spill-", suffix=".npy")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *item_shape))
        at = 0
        for piece in chunks:
            out[at: at + len(piece)] = piece
            at += len(piece)
        if at != n:
            raise RuntimeError(f"spilled {at} images where {n} were expected")
        out.flush()
        del out
        return np.load(tmp, mmap_mode="r")
    finally:
        os.unlink(tmp)


def map_npz_member(path: Path, key: str) -> np.ndarray | None:
    """The array ``key`` of the npz file ``path`` mapped read-only from the file, when it is stored uncompressed
    (``np.savez``) in C order; None otherwise (compressed members, ``np.savez_compressed``, must be inflated)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{key}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
        start = info.header_offset + 30 + name_len + extra_len
        fh.seek(start)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if fortran or dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def holdout_by_id(images: ImageSet, fraction: float) -> tuple[ImageSet, ImageSet | None]:
    """Split off ``fraction`` of the set by a hash of each id, so an item stays on its side across snapshots."""
    held = held_out(images.ids or [str(i) for i in range(len(images))], fraction)
    if held is None:
        return images, None
    return images.subset(np.flatnonzero(~held)), images.subset(np.flatnonzero(held))


def held_out(keys: Sequence[str], fraction: float) -> np.ndarray | None:
    """Which of ``keys`` (n,) fall in the held-out ``fraction`` by their hash; None when that leaves a side empty."""
    if fraction <= 0 or len(keys) < 2:
        return None
    held = np.array([_hash_fraction(k) < fraction for k in keys])
    if held.all() or not held.any():
        return None
    return held


class EpochSampler:
    """The training indices for each epoch over ``pool = concat(new, base)``: replay mixing and balancing.

    Every new image is seen ``new_repeats`` times per epoch (1 unless a base is replayed beside it), plus
    ``round(n_new * new_repeats * ratio / (1 - ratio))`` base images (a fresh draw each epoch, so over the run
    the whole base is replayed); ``ratio`` is the share of base images in an epoch. Repeating the new images
    weighs the few edge cases of a turn against a base many times their size without dropping any of the base
    (which a lower ratio would). With ``balance="sampler"`` the epoch is instead drawn with replacement,
    each class equally likely. Indices depend only on (seed, epoch), so a resumed run sees the same
    batches as an uninterrupted one.
    """

    def __init__(
        self, labels: np.ndarray, *, n_new: int, replay_ratio: float, balance: str = "none", seed: int = 0,
        new_repeats: int = 1,
    ) -> None:
        if not 0.0 <= replay_ratio <= 1.0:
            raise InvalidInput(f"--replay-ratio must be in [0, 1]; received {replay_ratio}")
        check_new_repeats(new_repeats)
        self.labels = labels
        self.n_new = n_new
        self.n_base = len(labels) - n_new
        if new_repeats > 1 and self.n_base == 0:
            raise InvalidInput(f"--new-repeats {new_repeats} weighs the new data against a replayed base, and this run "
                               "has none: give --base (without one, raise --epochs instead)")
        self.new_repeats = new_repeats
        self.balance = balance
        self.seed = seed
        new_slots = n_new * new_repeats
        if self.n_new == 0 or self.n_base == 0 or replay_ratio >= 1.0:
            self.base_per_epoch = self.n_base
        else:
            self.base_per_epoch = min(self.n_base, int(round(new_slots * replay_ratio / (1.0 - replay_ratio))))
        self.epoch_size = new_slots + self.base_per_epoch

    def indices(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        base = self.n_new + rng.permutation(self.n_base)[: self.base_per_epoch]
        pool = np.concatenate([np.tile(np.arange(self.n_new), self.new_repeats), base])
        if self.balance == "sampler":
            y = self.labels[pool]
            counts = np.bincount(y)
            p = 1.0 / counts[y]
            return rng.choice(pool, size=self.epoch_size, replace=True, p=p / p.sum())
        return rng.permutation(pool)

    def expected_class_counts(self, num_classes: int) -> np.ndarray:
        """How many images of each class one epoch holds on average (for loss weights)."""
        new = np.bincount(self.labels[: self.n_new], minlength=num_classes).astype(np.float64) * self.new_repeats
        base = np.bincount(self.labels[self.n_new:], minlength=num_classes).astype(np.float64)
        if self.n_base:
            base *= self.base_per_epoch / self.n_base
        return new + base


def class_weights(counts: np.ndarray, *, clip: float = 10.0) -> np.ndarray:
    """Inverse-frequency loss weights with mean 1 over the classes present, clipped to [1/clip, clip]."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    w = np.ones_like(counts)
    w[present] = counts[present].sum() / (present.sum() * counts[present])
    return np.clip(w, 1.0 / clip, clip).astype(np.float32)


def channel_stats(images: np.ndarray, *, max_images: int = 10000, seed: int = 0) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of ``images`` (n, c, h, w) uint8 on the [0, 1] scale, over at most ``max_images``
    of them. Summed exactly in integers a chunk at a time, so memory holds one chunk (a mapped set stays mapped)."""
    rows = np.arange(len(images))
    if len(images) > max_images:
        rows = np.sort(np.random.default_rng(seed).choice(len(images), max_images, replace=False))
    c = images.shape[1]
    total, squares = np.zeros(c, np.int64), np.zeros(c, np.int64)
    for i in range(0, len(rows), 256):
        x = np.asarray(images[rows[i: i + 256]], dtype=np.int64)
        total += x.sum(axis=(0, 2, 3))
        squares += (x * x).sum(axis=(0, 2, 3))
    n = max(len(rows) * images.shape[2] * images.shape[3], 1)
    mean = total / n
    std = np.maximum(np.sqrt(np.maximum(squares / n - mean * mean, 0.0)) / 255.0, 1e-3)
    return [round(float(v), 6) for v in mean / 255.0], [round(float(v), 6) for v in std]


def slice_masks(tags: Sequence[dict[str, str]]) -> dict[str, np.ndarray]:
    """One boolean mask per ``key=value`` found in ``tags``, sorted by it."""
    if isinstance(tags, Tags):
        return tags.masks()
    masks: dict[str, np.ndarray] = {}
    for i, t in enumerate(tags):
        for k, v in t.items():
            masks.setdefault(f"{k}={v}", np.zeros(len(tags), dtype=bool))[i] = True
    return dict(sorted(masks.items()))


def _hash_fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64


def _open_image(path: Path) -> Any:
    from PIL import Image

    try:
        img = Image.open(path)
        img.load()
    except OSError as exc:
        raise InvalidInput(f"{path}: not a readable image ({exc})") from exc
    return img
