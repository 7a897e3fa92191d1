"""The novelty bank a model ships with: the model's own embeddings of its training set.

Devices score novelty as the distance of a frame's embedding to a bank of embeddings; that distance means
something only in the space of the model that computed both. So the trainer builds the bank with the model it
publishes, from the ONNX file that ships (the ``embedding`` output, int8 if int8 ships, preprocessed as the
manifest says, as the device does), and uploads it with the model (``PUT /v1/models/{version}/novelty-bank``).
At most ``max_size`` training images are embedded: a seeded sample stratified by class
(:func:`trigger.sample_rows`), so rare classes keep their examples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fleet.errors import InvalidInput
from fleet.protocol import ModelManifest
from training.export import normalize_images
from trigger import NoveltyBank, sample_rows

log = logging.getLogger(__name__)

BANK_FILE = "novelty_bank.npz"
MAX_BANK_SIZE = 4096
EMBEDDING = "embedding"


def embed_onnx(onnx_path: Path, images: np.ndarray, manifest: ModelManifest, *, batch_size: int = 256) -> np.ndarray:
    """The model's ``embedding`` output for ``images: (n, c, h, w) uint8`` -> ``(n, embedding_dim)`` float32."""
    import onnxruntime as ort

    if images.ndim != 4 or images.dtype != np.uint8:
        raise InvalidInput(f"images must be (n, c, h, w) uint8; received {images.dtype} {images.shape}")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = [o.name for o in sess.get_outputs()]
    if EMBEDDING not in outputs:
        raise InvalidInput(f"{onnx_path.name} has outputs {outputs}; a novelty bank needs {EMBEDDING!r}")
    name = sess.get_inputs()[0].name
    parts = [sess.run([EMBEDDING], {name: normalize_images(images[i: i + batch_size], manifest.input)})[0]
             for i in range(0, len(images), batch_size)]
    emb = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, manifest.embedding_dim), np.float32)
    if emb.shape != (len(images), manifest.embedding_dim):
        raise InvalidInput(f"{onnx_path.name} embeds {len(images)} images as {emb.shape}; the manifest says "
                           f"embedding_dim {manifest.embedding_dim}")
    return emb


def build_bank(onnx_path: Path, manifest: ModelManifest, images: np.ndarray, labels: np.ndarray | None = None, *,
               max_size: int = MAX_BANK_SIZE, seed: int = 0) -> NoveltyBank:
    """A ``trigger.NoveltyBank`` of the model's embeddings of ``images: (n, c, h, w) uint8`` (``labels: (n,)``,
    -1 or None where unknown), at most ``max_size`` of them; its meta names the model version."""
    if len(images) == 0:
        raise InvalidInput("no training images to build a novelty bank from")
    lab = np.full(len(images), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    rows = sample_rows(lab, max_size, seed=seed)
    emb = embed_onnx(onnx_path, images[rows], manifest)
    return NoveltyBank.from_embeddings(emb, labels=lab[rows], seed=seed,
                                       meta={"model_version": manifest.version, "source": "training set"})


def write_bank(out_dir: Path, onnx_path: Path, manifest: ModelManifest, images: np.ndarray,
               labels: np.ndarray | None = None, *, max_size: int = MAX_BANK_SIZE, seed: int = 0) -> Path:
    """Build the bank (:func:`build_bank`) and save it as ``out_dir/novelty_bank.npz``."""
    bank = build_bank(onnx_path, manifest, images, labels, max_size=max_size, seed=seed)
    path = out_dir / BANK_FILE
    bank.save(path)
    log.info("novelty bank: %r of model %s -> %s", bank, manifest.version, path.name)
    return path
