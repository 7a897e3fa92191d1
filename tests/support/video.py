"""Small video files made with PyAV for the video-source tests and benchmarks: a red square moving right."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

# codec -> container suffix it is written in (all encoders are in PyAV's wheels)
CODECS = {"libx264": ".mp4", "mpeg4": ".avi", "mjpeg": ".mkv", "libvpx": ".webm"}
SQUARE = 10  # side of the square, pixels
STEP = 2  # pixels the square moves right per frame


@dataclass
class Clip:
    path: Path
    pts: list[int]  # encoded presentation timestamps, in time_base units
    time_base: Fraction
    frames: int

    def times(self) -> list[float]:
        """The frames' stream times in seconds (pts * time_base), in order."""
        return [float(p * self.time_base) for p in self.pts]


def square_frame(i: int, width: int = 64, height: int = 48) -> NDArray[np.uint8]:
    """Frame ``i``: black, with a red SQUARExSQUARE square whose left edge is at ``2 + STEP * i`` (wrapping)."""
    img = np.zeros((height, width, 3), np.uint8)
    x = square_x(i, width)
    y = (height - SQUARE) // 2
    img[y:y + SQUARE, x:x + SQUARE, 0] = 255
    return img


def square_x(i: int, width: int = 64) -> int:
    return 2 + (STEP * i) % (width - SQUARE - 4)


def write_clip(path: Path, *, codec: str = "libx264", frames: int = 12, fps: int = 12, width: int = 64,
               height: int = 48, creation_time: str | None = None, bit_rate: int = 0,
               image: Callable[[int, int, int], NDArray[np.uint8]] = square_frame) -> Clip:
    """Encode ``frames`` frames of ``image(i, width, height)`` at ``fps`` into ``path`` with ``codec`` (at an
    average ``bit_rate`` in bits/s, or the encoder's default quality with 0)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        if creation_time is not None:
            out.metadata["creation_time"] = creation_time
        stream: Any = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        if bit_rate:
            stream.bit_rate = bit_rate
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "g": str(fps)}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(image(i, width, height), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    with av.open(str(path)) as inp:
        vs = inp.streams.video[0]
        time_base = vs.time_base
        assert time_base is not None
        pts = sorted(p.pts for p in inp.demux(vs) if p.pts is not None)
    return Clip(path=path, pts=pts, time_base=time_base, frames=frames)
