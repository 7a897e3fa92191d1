"""The simulated fleet's world: a seed set, per-turn device shards with edge conditions, test sets.

The seed training set is mostly clear, the fleet's stream mixes clear frames with rarer conditions,
so the first model has real blind spots. Each frame carries its condition tag, a frame id, and a
human action (the true label with a small error rate, known only on a share of frames).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fleet.protocol import Classification
from fleet.sim.conditions import CLEAR, CONDITIONS, apply_conditions, sample_conditions
from fleet.sim.data import Dataset

SEED_MIX = {CLEAR: 0.94, **{c: 0.012 for c in CONDITIONS}}
STREAM_MIX = {CLEAR: 0.75, **{c: 0.05 for c in CONDITIONS}}  # edge cases are rare: that is the point


@dataclass
class Frames:
    """A batch of frames with their ground truth, as the world knows it (the fleet sees less)."""

    images: npt.NDArray[np.uint8]
    labels: npt.NDArray[np.int64]
    conditions: npt.NDArray[np.str_]
    frame_ids: npt.NDArray[np.str_]
    human: npt.NDArray[np.int64]  # what the human did: -1 unknown, else a class (sometimes wrong)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: npt.NDArray[np.int64]) -> Frames:
        return Frames(self.images[idx], self.labels[idx], self.conditions[idx], self.frame_ids[idx], self.human[idx])

    @classmethod
    def concat(cls, parts: list[Frames]) -> Frames:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("images", "labels", "conditions", "frame_ids", "human")))

    def save_shard(self, path: Path) -> Path:
        """An npz the agent's NpzSource reads: images, human, and per-frame tags."""
        np.savez(path, images=self.images, human=self.human,
                 tag_condition=self.conditions, tag_frame=self.frame_ids)
        return path

    def save_training(self, path: Path, *, test: Frames | None = None, class_names: list[str]) -> Path:
        """An npz the trainer reads: x_train, y_train (+ x_test, y_test), condition tags, class names."""
        arrays: dict[str, npt.NDArray[np.generic]] = {
            "x_train": self.images, "y_train": self.labels, "tags_train": self.conditions,
            "class_names": np.asarray(class_names),
        }
        if test is not None:
            arrays.update(x_test=test.images, y_test=test.labels, tags_test=test.conditions)
        np.savez(path, **arrays)  # type: ignore[arg-type]
        return path


@dataclass
class World:
    seed_set: Frames
    test_set: Frames  # every test image under every condition, for per-condition accuracy
    pool_images: npt.NDArray[np.uint8]
    pool_labels: npt.NDArray[np.int64]
    class_names: list[str]
    rng: np.random.Generator
    human_known: float
    human_error: float
    seed: int
    truth: dict[str, int] = field(default_factory=dict)  # frame id -> true label, for every frame streamed
    task: str = "classify"

    def label(self, frame: str) -> Classification:
        """The true label of a streamed frame, as the hub takes it."""
        return Classification(int(self.truth[frame]))

    def answer(self, frame: str) -> int:
        """What a simulated annotator knows of a frame (``flywheel label bots --truth``)."""
        return int(self.truth[frame])

    def stream(self, turn: int, n: int) -> Frames:
        """``n`` fresh frames for one turn: pool images under conditions drawn from the fleet's mix."""
        idx = self.rng.integers(0, len(self.pool_images), size=n)
        conditions = sample_conditions(n, STREAM_MIX, rng=self.rng)
        images = apply_conditions(self.pool_images[idx], conditions, seed=self.seed * 1000 + turn)
        labels = self.pool_labels[idx]
        ids = np.asarray([f"t{turn}-{i:06d}" for i in range(n)])
        human = self._human(labels)
        self.truth.update(zip(ids.tolist(), labels.tolist(), strict=True))
        return Frames(images, labels, conditions, ids, human)

    def _human(self, labels: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        k = len(self.class_names)
        human = labels.copy()
        wrong = self.rng.random(len(labels)) < self.human_error
        human[wrong] = (labels[wrong] + self.rng.integers(1, k, wrong.sum())) % k
        human[self.rng.random(len(labels)) >= self.human_known] = -1
        return human


def build_world(data: Dataset, *, seed: int, seed_size: int, human_known: float = 0.5,
                human_error: float = 0.03) -> World:
    """Split the dataset into a mostly-clear seed set, a stream pool, and per-condition test sets."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.x_train))
    seed_size = min(seed_size, len(order) // 3)
    seed_idx, pool_idx = order[:seed_size], order[seed_size:]
    seed_cond = sample_conditions(seed_size, SEED_MIX, rng=rng)
    seed_images = apply_conditions(data.x_train[seed_idx], seed_cond, seed=seed)
    seed_set = Frames(seed_images, data.y_train[seed_idx], seed_cond,
                      np.asarray([f"seed-{i:06d}" for i in range(seed_size)]),
                      np.full(seed_size, -1, np.int64))
    names = [CLEAR, *CONDITIONS]
    n_test = len(data.x_test)
    test_images = np.concatenate([apply_conditions(data.x_test, [c] * n_test, seed=seed + 7) for c in names])
    test_cond = np.repeat(np.asarray(names), n_test)
    test_set = Frames(test_images, np.tile(data.y_test, len(names)), test_cond,
                      np.asarray([f"test-{i:06d}" for i in range(len(test_cond))]),
                      np.full(len(test_cond), -1, np.int64))
    return World(seed_set, test_set, data.x_train[pool_idx], data.y_train[pool_idx], data.class_names,
                 rng, human_known, human_error, seed)
