"""Images with boxes in memory: loading (npz, COCO-format folder, hub snapshot), checking, conforming, splitting.

A :class:`BoxSet` is an :class:`training.data.ImageSet` (uint8 ``(n, c, h, w)`` images, tags, ids; its
``labels`` hold each image's box count) plus, per image, its boxes ``(m, 4)`` as normalised float32 x1, y1, x2,
y2 and their classes ``(m,)``. Boxes are normalised, so resizing an image (:func:`conform_boxes`) leaves them
valid. Every box is checked once, where it enters (:func:`check_boxes`): inside [0, 1], x1 < x2, y1 < y2, a
known class; a bad one is refused with the image and the values received.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleet.coco import read_coco
from fleet.errors import InvalidInput
from training.data import (
    ImageSet,
    Tags,
    concat,
    conform,
    decode_image,
    held_out,
    mapped_npz_images,
    to_nchw_uint8,
)

log = logging.getLogger(__name__)


@dataclass
class BoxSet:
    """Images (an ImageSet) with ``boxes[i]`` (m_i, 4) normalised xyxy float32 and ``classes[i]`` (m_i,) int64."""

    images: ImageSet
    boxes: list[np.ndarray]
    classes: list[np.ndarray]

    def __post_init__(self) -> None:
        assert len(self.boxes) == len(self.classes) == len(self.images)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.images.shape

    @property
    def tags(self) -> Tags:
        return self.images.tags

    @property
    def n_boxes(self) -> int:
        return int(sum(len(b) for b in self.boxes))

    def subset(self, index: np.ndarray) -> BoxSet:
        index = np.asarray(index, dtype=np.int64)
        return BoxSet(self.images.subset(index), [self.boxes[i] for i in index], [self.classes[i] for i in index])

    def with_tag(self, key: str, value: str) -> BoxSet:
        return BoxSet(self.images.with_tag(key, value), self.boxes, self.classes)

    def class_counts(self, num_classes: int) -> list[int]:
        if not self.n_boxes:
            return [0] * num_classes
        return [int(c) for c in np.bincount(np.concatenate(self.classes), minlength=num_classes)]

    def fingerprint(self) -> str:
        """sha256 over the pixels and every box and class: tells whether a resumed run sees the same data."""
        h = hashlib.sha256(self.images.fingerprint().encode())
        for b, c in zip(self.boxes, self.classes, strict=True):
            h.update(np.ascontiguousarray(b, np.float32).tobytes())
            h.update(np.ascontiguousarray(c, np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()


@dataclass
class BoxSplits:
    """What a source yields: a training set, a held-out test set (maybe none), class names if known."""

    train: BoxSet
    test: BoxSet | None
    class_names: list[str] | None = None
    meta: dict[str, object] = field(default_factory=dict)


def make_boxset(images: np.ndarray, boxes: Sequence[np.ndarray], classes: Sequence[np.ndarray],
                tags: Sequence[dict[str, str]] | None = None, *, name: str = "data",
                ids: list[str] | None = None, num_classes: int | None = None) -> BoxSet:
    """Check every image's boxes (:func:`check_boxes`) and build a BoxSet; ``images`` (n, c, h, w) uint8."""
    checked = [check_boxes(b, c, num_classes=num_classes, what=f"{name} image {ids[i] if ids else i}")
               for i, (b, c) in enumerate(zip(boxes, classes, strict=True))]
    counts = np.array([len(b) for b, _ in checked], dtype=np.int64)
    image_set = ImageSet(images, counts, Tags.of(tags) if tags is not None else Tags.empty(len(images)), name, ids)
    return BoxSet(image_set, [b for b, _ in checked], [c for _, c in checked])


def check_boxes(boxes: Any, classes: Any, *, num_classes: int | None, what: str) -> tuple[np.ndarray, np.ndarray]:
    """boxes (m, 4) normalised x1, y1, x2, y2 and classes (m,) -> float32 and int64 arrays, or InvalidInput naming
    the first bad box and its values."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4))
    c = np.asarray(classes).reshape(-1) if np.size(classes) else np.zeros(0, np.int64)
    if len(b) != len(c):
        raise InvalidInput(f"{what}: {len(b)} boxes but {len(c)} classes")
    if len(c) and (not np.issubdtype(c.dtype, np.integer)):
        raise InvalidInput(f"{what}: box classes must be integers; received dtype {c.dtype}")
    bad = ~np.isfinite(b).all(axis=1) | (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > 1) | (b[:, 3] > 1) \
        | (b[:, 0] >= b[:, 2]) | (b[:, 1] >= b[:, 3])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InvalidInput(f"{what}: box {i} is {b[i].round(6).tolist()}; expected normalised x1, y1, x2, y2 with "
                           f"0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
    if len(c) and (c.min() < 0 or (num_classes is not None and c.max() >= num_classes)):
        i = int(np.flatnonzero((c < 0) | (c >= (num_classes or np.iinfo(np.int64).max)))[0])
        raise InvalidInput(f"{what}: box {i} has class {int(c[i])}; expected a class in [0, {num_classes})")
    return b.astype(np.float32), c.astype(np.int64)


def load_box_npz(path: str | Path, *, name: str = "data", mmap: bool = False) -> BoxSplits:
    """Load an npz of scenes: ``x_train`` images, ``boxes_train`` (total, 4) normalised, ``box_labels_train``
    (total,), ``box_image_train`` (total,) the image each box belongs to, optional ``tags_train``, the same with
    ``_test``, and ``class_names`` (the layout :meth:`fleet.sim.scenes.Scenes.to_npz_arrays` writes).
    Without the ``_train`` suffix (``x``, ``boxes``, ...), everything is the training split. With ``mmap``,
    images stored uncompressed as uint8 are mapped from the file (:func:`training.data.mapped_npz_images`)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"npz file {path} does not exist")
    with np.load(path, allow_pickle=False) as z:
        keys = set(z.files)
        names = [str(s) for s in z["class_names"].tolist()] if "class_names" in keys else None
        suffixes = {"train": "_train", "test": "_test"} if "x_train" in keys else {"train": ""}
        sets: dict[str, BoxSet] = {}
        for split, sfx in suffixes.items():
            needed = [f"x{sfx}", f"boxes{sfx}", f"box_labels{sfx}", f"box_image{sfx}"]
            if split == "test" and f"x{sfx}" not in keys:
                continue
            missing = [k for k in needed if k not in keys]
            if missing:
                raise InvalidInput(f"{path}: a detection npz needs {needed} (and optionally tags{sfx}, class_names); "
                                   f"missing {missing}; received {sorted(keys)}")
            x = mapped_npz_images(path, f"x{sfx}") if mmap else None
            if x is None:
                x = to_nchw_uint8(z[f"x{sfx}"], what=f"{path}:x{sfx}")
            boxes, labels, owner = z[f"boxes{sfx}"], z[f"box_labels{sfx}"], z[f"box_image{sfx}"]
            if boxes.ndim != 2 or boxes.shape[1] != 4 or labels.shape != (len(boxes),) or owner.shape != labels.shape:
                raise InvalidInput(f"{path}: boxes{sfx} must be (m, 4) with box_labels{sfx} and box_image{sfx} (m,); "
                                   f"received {boxes.shape}, {labels.shape}, {owner.shape}")
            if len(owner) and (owner.min() < 0 or owner.max() >= len(x)):
                raise InvalidInput(f"{path}: box_image{sfx} must index the {len(x)} images; received range "
                                   f"[{owner.min()}, {owner.max()}]")
            per = [np.flatnonzero(owner == i) for i in range(len(x))]
            tags = Tags.empty(len(x))
            if f"tags{sfx}" in keys:
                raw = z[f"tags{sfx}"]
                if raw.shape != (len(x),):
                    raise InvalidInput(f"{path}:tags{sfx} must have shape ({len(x)},); received {raw.shape}")
                tags = Tags.parsed(raw)
            sets[split] = make_boxset(x, [boxes[p] for p in per], [labels[p] for p in per], tags,
                                      name=f"{name}:{split}", ids=[f"{path.stem}{sfx}:{i}" for i in range(len(x))],
                                      num_classes=len(names) if names else None)
    return BoxSplits(train=sets["train"], test=sets.get("test"), class_names=names)


def load_coco(path: str | Path, *, channels: int | None, size: tuple[int, int] | None, name: str = "data",
              class_names: Sequence[str] | None = None) -> BoxSplits:
    """A COCO-format folder (:func:`fleet.coco.read_coco`: ``ROOT/annotations.json`` or a ``.json`` path, and the
    images it names), decoded to ``channels`` (None: the first image's) at ``size`` (None: each image's own, which
    must then agree). Everything is the training split (the run holds out a test share by image file name)."""
    folder = read_coco(path, class_names=class_names)
    images, c = [], channels
    for im in folder.images:
        raw = im.file.read_bytes()
        if c is None:
            from PIL import Image

            with Image.open(io.BytesIO(raw)) as pil:
                c = 1 if pil.mode in ("L", "1", "I", "I;16", "LA") else 3
        images.append(decode_image(raw, channels=c, size=size or (im.height, im.width), what=str(im.file)))
    if len({im.shape for im in images}) > 1:
        raise InvalidInput(f"{folder.annotations}: images differ in size {sorted({im.shape for im in images})}; give "
                           "--image-size to resize them to one")
    data = make_boxset(np.stack(images), [im.boxes for im in folder.images], [im.classes for im in folder.images],
                       [im.tags for im in folder.images], name=f"{name}:train",
                       ids=[im.name for im in folder.images], num_classes=len(folder.class_names))
    return BoxSplits(train=data, test=None, class_names=folder.class_names)


def snapshot_to_boxset(snap: Any, *, channels: int, size: tuple[int, int], entries: list[Any] | None = None,
                       images: np.ndarray | None = None) -> BoxSet:
    """A hub snapshot of ``detect`` labels (:class:`training.snapshot.Snapshot`) decoded to a BoxSet, tagged
    with each case's tags and ``source=snapshot``: all its entries, or ``entries`` with their ``images`` already
    decoded (a mapped file, ``--stream``)."""
    if snap.task != "detect":
        raise InvalidInput(f"snapshot {snap.snapshot_id} holds {snap.task!r} labels; a detector needs 'detect' "
                           "labels (boxes)")
    entries = snap.entries if entries is None else entries
    if images is None:
        images = np.stack([
            decode_image(snap.blob_paths[e.image_sha256].read_bytes(), channels=channels, size=size,
                         what=f"case {e.case_id} (blob {e.image_sha256})")
            for e in entries
        ]) if entries else np.zeros((0, channels, *size), np.uint8)
    boxes = [[(b.x1, b.y1, b.x2, b.y2) for b in e.label.boxes] for e in entries]
    classes = [[b.label for b in e.label.boxes] for e in entries]
    tags = [{**e.case.tags, "source": "snapshot"} for e in entries]
    return make_boxset(images, boxes, classes, tags, name=f"snapshot:{snap.snapshot_id}",
                       ids=[e.case_id for e in entries], num_classes=len(snap.class_names))


def conform_boxes(data: BoxSet, shape: tuple[int, int, int], *, spill: Path | None = None) -> BoxSet:
    """Resize / convert the images to ``shape`` (c, h, w); normalised boxes stay as they are. ``spill``: see
    :func:`training.data.conform`."""
    return BoxSet(conform(data.images, shape, spill=spill), data.boxes, data.classes)


def concat_boxes(sets: Sequence[BoxSet | None], *, name: str, spill: Path | None = None) -> BoxSet:
    """The sets one after another (images spilled to a mapped file in ``spill``, as :func:`training.data.concat`)."""
    present = [s for s in sets if s is not None and len(s)]
    return BoxSet(concat([s.images for s in present], name=name, spill=spill), [b for s in present for b in s.boxes],
                  [c for s in present for c in s.classes])


def holdout_boxes(data: BoxSet, fraction: float) -> tuple[BoxSet, BoxSet | None]:
    """Split off ``fraction`` of the images by a hash of each id (stable as a snapshot grows)."""
    held = held_out(data.images.ids or [str(i) for i in range(len(data))], fraction)
    if held is None:
        return data, None
    return data.subset(np.flatnonzero(~held)), data.subset(np.flatnonzero(held))
