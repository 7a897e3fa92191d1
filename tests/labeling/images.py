"""Small PNGs for the labeling tests: a class's colour and stripes, so a screenshot shows something real."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

PALETTE = [(220, 60, 50), (40, 140, 220), (60, 170, 80), (230, 170, 40), (150, 80, 200), (40, 190, 190)]


def png_for(cls: int, n_classes: int, *, seed: int = 0, size: int = 96, noise: Any = None) -> bytes:
    """A small PNG whose colour and stripes say its class (so a screenshot shows something real);
    ``noise`` (a numpy Generator) speckles it so no two images are near-duplicates."""
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size]
    shade = np.where(((x + y + seed) // (6 + cls * 2)) % 2 == 1, 1.0, 0.7)
    if noise is not None:
        shade = shade * (0.6 + 0.4 * noise.random((size, size)))
    rgb = (shade[..., None] * np.asarray(PALETTE[cls % len(PALETTE)], dtype=np.float64)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()
