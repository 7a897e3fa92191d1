"""Frame sources: npz arrays, an image folder, and a replay stream. Each is an iterator of Frames.

Video files, RTSP/HTTP streams and cameras are in :mod:`fleet.edge.video` (the ``video`` extra), reached
through :func:`open_source` too. Bad input is refused with the file, the line or the index, what was
received and what was expected.

Replay stream (JSONL, one frame per line; image paths relative to the JSONL file)::

    {"image": "frames/000001.png", "human_action": 2, "tags": {"condition": "night"}, "ts": 1718000000.0}

For a detector, the human's action is the objects the person marked, each ``[x1, y1, x2, y2, class]``
normalised to [0, 1] (``[]``: the person saw nothing)::

    {"image": "frames/000002.png", "human_boxes": [[0.1, 0.2, 0.4, 0.6, 0]]}
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from fleet.edge.frame import Frame, check_image
from fleet.errors import InvalidInput

if TYPE_CHECKING:
    from fleet.protocol import Detection

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
VIDEO_KINDS = ("video", "stream", "camera")  # through PyAV: fleet.edge.video
MAX_TAGS = 32


def open_source(kind: str, path: str | Path, *, loop: bool = False, **options: Any) -> Iterator[Frame]:
    """The source named ``kind`` over ``path``: npz, folder, replay; video (a file or a folder of them),
    stream (``path`` is the URL), camera (``path`` is the device). ``options``: the video sources' keyword
    arguments (see :mod:`fleet.edge.video`)."""
    builders: dict[str, type[NpzSource | ImageFolderSource | ReplaySource]] = {
        "npz": NpzSource, "folder": ImageFolderSource, "replay": ReplaySource,
    }
    kinds = [*builders, *VIDEO_KINDS]
    if kind not in kinds:
        raise InvalidInput(f"unknown source kind {kind!r}; expected one of {kinds}")
    if kind in VIDEO_KINDS:
        from fleet.edge.video import LiveSource, VideoFileSource

        if kind == "video":
            return iter(VideoFileSource(path, loop=loop, **options))
        return iter(LiveSource(str(path), kind=kind, **options))
    if options:
        raise InvalidInput(f"source kind {kind!r} takes no options; received {sorted(options)}")
    return iter(builders[kind](Path(path), loop=loop))


def paced(frames: Iterator[Frame], fps: float) -> Iterator[Frame]:
    """Yield frames no faster than ``fps`` (0: unpaced), like a camera would deliver them."""
    if fps <= 0:
        yield from frames
        return
    period = 1.0 / fps
    due = time.monotonic()
    for frame in frames:
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        due = max(due + period, time.monotonic() - period)
        yield frame


class NpzSource:
    """Frames from an ``.npz`` file.

    Arrays: ``images`` (n, h, w) or (n, h, w, c) uint8 (required); ``human`` (n,) int, -1 = unknown;
    ``ts`` (n,) float; and any ``tag_<name>`` (n,) array, which becomes tag ``<name>`` per frame.

    For a detector, the human's boxes: ``human_boxes`` (t, 5) float ``[x1, y1, x2, y2, class]`` normalised,
    ``human_box_frame`` (t,) int, the frame each box belongs to, and ``human_known`` (n,) bool, the frames where
    the person's boxes are known (a known frame without a box: the person saw nothing). All three or none.
    """

    def __init__(self, path: str | Path, *, loop: bool = False, start: int = 0) -> None:
        self.path = Path(path)
        try:
            data = np.load(self.path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{self.path}: cannot read npz: {exc}") from exc
        with data:
            if "images" not in data.files:
                raise InvalidInput(f"{self.path}: npz must hold an 'images' array; found {sorted(data.files)}")
            self.images = data["images"]
            n = len(self.images)
            if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
                raise InvalidInput(
                    f"{self.path}: 'images' must be uint8 (n, h, w) or (n, h, w, c); "
                    f"received {self.images.dtype} {self.images.shape}"
                )
            self.human = self._column(data, "human", n, np.integer)
            self.ts = self._column(data, "ts", n, np.number)
            self.human_boxes = self._human_boxes(data, n)
            self.tags: dict[str, NDArray[Any]] = {}
            for k in data.files:
                col = self._column(data, k, n, None) if k.startswith("tag_") and len(k) > 4 else None
                if col is not None:
                    self.tags[k[4:]] = col
        self.loop = loop
        if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= n:
            raise InvalidInput(f"{self.path}: start must be a frame index in 0..{n}; received {start!r}")
        self.start = start

    def _column(self, data: Any, key: str, n: int, kind: Any) -> NDArray[Any] | None:
        if key not in data.files:
            return None
        col = data[key]
        if col.shape != (n,) or (kind is not None and not np.issubdtype(col.dtype, kind)):
            want = f"{kind.__name__ if kind is not None else 'an array'} of shape ({n},)"
            raise InvalidInput(f"{self.path}: {key!r} must be {want}; received {col.dtype} {col.shape}")
        return col  # type: ignore[no-any-return]

    def _human_boxes(self, data: Any, n: int) -> list[Detection | None] | None:
        """Each frame's human boxes (None where unknown), from the three arrays the class docstring names."""
        keys = ("human_boxes", "human_box_frame", "human_known")
        present = [k for k in keys if k in data.files]
        if not present:
            return None
        if len(present) != len(keys):
            raise InvalidInput(f"{self.path}: the human's boxes need all of {list(keys)}; found only {present}")
        rows, owner = data["human_boxes"], data["human_box_frame"]
        known = self._column(data, "human_known", n, np.bool_)
        assert known is not None
        if rows.ndim != 2 or rows.shape[1] != 5 or not np.issubdtype(rows.dtype, np.number):
            raise InvalidInput(f"{self.path}: 'human_boxes' must be numbers of shape (t, 5) [x1, y1, x2, y2, class]; "
                               f"received {rows.dtype} {rows.shape}")
        if owner.shape != (len(rows),) or not np.issubdtype(owner.dtype, np.integer) or \
                (len(owner) and (owner.min() < 0 or owner.max() >= n)):
            raise InvalidInput(f"{self.path}: 'human_box_frame' must be ({len(rows)},) frame indices in [0, {n}); "
                               f"received {owner.dtype} {owner.shape}")
        if len(owner) and not known[owner].all():
            bad = int(owner[~known[owner]][0])
            raise InvalidInput(f"{self.path}: frame {bad} has human boxes but 'human_known' is false there")
        out: list[Detection | None] = [None] * n
        order = np.argsort(owner, kind="stable")
        starts = np.searchsorted(owner[order], np.arange(n + 1))
        for i in np.flatnonzero(known):
            sel = rows[order[starts[i]:starts[i + 1]]]
            boxes = [[float(b[0]), float(b[1]), float(b[2]), float(b[3]), int(b[4])] for b in sel]
            out[i] = human_boxes(boxes, f"{self.path}[{i}]")
        return out

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[Frame]:
        human_col, ts_col, boxes_col = self.human, self.ts, self.human_boxes
        first = self.start
        while True:
            for i in range(first, len(self.images)):
                human = int(human_col[i]) if human_col is not None and human_col[i] >= 0 else None
                yield Frame(
                    image=check_image(self.images[i], f"{self.path}[{i}]"),
                    frame_id=f"{self.path.name}:{i}",
                    human_action=human,
                    tags={name: str(col[i]) for name, col in self.tags.items()},
                    ts=float(ts_col[i]) if ts_col is not None else None,
                    position=i,
                    human_boxes=boxes_col[i] if boxes_col is not None else None,
                )
            first = 0
            if not self.loop or not len(self.images):
                return


class SourceCursor:
    """Where a file source left off, kept in the agent's data folder so a restart goes on from there.

    The agent saves the position after the frames before it were decided and spooled (at most once
    a second while running, and when it stops), so a restart does not flag the same frames again; a
    ``kill -9`` repeats at most the last second. The cursor belongs to one file: another file at the
    same path (different size, modification time or first 64 KiB) starts again from frame 0.
    """

    def __init__(self, path: Path, source: Path) -> None:
        self.path = Path(path)
        self.source = Path(source)
        self._file: dict[str, Any] | None = None

    def fingerprint(self) -> dict[str, Any]:
        """The source file's identity, taken once: positions saved later belong to the file as it was opened."""
        if self._file is None:
            self._file = self._identity()
        return self._file

    def _identity(self) -> dict[str, Any]:
        import hashlib

        st = self.source.stat()
        with self.source.open("rb") as fh:
            head = hashlib.sha256(fh.read(1 << 16)).hexdigest()
        return {"source": str(self.source.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": head}

    def load(self) -> int:
        """The saved position for this very file, or 0 (no cursor, another file, or an unreadable one)."""
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("file") == self.fingerprint() and isinstance(saved.get("next"), int) and saved["next"] >= 0:
                return int(saved["next"])
        except (OSError, ValueError, AttributeError):
            pass
        return 0

    def save(self, next_index: int) -> None:
        from fleet.edge.fsutil import atomic_write_json

        atomic_write_json(self.path, {"file": self.fingerprint(), "next": int(next_index)}, mode=0o600)


class ImageFolderSource:
    """Frames from the image files in a folder (PNG, JPEG, BMP, WebP), in sorted name order."""

    def __init__(self, path: str | Path, *, loop: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InvalidInput(f"image folder {self.path} does not exist or is not a directory")
        self.files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise InvalidInput(f"image folder {self.path} holds no {'/'.join(IMAGE_SUFFIXES)} files")
        self.loop = loop

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Frame]:
        while True:
            for p in self.files:
                yield Frame(image=read_image(p), frame_id=p.name)
            if not self.loop:
                return


class ReplaySource:
    """A recorded stream: JSONL lines ``{image, human_action?, human_boxes?, tags?, ts?}``, images beside the
    file."""

    def __init__(self, path: str | Path, *, loop: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InvalidInput(f"replay file {self.path} does not exist")
        self.root = self.path.parent
        self.loop = loop

    def __iter__(self) -> Iterator[Frame]:
        while True:
            count = 0
            with self.path.open("r", encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    count += 1
                    yield self._frame(line, lineno)
            if not self.loop or not count:
                return

    def _frame(self, line: str, lineno: int) -> Frame:
        where = f"{self.path}:{lineno}"
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise InvalidInput(f"{where}: not valid JSON ({exc})") from exc
        if not isinstance(rec, dict):
            raise InvalidInput(f"{where}: each line must be a JSON object; received {type(rec).__name__}")
        unknown = sorted(set(rec) - {"image", "human_action", "human_boxes", "tags", "ts"})
        if unknown:
            raise InvalidInput(f"{where}: unknown key(s) {unknown}; expected image, human_action, human_boxes, tags, "
                               f"ts")
        image = rec.get("image")
        if not isinstance(image, str) or not image:
            raise InvalidInput(f"{where}: 'image' must be a relative path string; received {image!r}")
        human = rec.get("human_action")
        if human is not None and (isinstance(human, bool) or not isinstance(human, int) or human < 0):
            raise InvalidInput(f"{where}: 'human_action' must be an integer >= 0 or null; received {human!r}")
        tags = rec.get("tags", {})
        if not isinstance(tags, dict) or len(tags) > MAX_TAGS:
            raise InvalidInput(f"{where}: 'tags' must be an object of at most {MAX_TAGS} pairs; received {tags!r:.80}")
        ts = rec.get("ts")
        if ts is not None and (isinstance(ts, bool) or not isinstance(ts, (int, float))):
            raise InvalidInput(f"{where}: 'ts' must be unix seconds or null; received {ts!r}")
        return Frame(
            image=read_image(self.root / image),
            frame_id=image,
            human_action=human,
            tags={str(k): str(v) for k, v in tags.items()},
            ts=float(ts) if ts is not None else None,
            human_boxes=None if rec.get("human_boxes") is None else human_boxes(rec["human_boxes"], where),
        )


def human_boxes(value: Any, where: str) -> Detection:
    """The objects a person marked, ``[[x1, y1, x2, y2, class], ...]`` normalised to [0, 1], as a Detection."""
    from fleet.errors import ProtocolError
    from fleet.protocol import Box, Detection

    if not isinstance(value, list) or not all(isinstance(b, list) and len(b) == 5 for b in value):
        raise InvalidInput(f"{where}: 'human_boxes' must be a list of [x1, y1, x2, y2, class]; received {value!r:.80}")
    try:
        out = Detection([Box(float(b[0]), float(b[1]), float(b[2]), float(b[3]), b[4]) for b in value])
        out.validate()
    except (ProtocolError, TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: 'human_boxes': {exc}") from exc
    return out


def read_image(path: Path) -> NDArray[Any]:
    """Decode an image file to uint8 HxW (grayscale) or HxWx3 (colour; alpha and palettes flattened)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            im: Image.Image = opened
            if im.mode not in ("L", "RGB"):
                im = im.convert("L" if im.mode in ("1", "I", "I;16", "F", "LA") else "RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError as exc:
        raise InvalidInput(f"image {path} does not exist") from exc
    except (OSError, UnidentifiedImageError) as exc:
        raise InvalidInput(f"image {path} cannot be decoded: {exc}") from exc
    return check_image(arr, str(path))


def encode_png(image: NDArray[Any]) -> bytes:
    """PNG bytes of a uint8 HxW or HxWxC frame (fast compression: frames are spooled at run time)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
