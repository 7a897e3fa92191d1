"""Small real data the tests share: sklearn's bundled digits, and PNG bytes of a frame."""

from __future__ import annotations

import io

import numpy as np


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 1,797 8x8 digits as uint8 0..255, shuffled with a fixed seed."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.clip(np.rint(d.images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    p = np.random.default_rng(0).permutation(len(x))
    return x[p], d.target[p].astype(np.int64)


def png_bytes(img: np.ndarray) -> bytes:
    """Lossless PNG of a uint8 HxW or HxWxC array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
