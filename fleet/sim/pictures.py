"""Pictures for the detection demo's report: test scenes with the true boxes and each model's boxes, side by side,
so a reader sees what the flywheel's labels changed (not only the mAP)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fleet.sim.detect_world import SceneWorld

SCALE = 3  # pixels of the picture per pixel of the scene
COLOURS = {"truth": (40, 200, 70), "model": (235, 60, 50)}


def detection_examples(world: SceneWorld, out_dir: Path, *, before: Path | None, after: Path | None,
                       random: Path | None, per_condition: int = 1) -> list[tuple[Path, str]]:
    """One PNG in ``out_dir``: a row per test scene (``per_condition`` of each condition), a column each for the
    true boxes, the base model's, the flywheel's last model's and the random arm's last model's (each at its
    operating threshold, with class and score). Returns ``[(path, caption)]``."""
    from PIL import Image, ImageDraw

    models = [(name, path) for name, path in (("base model", before), ("flywheel, last turn", after),
                                              ("random, last turn", random)) if path is not None and path.exists()]
    test = world.test_set
    rows = [int(i) for c in dict.fromkeys(test.conditions.tolist())
            for i in np.flatnonzero(test.conditions == c)[:per_condition]]
    found = {name: _boxes(path, test.images[rows]) for name, path in models}
    side = world.size * SCALE
    head, pad = 22, 6
    columns = ["truth", *[name for name, _ in models]]
    sheet = Image.new("RGB", (len(columns) * (side + pad) + 90, len(rows) * (side + pad) + head), "white")
    draw = ImageDraw.Draw(sheet)
    for j, name in enumerate(columns):
        draw.text((90 + j * (side + pad) + 4, 4), name, fill=(0, 0, 0))
    for r, i in enumerate(rows):
        y0 = head + r * (side + pad)
        draw.text((4, y0 + side // 2), str(test.conditions[i]), fill=(0, 0, 0))
        tb, tl = test.truth(i)
        cells = [("truth", tb, tl, None), *[(n, *found[n][r]) for n, _ in models]]
        for j, (name, boxes, labels, scores) in enumerate(cells):
            x0 = 90 + j * (side + pad)
            tile = Image.fromarray(test.images[i]).resize((side, side), Image.Resampling.NEAREST).convert("RGB")
            d = ImageDraw.Draw(tile)
            colour = COLOURS["truth" if name == "truth" else "model"]
            for k, b in enumerate(boxes):
                x1, y1, x2, y2 = (float(v) * side for v in b)
                d.rectangle([x1, y1, x2, y2], outline=colour, width=2)
                text = world.class_names[int(labels[k])] + ("" if scores is None else f" {float(scores[k]):.2f}")
                d.text((x1 + 2, max(0.0, y1 - 11)), text, fill=colour)
            sheet.paste(tile, (x0, y0))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "examples.png"
    sheet.save(path)
    caption = ("Test scenes, one per condition: the true boxes (green), then the boxes each model reports at its "
               "operating threshold (red, with class and score): the base model, the flywheel's and the random "
               "arm's models after the last turn.")
    return [(path, caption)]


def _boxes(onnx: Path, images: np.ndarray) -> list[tuple[Any, Any, Any]]:
    """Per image: the boxes (m, 4), classes and scores the exported detector reports (device runtime)."""
    from fleet.inference.detector import above
    from fleet.inference.runtime import ModelRuntime
    from fleet.protocol import SignedManifest

    manifest = SignedManifest.from_json((onnx.parent / "manifest.json").read_text()).manifest
    assert manifest.detector is not None
    d = above(ModelRuntime(onnx, manifest, threads=1).run(list(images)).detections,
              manifest.detector.operating_threshold)
    return [(d.boxes[d.rows(f)], d.labels[d.rows(f)], d.scores[d.rows(f)]) for f in range(d.n)]
