"""Images are decoded with bounded pixels and bounded inflate before they are stored: no decompression bombs."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest

from fleet.errors import UnsupportedMedia, status_for
from fleet.hub.images import check_png, raw_size
from tests.hub.conftest import HubHarness, png_bytes
from tests.hub.test_cases import _counts

LIMITS = {"max_side": 4096, "max_pixels": 2048 * 2048}


def chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def handmade_png(width: int, height: int, idat: bytes, *, color: int = 0, depth: int = 8, interlace: int = 0) -> bytes:
    """A PNG with correct CRCs around whatever IDAT payload it is given."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def rgba_bomb(side: int = 4096) -> bytes:
    """A side x side RGBA PNG of zeros: tiny on the wire, side*side*4 bytes decoded."""
    row = b"\0" * (1 + 4 * side)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    return handmade_png(side, side, data, color=6)


def inflate_bomb(megabytes: int = 100) -> bytes:
    """A 1x1 grey PNG whose IDAT inflates to ``megabytes`` MB."""
    comp = zlib.compressobj(9)
    block = b"\0" * (1 << 20)
    data = b"".join(comp.compress(block) for _ in range(megabytes)) + comp.flush()
    return handmade_png(1, 1, data)


def undecodable(side: int = 28) -> bytes:
    """A 28x28 PNG with valid CRCs whose pixel data is random bytes (not a zlib stream)."""
    return handmade_png(side, side, np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes())


def bad_filters(side: int = 28) -> bytes:
    """Inflates to exactly the right size, but every row starts with filter type 9 (there are 0..4)."""
    return handmade_png(side, side, zlib.compress((b"\x09" + b"\0" * side) * side))


def test_real_pngs_pass_in_every_mode() -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for mode, shape in (("L", (20, 30)), ("RGB", (20, 30, 3)), ("RGBA", (7, 5, 4)), ("I;16", (9, 11))):
        arr = rng.integers(0, 255, shape, dtype=np.uint16 if mode == "I;16" else np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")  # the mode follows the array
        h, w = shape[:2]
        assert check_png(buf.getvalue(), **LIMITS) == (w, h), mode
    for w, h in ((8, 8), (5, 3), (1, 1), (13, 2)):  # Adam7-interlaced (Pillow writes none; made by hand)
        size = raw_size(w, h, bits_per_pixel=8, interlaced=True)
        assert check_png(handmade_png(w, h, zlib.compress(b"\0" * size), interlace=1), **LIMITS) == (w, h)
    pal = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).convert("P")
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    assert check_png(buf.getvalue(), **LIMITS) == (8, 8)


def test_raw_size_of_interlaced_images_counts_each_pass() -> None:
    assert raw_size(1, 1, bits_per_pixel=8, interlaced=False) == 2
    assert raw_size(1, 1, bits_per_pixel=8, interlaced=True) == 2  # only the first pass has pixels
    assert raw_size(8, 8, bits_per_pixel=8, interlaced=True) == sum(
        h * (1 + w) for w, h in ((1, 1), (1, 1), (2, 1), (2, 2), (4, 2), (4, 4), (8, 4)))


@pytest.mark.parametrize(("make", "needle"), [
    (rgba_bomb, "16777216 pixels; the limit is 4194304"),
    (inflate_bomb, "inflates to more than 2 bytes"),
    (undecodable, "does not decompress"),
    (bad_filters, "does not decode"),
    (lambda: handmade_png(28, 28, zlib.compress(b"\0" * 100)), "needs 812"),  # too little pixel data
    (lambda: handmade_png(28, 28, zlib.compress(b"\0" * 812), color=5), "colour type 5"),
])
def test_bombs_and_damage_are_refused(make: object, needle: str) -> None:
    with pytest.raises(UnsupportedMedia) as info:
        check_png(make(), **LIMITS)  # type: ignore[operator]
    assert status_for(info.value) == 415 and needle in str(info.value), info.value


@pytest.mark.parametrize("make", [rgba_bomb, inflate_bomb, undecodable])
def test_the_hub_refuses_each_bomb_with_415_and_stores_nothing(hub: HubHarness, make: object) -> None:
    data = make()  # type: ignore[operator]
    case, _ = hub.make_case("d1", image=data)
    r = hub.post_case(case, data)
    assert r.status_code == 415, r.text
    assert _counts(hub) == (0, 0, 0)


def test_the_pixel_limit_is_a_setting(hub_factory: object) -> None:
    hub: HubHarness = hub_factory(max_image_pixels=100)  # type: ignore[operator]
    hub.register_model("m1", promote=True)
    hub.enroll("d1")
    ok, big = png_bytes(1, size=10), png_bytes(2, size=11)
    for image, status in ((ok, 201), (big, 415)):
        case, _ = hub.make_case("d1", image=image)
        r = hub.post_case(case, image)
        assert r.status_code == status, r.text
    assert "121 pixels; the limit is 100" in r.json()["detail"]
