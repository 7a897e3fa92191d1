"""A case's frame with its boxes drawn, as PNG: what the dashboard and the report show for a detector's case.

The model's boxes are drawn in one colour per class with the class name and score; the human's boxes (the
action at the device) and the challenger's, when the case has them, in dashed white and dotted yellow outlines.
Frames smaller than ``min_side`` pixels are scaled up first (nearest neighbour), so the labels stay legible.
"""

from __future__ import annotations

import colorsys
import io
from collections.abc import Sequence

from fleet.errors import InvalidInput
from fleet.protocol import Case, Detection

MIN_SIDE = 256  # frames are scaled up to at least this many pixels on their shorter side
MAX_SCALE = 16


def render_preview(png: bytes, case: Case, class_names: Sequence[str], *, min_side: int = MIN_SIDE) -> bytes:
    """The case's image ``png`` with its boxes drawn: the model's, and the human's and challenger's when present.
    A classifier's case is drawn with its predicted class as a caption."""
    from PIL import Image, ImageDraw, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(png)) as opened:
            im = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidInput(f"case {case.case_id}: its stored image cannot be decoded: {exc}") from exc
    scale = min(MAX_SCALE, max(1, -(-min_side // max(1, min(im.size)))))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(im)
    w, h = im.size

    def name(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    def outline(det: Detection, colour: tuple[int, int, int] | None, width: int, caption: bool) -> None:
        for b in det.boxes:
            c = colour or class_colour(b.label)
            xy = (b.x1 * w, b.y1 * h, max(b.x1 * w, b.x2 * w - 1), max(b.y1 * h, b.y2 * h - 1))
            draw.rectangle(xy, outline=c, width=width)
            if caption:
                text = name(b.label) if b.score is None else f"{name(b.label)} {b.score:.2f}"
                left, top, right, bottom = draw.textbbox((xy[0], xy[1]), text)
                y = xy[1] - (bottom - top) - 2 if xy[1] >= bottom - top + 2 else xy[1]
                draw.rectangle((xy[0], y, xy[0] + right - left + 2, y + bottom - top + 2), fill=c)
                draw.text((xy[0] + 1, y), text, fill=(0, 0, 0))

    if isinstance(case.human_action, Detection):
        outline(case.human_action, (255, 255, 255), 1, False)
    if case.challenger is not None and isinstance(case.challenger.prediction, Detection):
        outline(case.challenger.prediction, (255, 220, 0), 1, False)
    if isinstance(case.prediction, Detection):
        outline(case.prediction, None, 2, True)
    else:
        draw.text((2, 2), f"{name(case.prediction.label)}", fill=(255, 255, 255))
    out = io.BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def class_colour(label: int) -> tuple[int, int, int]:
    """A bright colour per class, far from its neighbours' (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)
