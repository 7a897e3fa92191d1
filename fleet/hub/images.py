"""Image checks before a device's PNG is stored: whole structure, bounded pixels, bounded inflate, and a real decode.

What is stored here reaches annotators' browsers and the trainer, so nothing may be a decompression
bomb. The check runs in four steps, each cheap and each bounded before the next one starts:

1. structure: signature, IHDR, every chunk's CRC, IDAT present, nothing after IEND;
2. size from the header: each side at most ``max_side`` and ``width * height`` at most ``max_pixels``;
3. inflate: the IDAT stream is decompressed in 1 MiB steps and must yield exactly the bytes the
   header implies (rows, filter bytes, Adam7 passes), so a 1x1 image whose data inflates to
   100 MB stops after the first few bytes past what it may hold;
4. decode: Pillow decodes the pixels, which refuses bad filters and other damage a CRC cannot see.

Every refusal is a :class:`~fleet.errors.UnsupportedMedia` (415) that says what was received and what was
expected.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import NoReturn

from fleet.errors import UnsupportedMedia

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # PNG colour type -> samples per pixel
_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_STEP = 1 << 20


def check_png(data: bytes, *, max_side: int, max_pixels: int) -> tuple[int, int]:
    """Raise 415 unless ``data`` is one whole, decodable PNG of bounded size; return (width, height)."""
    width, height, color, depth, interlace, idat = _structure(data)
    if not (0 < width <= max_side and 0 < height <= max_side):
        _refuse(f"image is {width}x{height} pixels; expected 1..{max_side} on each side")
    if width * height > max_pixels:
        _refuse(f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels")
    if color not in _CHANNELS or depth not in _BIT_DEPTHS[color] or interlace not in (0, 1):
        _refuse(f"image header is not a valid PNG header (colour type {color}, bit depth {depth}, "
                f"interlace {interlace})")
    expected = raw_size(width, height, bits_per_pixel=_CHANNELS[color] * depth, interlaced=interlace == 1)
    _check_inflate(idat, expected, f"{width}x{height}")
    _check_decode(data, width, height)
    return width, height


def raw_size(width: int, height: int, *, bits_per_pixel: int, interlaced: bool) -> int:
    """Bytes the IDAT stream inflates to for this header: filtered rows (one filter byte each), per Adam7 pass."""
    if not interlaced:
        return height * (1 + (width * bits_per_pixel + 7) // 8)
    total = 0
    for x0, y0, dx, dy in _ADAM7:
        w = (width - x0 + dx - 1) // dx if width > x0 else 0
        h = (height - y0 + dy - 1) // dy if height > y0 else 0
        if w and h:
            total += h * (1 + (w * bits_per_pixel + 7) // 8)
    return total


def _structure(data: bytes) -> tuple[int, int, int, int, int, list[memoryview]]:
    """Walk the chunks (checking each CRC); return the header fields and the IDAT payloads."""
    if not data.startswith(PNG_MAGIC):
        _refuse(f"image must be PNG bytes (starting {PNG_MAGIC!r}); received {len(data)} bytes starting {data[:8]!r}")
    if len(data) < 33 or data[12:16] != b"IHDR":
        _refuse("image is a truncated PNG: no IHDR chunk")
    width, height, depth, color, _compression, _filter, interlace = struct.unpack(">IIBBBBB", data[16:29])
    view = memoryview(data)
    idat: list[memoryview] = []
    pos, n = 8, len(data)
    while True:
        if pos + 12 > n:
            _refuse(f"image is a truncated PNG: chunk header at byte {pos} of {n}")
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        end = pos + 8 + length
        if end + 4 > n:
            _refuse(f"image is a truncated PNG: chunk {kind!r} runs past the end")
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(view[pos + 4 : end]) != crc:
            _refuse(f"image is a corrupt PNG: bad CRC in chunk {kind!r}")
        if kind == b"IDAT":
            idat.append(view[pos + 8 : end])
        pos = end + 4
        if kind == b"IEND":
            break
    if not idat:
        _refuse("image is a PNG without pixel data (no IDAT chunk)")
    if pos != n:
        _refuse(f"image has {n - pos} bytes after the PNG's IEND chunk")
    return int(width), int(height), color, depth, interlace, idat


def _check_inflate(idat: list[memoryview], expected: int, shape: str) -> None:
    """Inflate the pixel data in bounded steps: it must come to exactly ``expected`` bytes."""
    d = zlib.decompressobj()
    total = 0
    try:
        for chunk in idat:
            buf: bytes | memoryview = chunk
            while buf:
                out = d.decompress(buf, min(_STEP, expected - total + 1))
                total += len(out)
                if total > expected:
                    _refuse(f"image pixel data inflates to more than {expected} bytes, the size of a {shape} "
                            f"image of this type (a decompression bomb?)")
                buf = d.unconsumed_tail
                if d.eof:
                    break
    except zlib.error as exc:
        _refuse(f"image pixel data does not decompress ({exc})")
    if total < expected or not d.eof:
        _refuse(f"image pixel data inflates to {total} bytes; a {shape} image of this type needs {expected}")


def _check_decode(data: bytes, width: int, height: int) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if im.size != (width, height):
                _refuse(f"image decodes to {im.size[0]}x{im.size[1]} pixels but its header says {width}x{height}")
            im.load()
    except UnsupportedMedia:
        raise
    except Exception as exc:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError... for damage
        _refuse(f"image does not decode as a PNG ({type(exc).__name__}: {str(exc)[:200]})")


def _refuse(detail: str) -> NoReturn:
    raise UnsupportedMedia(detail)
