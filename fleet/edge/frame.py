"""One frame as every source yields it, and the check its pixels pass (shared by the plain sources and the
video ones, which import no other source module)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fleet.errors import InvalidInput

if TYPE_CHECKING:
    from fleet.protocol import Detection

__all__ = ["Frame", "check_image"]


@dataclass
class Frame:
    """One frame: pixels (uint8, HxW or HxWxC with C in 1, 3, 4), the human's action if known, tags.

    The human's action is a class (``human_action``, for a classifier) or the objects the person marked
    (``human_boxes``, for a detector); a source sets the one it knows."""

    image: NDArray[Any]
    frame_id: str
    human_action: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    ts: float | None = None  # capture time, unix seconds; None: when the agent saw it
    position: int | None = None  # index in a source that can resume (npz): see SourceCursor
    # video sources (fleet.edge.video): which stream, the frame's decode order in it (strictly increasing;
    # a gap: frames skipped), and seconds on the stream's clock (strictly increasing). None elsewhere.
    stream: str | None = None
    index: int | None = None
    stream_time: float | None = None
    human_boxes: Detection | None = None  # the objects the person at the device marked, if a source knows them


def check_image(image: Any, where: str) -> NDArray[Any]:
    """Return ``image`` as a uint8 HxW or HxWxC array, or raise InvalidInput saying what was wrong."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise InvalidInput(f"{where}: image must be uint8; received dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
        raise InvalidInput(f"{where}: image must be HxW or HxWxC with C in (1, 3, 4); received shape {arr.shape}")
    return arr
