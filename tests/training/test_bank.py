"""The novelty bank a trained model ships with: its own embeddings of a stratified sample of the training set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fleet.errors import InvalidInput
from fleet.protocol import ModelManifest
from training.bank import BANK_FILE, build_bank, embed_onnx
from trigger import NoveltyBank


def manifest_of(run: Path) -> ModelManifest:
    return ModelManifest.from_json((run / "manifest.unsigned.json").read_text())


def test_a_run_writes_the_bank_of_its_model(trained: Path) -> None:
    manifest = manifest_of(trained)
    bank = NoveltyBank.load(trained / BANK_FILE)
    assert bank.dim == manifest.embedding_dim and bank.meta == {"model_version": "parent-1", "source": "training set"}
    assert (bank.labels >= 0).all()  # a classifier's bank knows each entry's class


def test_the_bank_embeds_only_a_stratified_sample_and_equals_embedding_everything(trained: Path) -> None:
    manifest = manifest_of(trained)
    spec = manifest.input
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (300, spec.channels, spec.height, spec.width), dtype=np.uint8)
    labels = np.r_[np.zeros(5, np.int64), np.ones(295, np.int64)]  # a rare class of 5
    bank = build_bank(trained / "model.onnx", manifest, images, labels, max_size=60, seed=0)
    everything = NoveltyBank.from_embeddings(embed_onnx(trained / "model.onnx", images, manifest), labels=labels,
                                             max_size=60, seed=0)
    assert len(bank) == 60 and int((bank.labels == 0).sum()) == 5  # the rare class keeps all its examples
    np.testing.assert_allclose(bank.vectors, everything.vectors, atol=1e-6)
    np.testing.assert_array_equal(bank.labels, everything.labels)
    # a bank of the same images is the same bytes (the upload is idempotent)
    assert build_bank(trained / "model.onnx", manifest, images, labels, max_size=60).sha256 == bank.sha256


def test_bad_images_are_refused(trained: Path) -> None:
    manifest = manifest_of(trained)
    with pytest.raises(InvalidInput, match=r"must be \(n, c, h, w\) uint8; received float32"):
        embed_onnx(trained / "model.onnx", np.zeros((2, 1, 8, 8), np.float32), manifest)
    with pytest.raises(InvalidInput, match="no training images"):
        build_bank(trained / "model.onnx", manifest, np.zeros((0, 1, 8, 8), np.uint8))


def test_a_detector_run_writes_the_bank_of_its_model(trained_detector: Path) -> None:
    manifest = manifest_of(trained_detector)
    bank = NoveltyBank.load(trained_detector / BANK_FILE)
    assert bank.dim == manifest.embedding_dim and bank.meta["model_version"] == "det-parent"
    assert len(bank) == 200 and (bank.labels == -1).all()  # every training scene; a scene has no one class
