"""A COCO-format folder the tests write themselves: scenes of scikit-learn's digits saved as PNG files, their true
boxes as COCO annotations (pixels, x, y, width, height), categories with ids of their own (not 0..k-1)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from fleet.sim.scenes import digit_scenes

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_scene_coco(root: Path, n: int, *, seed: int = 0, size: int = 96, rgb: bool = False) -> Path:
    """``n`` digit scenes of side ``size`` as ``root/images/*.png`` and ``root/annotations.json``; category ids
    are 11..20 (digit d is id 11 + d, named NAMES[d]); an RGB folder tints each scene. Returns ``root``."""
    scenes = digit_scenes(n, seed=seed, size=size, max_objects=3, split="train")
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    tint = np.array([1.0, 0.8, 0.6])
    for i in range(n):
        name = f"scene-{i:05d}.png"
        pixels = scenes.images[i]
        if rgb:
            pixels = np.clip(pixels[..., None] * tint, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / name)
        images.append({"id": 100 + i, "file_name": name, "width": size, "height": size})
        for b, c in zip(scenes.boxes[i], scenes.labels[i], strict=True):
            x1, y1, x2, y2 = (float(v) * size for v in b)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": 11 + int(c),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": 11 + d, "name": NAMES[d]} for d in range(10)]
    (root / "annotations.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def scene_truth(n: int, *, seed: int = 0, size: int = 96):  # type: ignore[no-untyped-def]
    """The scenes :func:`write_scene_coco` wrote, to compare with what a reader makes of them."""
    return digit_scenes(n, seed=seed, size=size, max_objects=3, split="train")
