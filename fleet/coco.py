"""A COCO-format folder's annotations, read once for every part that takes one: the trainer
(``flywheel train --task detect --data coco:PATH``), ``flywheel evaluate`` and the detection demo
(``flywheel demo --task detect --dataset PATH``).

``ROOT/annotations.json`` (or a ``.json`` path) is read with pycocotools' COCO reader; the images it names are
found relative to the json's folder or its ``images/`` subfolder. Categories become classes in the order of
their ids (``class_names`` given: matched by name, and every category must be one of them); crowd annotations are
skipped; an image's optional ``tags`` (object) or ``condition`` (string) become its slice tags. Boxes come out
normalised x1, y1, x2, y2, as the contract's :class:`fleet.protocol.Box`. Decoding the images is the caller's:
each part sizes them its own way.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fleet.errors import InvalidInput

COCO_ANNOTATIONS = "annotations.json"
COCO_EDGE_SLACK = 1.0  # pixels a COCO box may overhang the image (rounding in exporters); clipped, not refused


@dataclass(frozen=True)
class CocoImage:
    """One image of the folder: where its file is, its size in pixels, its boxes ``(m, 4)`` normalised float32
    and their classes ``(m,)`` int64, its slice tags, and its ``file_name`` as the json gives it."""

    file: Path
    width: int
    height: int
    boxes: npt.NDArray[np.float32]
    classes: npt.NDArray[np.int64]
    tags: dict[str, str]
    name: str


@dataclass(frozen=True)
class CocoFolder:
    annotations: Path
    class_names: list[str]
    images: list[CocoImage]


def annotation_file(path: str | Path) -> Path:
    """The annotations of a COCO folder (or the ``.json`` given), or InvalidInput saying what is missing."""
    path = Path(path)
    ann_file = path / COCO_ANNOTATIONS if path.is_dir() else path
    if not ann_file.is_file():
        raise InvalidInput(f"coco:{path}: expected {COCO_ANNOTATIONS} in the folder (or a .json file); it is missing")
    return ann_file


def read_coco(path: str | Path, *, class_names: Sequence[str] | None = None) -> CocoFolder:
    """Read a COCO folder's annotations (see the module); every bad box, unknown category or missing image file
    is refused with what was received."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise InvalidInput("reading a COCO folder needs pycocotools: pip install 'edge-flywheel[train]'") from None

    ann_file = annotation_file(path)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO(str(ann_file))
    except (ValueError, KeyError, TypeError, AssertionError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{ann_file}: not a COCO annotation file ({type(exc).__name__}: {exc})") from exc
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    if not cats:
        raise InvalidInput(f"{ann_file}: lists no categories")
    names = list(class_names or [])
    for cat in cats:
        if cat["name"] not in names:
            if class_names:
                raise InvalidInput(f"{ann_file}: category {cat['name']!r} (id {cat['id']}) is not one of the model's "
                                   f"classes {names}")
            names.append(str(cat["name"]))
    index_of = {c["id"]: names.index(c["name"]) for c in cats}
    roots = [ann_file.parent, ann_file.parent / "images"]
    img_ids = sorted(coco.getImgIds())
    if not img_ids:
        raise InvalidInput(f"{ann_file}: lists no images")
    images = []
    for img_id in img_ids:
        info = coco.loadImgs(img_id)[0]
        file = next((r / info["file_name"] for r in roots if (r / info["file_name"]).is_file()), None)
        if file is None:
            raise InvalidInput(f"{ann_file}: image {img_id} file {info['file_name']!r} is missing (looked in "
                               f"{[str(r) for r in roots]})")
        width, height = info.get("width"), info.get("height")
        if not (width and height):
            from PIL import Image

            with Image.open(file) as im:
                width, height = width or im.width, height or im.height
        boxes, classes = [], []
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
            if ann.get("category_id") not in index_of:
                raise InvalidInput(f"{ann_file}: annotation {ann.get('id')} has unknown category_id "
                                   f"{ann.get('category_id')!r}; the categories are {sorted(index_of)}")
            if ann.get("iscrowd", 0):
                continue
            boxes.append(_coco_box(ann, float(width), float(height), what=f"{ann_file}: annotation {ann.get('id')} "
                                                                           f"on image {info['file_name']!r}"))
            classes.append(index_of[ann["category_id"]])
        images.append(CocoImage(file, int(width), int(height), np.asarray(boxes, np.float32).reshape(-1, 4),
                                np.asarray(classes, np.int64), _coco_tags(info), str(info["file_name"])))
    return CocoFolder(ann_file, names, images)


def _coco_box(ann: dict[str, Any], width: float, height: float, *, what: str) -> tuple[float, float, float, float]:
    bbox = ann.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int | float) for v in bbox)):
        raise InvalidInput(f"{what}: bbox must be [x, y, width, height] in pixels; received {bbox!r}")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0 or x < -COCO_EDGE_SLACK or y < -COCO_EDGE_SLACK or x + w > width + COCO_EDGE_SLACK \
            or y + h > height + COCO_EDGE_SLACK:
        raise InvalidInput(f"{what}: bbox {bbox} lies outside the {width:g}x{height:g} image or is empty; expected "
                           "[x, y, width, height] with width, height > 0 inside the image")
    x1, y1 = max(0.0, x) / width, max(0.0, y) / height
    x2, y2 = min(width, x + w) / width, min(height, y + h) / height
    return x1, y1, x2, y2


def _coco_tags(info: dict[str, Any]) -> dict[str, str]:
    tags = info.get("tags")
    out = {str(k): str(v) for k, v in tags.items()} if isinstance(tags, dict) else {}
    if isinstance(info.get("condition"), str):
        out["condition"] = info["condition"]
    return out
