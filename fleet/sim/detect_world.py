"""The detection demo's world: scenes of real objects (scikit-learn's digits, placed on cluttered canvases by
:mod:`fleet.sim.scenes`), or a COCO-format folder's images (:func:`build_coco_world`), under the same edge
conditions as the classifier demo's, with their true boxes.

As in :mod:`fleet.sim.fleet`, the seed set is mostly clear and the fleet's stream mixes in the rarer conditions,
so the base detector has real blind spots (fog and night hide objects, occlusion cuts them, blur smears them).
Each frame has a condition tag, a frame id, its true boxes and the human's action: the true boxes with a
person's small errors (a box missed now and then, corners jittered, rarely the wrong class), known on a share
of frames only. Boxes are normalised x1, y1, x2, y2 throughout, as the contract's :class:`fleet.protocol.Box`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fleet.protocol import Box, Detection
from fleet.sim.conditions import CLEAR, CONDITIONS, apply_conditions, sample_conditions
from fleet.sim.fleet import SEED_MIX, STREAM_MIX
from fleet.sim.scenes import Scenes, digit_scenes

HUMAN_MISS = 0.05  # a person misses a true box this often
HUMAN_JITTER = 0.02  # ... and places each corner off by this share of the box's side (Gaussian)
SCENE_SIZE = 96  # canvas side in pixels (a multiple of 32, as fcos_tiny needs)
MAX_OBJECTS = 3
DETECT_SEED_SCENES = 600  # the detection demo's default seed set: scenes of 1-3 objects, mostly clear


def _ragged_take(owner: npt.NDArray[np.int64], idx: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.int64],
                                                                                     npt.NDArray[np.int64]]:
    """For rows owned by frames (``owner`` (t,), sorted), the rows of frames ``idx`` in that order and their new
    owners (positions in ``idx``)."""
    starts = np.searchsorted(owner, np.arange(int(idx.max(initial=-1)) + 2 if len(idx) else 1))
    rows = [np.arange(starts[i], starts[i + 1]) for i in idx]
    counts = np.array([len(r) for r in rows], np.int64)
    take = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return take, np.repeat(np.arange(len(idx), dtype=np.int64), counts)


@dataclass
class SceneFrames:
    """Detection frames with their ground truth (the world knows it; the fleet sees the images, tags and the
    human's boxes). Boxes of all frames are concatenated, each row owned by a frame (``*_frame``, sorted)."""

    images: npt.NDArray[np.uint8]  # (n, h, w)
    boxes: npt.NDArray[np.float32]  # (t, 4) the true boxes
    box_labels: npt.NDArray[np.int64]  # (t,)
    box_frame: npt.NDArray[np.int64]  # (t,)
    conditions: npt.NDArray[np.str_]  # (n,)
    frame_ids: npt.NDArray[np.str_]  # (n,)
    human_known: npt.NDArray[np.bool_]  # (n,)
    human_boxes: npt.NDArray[np.float32]  # (u, 5) x1, y1, x2, y2, class
    human_box_frame: npt.NDArray[np.int64]  # (u,)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_boxes(self) -> int:
        return len(self.boxes)

    def take(self, idx: npt.NDArray[np.int64]) -> SceneFrames:
        idx = np.asarray(idx, np.int64)
        rows, owner = _ragged_take(self.box_frame, idx)
        hrows, howner = _ragged_take(self.human_box_frame, idx)
        return SceneFrames(self.images[idx], self.boxes[rows], self.box_labels[rows], owner, self.conditions[idx],
                           self.frame_ids[idx], self.human_known[idx], self.human_boxes[hrows], howner)

    @classmethod
    def concat(cls, parts: list[SceneFrames]) -> SceneFrames:
        offsets = np.cumsum([0, *(len(p) for p in parts)])
        return cls(np.concatenate([p.images for p in parts]), np.concatenate([p.boxes for p in parts]),
                   np.concatenate([p.box_labels for p in parts]),
                   np.concatenate([p.box_frame + o for p, o in zip(parts, offsets, strict=False)]),
                   np.concatenate([p.conditions for p in parts]), np.concatenate([p.frame_ids for p in parts]),
                   np.concatenate([p.human_known for p in parts]), np.concatenate([p.human_boxes for p in parts]),
                   np.concatenate([p.human_box_frame + o for p, o in zip(parts, offsets, strict=False)]))

    def truth(self, i: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Frame ``i``'s true boxes (m, 4) and classes (m,)."""
        lo, hi = np.searchsorted(self.box_frame, [i, i + 1])
        return self.boxes[lo:hi], self.box_labels[lo:hi]

    def truth_lists(self) -> tuple[list[npt.NDArray[np.float32]], list[npt.NDArray[np.int64]]]:
        starts = np.searchsorted(self.box_frame, np.arange(len(self) + 1))
        return ([self.boxes[starts[i]:starts[i + 1]] for i in range(len(self))],
                [self.box_labels[starts[i]:starts[i + 1]] for i in range(len(self))])

    def save_shard(self, path: Path) -> Path:
        """An npz the agent's NpzSource reads: images, the human's boxes where known, and per-frame tags."""
        np.savez(path, images=self.images, human_boxes=self.human_boxes, human_box_frame=self.human_box_frame,
                 human_known=self.human_known, tag_condition=self.conditions, tag_frame=self.frame_ids)
        return path

    def save_training(self, path: Path, *, test: SceneFrames | None = None, class_names: list[str]) -> Path:
        """An npz the trainer reads with ``--task detect`` (training.detect.data.load_box_npz's layout)."""
        arrays: dict[str, Any] = {"x_train": self.images, "boxes_train": self.boxes,
                                  "box_labels_train": self.box_labels, "box_image_train": self.box_frame,
                                  "tags_train": self.conditions, "class_names": np.asarray(class_names)}
        if test is not None:
            arrays.update(x_test=test.images, boxes_test=test.boxes, box_labels_test=test.box_labels,
                          box_image_test=test.box_frame, tags_test=test.conditions)
        np.savez(path, **arrays)
        return path


def _from_scenes(scenes: Scenes, conditions: npt.NDArray[np.str_], ids: npt.NDArray[np.str_], *, seed: int,
                 human: tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.int64]] | None = None,
                 unit: int | None = None) -> SceneFrames:
    """``unit``: an object's side in pixels, which sizes the conditions (default a quarter of the scene)."""
    arrays = scenes.to_npz_arrays()
    images = apply_conditions(scenes.images, conditions, seed=seed, unit=unit or scenes.images.shape[1] // 4)
    n = len(scenes)
    known, hb, hf = human if human is not None else (np.zeros(n, bool), np.zeros((0, 5), np.float32),
                                                     np.zeros(0, np.int64))
    return SceneFrames(images, arrays["boxes"].astype(np.float32), arrays["box_labels"], arrays["box_image"],
                       conditions, ids, known, hb, hf)


@dataclass
class SceneWorld:
    """The detection demo's world (the classifier demo's :class:`fleet.sim.fleet.World`, with boxes)."""

    seed_set: SceneFrames
    test_set: SceneFrames  # test scenes under every condition, for per-condition mAP
    class_names: list[str]
    rng: np.random.Generator
    human_known: float
    human_error: float
    seed: int
    size: int = SCENE_SIZE
    truth: dict[str, Detection] = field(default_factory=dict)  # frame id -> true boxes, every frame streamed
    task: str = "detect"
    pool: Scenes | None = None  # a COCO world: the images the fleet's stream draws from (None: fresh digit scenes)
    unit: int | None = None  # an object's side in pixels, which sizes the conditions (None: a quarter of the scene)
    source: str = "scenes of scikit-learn's digits"

    def stream(self, turn: int, n: int) -> SceneFrames:
        """``n`` scenes for one turn under conditions drawn from the fleet's mix: fresh scenes of training digits,
        or a COCO world's stream images (each at most once a turn while there are enough; a fleet sees the same
        places again on later turns, under other conditions)."""
        if self.pool is None:
            scenes = digit_scenes(n, seed=int(self.rng.integers(2**31)), size=self.size, max_objects=MAX_OBJECTS,
                                  split="train")
        else:
            scenes = self.pool.take(self.rng.choice(len(self.pool), size=n, replace=n > len(self.pool)))
        conditions = sample_conditions(n, STREAM_MIX, rng=self.rng)
        ids = np.asarray([f"t{turn}-{i:06d}" for i in range(n)])
        frames = _from_scenes(scenes, conditions, ids, seed=self.seed * 1000 + turn,
                              human=self._human(scenes), unit=self.unit)
        for i, fid in enumerate(ids.tolist()):
            self.truth[fid] = to_detection(*frames.truth(i))
        return frames

    def label(self, frame: str) -> Detection:
        """The true label of a streamed frame, as the hub takes it."""
        return self.truth[frame]

    def answer(self, frame: str) -> dict[str, Any]:
        """What a simulated annotator knows of a frame (``flywheel label bots --truth``)."""
        return self.truth[frame].to_dict()

    def _human(self, scenes: Scenes) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """The person at the device: the true boxes, each missed with HUMAN_MISS, corners jittered by HUMAN_JITTER
        of the box's side, the class wrong with ``human_error``; known on a ``human_known`` share of frames."""
        k = len(self.class_names)
        known = self.rng.random(len(scenes)) < self.human_known
        rows, owners = [], []
        for i in np.flatnonzero(known):
            b, lab = scenes.boxes[i].astype(np.float64), scenes.labels[i].copy()
            keep = self.rng.random(len(b)) >= HUMAN_MISS
            b, lab = b[keep], lab[keep]
            side = np.repeat(np.stack([b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1), 2, axis=1)[:, [0, 2, 1, 3]]
            b = np.clip(b + self.rng.normal(0, HUMAN_JITTER, b.shape) * side, 0.0, 1.0)
            ok = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
            wrong = self.rng.random(len(lab)) < self.human_error
            lab[wrong] = (lab[wrong] + self.rng.integers(1, k, int(wrong.sum()))) % k
            rows.append(np.column_stack([b[ok], lab[ok]]).astype(np.float32))
            owners.append(np.full(int(ok.sum()), i, np.int64))
        return (known, np.concatenate(rows) if rows else np.zeros((0, 5), np.float32),
                np.concatenate(owners) if owners else np.zeros(0, np.int64))


def to_detection(boxes: npt.NDArray[np.floating], labels: npt.NDArray[np.integer]) -> Detection:
    return Detection([Box(float(b[0]), float(b[1]), float(b[2]), float(b[3]), int(c))
                      for b, c in zip(boxes, labels, strict=True)])


def build_scene_world(*, seed: int, seed_size: int, test_per_condition: int, size: int = SCENE_SIZE,
                      human_known: float = 0.5, human_error: float = 0.03) -> SceneWorld:
    """A mostly clear seed set of ``seed_size`` scenes, and ``test_per_condition`` test scenes (digits never seen
    in training) under each condition."""
    rng = np.random.default_rng(seed)
    seed_scenes = digit_scenes(seed_size, seed=seed, size=size, max_objects=MAX_OBJECTS, split="train")
    seed_cond = sample_conditions(seed_size, SEED_MIX, rng=rng)
    seed_set = _from_scenes(seed_scenes, seed_cond, np.asarray([f"seed-{i:06d}" for i in range(seed_size)]),
                            seed=seed)
    names = [CLEAR, *CONDITIONS]
    test_scenes = digit_scenes(test_per_condition, seed=seed + 7, size=size, max_objects=MAX_OBJECTS, split="test")
    parts = [_from_scenes(test_scenes, np.asarray([c] * test_per_condition),
                          np.asarray([f"test-{c}-{i:05d}" for i in range(test_per_condition)]), seed=seed + 7 + j)
             for j, c in enumerate(names)]
    return SceneWorld(seed_set, SceneFrames.concat(parts), seed_scenes.class_names, rng, human_known, human_error,
                      seed, size)


COCO_MAX_SIDE = 128  # a COCO world's scenes: the images' shorter side rounded down to a multiple of 32, at most this
COCO_TEST_SHARE = 0.2  # at most this share of a COCO folder's images is held out as test scenes
COCO_SEED_SHARE = 0.4  # ... and, unless --seed-size says otherwise, at most this share seeds the base model


def coco_side(height: int, width: int) -> int:
    """The square side a COCO world's images are scaled to: their shorter side rounded down to a multiple of 32
    (fcos_tiny's stride), between 32 and COCO_MAX_SIDE (the demo trains and runs on a CPU)."""
    return int(min(COCO_MAX_SIDE, max(32, (min(height, width) // 32) * 32)))


def build_coco_world(path: str | Path, *, seed: int, seed_size: int | None, test_per_condition: int,
                     human_known: float = 0.5, human_error: float = 0.03) -> SceneWorld:
    """The detection demo's world from a COCO-format folder (:func:`fleet.coco.read_coco`): its images scaled to
    a square :func:`coco_side` (grey or RGB, as the first image is), their boxes kept (normalised), the classes
    its categories. The images are split at random by ``seed``, each used in one part only: up to
    ``test_per_condition`` (at most COCO_TEST_SHARE of them) are the test scenes, shown under every condition;
    ``seed_size`` (default: at most COCO_SEED_SHARE of them, DETECT_SEED_SCENES at most) seed the base model,
    mostly clear; the rest are what the fleet's cameras see, under the stream's conditions, with the human's
    boxes made from the true ones as for digit scenes. Too few images for the three parts is refused with the
    counts."""
    from PIL import Image

    from fleet.coco import read_coco

    folder = read_coco(path)
    if any("," in name for name in folder.class_names):
        raise ValueError(f"{folder.annotations}: a category name holds a comma ({folder.class_names}); the demo "
                         "passes the class names comma-separated: rename it")
    n = len(folder.images)
    first = folder.images[0]
    side = coco_side(first.height, first.width)
    with Image.open(first.file) as im:
        mode = "L" if im.mode in ("L", "1", "I", "I;16", "LA") else "RGB"
    images = []
    for item in folder.images:
        with Image.open(item.file) as im:
            images.append(np.asarray(im.convert(mode).resize((side, side), Image.Resampling.BILINEAR), np.uint8))
    scenes = Scenes(np.stack(images), [im.boxes for im in folder.images], [im.classes for im in folder.images],
                    folder.class_names)
    n_test = min(test_per_condition, int(n * COCO_TEST_SHARE))
    n_seed = seed_size if seed_size is not None else min(DETECT_SEED_SCENES, int(n * COCO_SEED_SHARE))
    if n_test < 1 or n_seed < 1 or n - n_test - n_seed < 1:
        raise ValueError(f"{folder.annotations}: {n} images are too few for the detection demo: it needs test scenes "
                         f"({n_test}: at most {COCO_TEST_SHARE:.0%} of the images), a seed set ({n_seed}) and at least "
                         "one image for the fleet's stream; add images, or give a smaller --seed-size / --test-size")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    test_idx, seed_idx, pool_idx = order[:n_test], order[n_test:n_test + n_seed], order[n_test + n_seed:]
    sides = np.concatenate([np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) for b in scenes.boxes]) * side
    unit = int(max(4, round(float(np.median(sides))))) if len(sides) else side // 4
    seed_scenes = scenes.take(seed_idx)
    seed_set = _from_scenes(seed_scenes, sample_conditions(n_seed, SEED_MIX, rng=rng),
                            np.asarray([f"seed-{i:06d}" for i in range(n_seed)]), seed=seed, unit=unit)
    test_scenes = scenes.take(test_idx)
    parts = [_from_scenes(test_scenes, np.asarray([c] * n_test), np.asarray([f"test-{c}-{i:05d}" for i in
                                                                              range(n_test)]),
                          seed=seed + 7 + j, unit=unit)
             for j, c in enumerate([CLEAR, *CONDITIONS])]
    return SceneWorld(seed_set, SceneFrames.concat(parts), folder.class_names, rng, human_known, human_error, seed,
                      side, pool=scenes.take(pool_idx), unit=unit,
                      source=f"the COCO folder {folder.annotations.parent} ({n} images: {n_test} test, {n_seed} seed, "
                             f"{len(pool_idx)} for the fleet's stream)")
