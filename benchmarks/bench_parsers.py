"""The hub's two hand-written parsers on the ingest hot path against the well-kept libraries, in one run.

Issue 14 asks for python-multipart and Pillow wherever they do the job, keeping a hand-written hot path
only if the library is measurably slower. What is compared, on the same bodies, interleaved:

* **multipart**: ``fleet.hub.multipart.parse_form`` (``bytes.split`` over a body already in memory) vs
  python-multipart's ``MultipartParser`` fed the same body, collecting the same parts, for a single
  case upload (a Case JSON and a 28x28 PNG) and a batch of 16;
* **PNG**: ``fleet.hub.images.check_png`` (chunk walk with CRCs, bounded inflate, then a Pillow decode)
  vs Pillow alone (open, the header's size against the pixel limit, ``load()``), on a 28x28 grey, a 96x96
  RGB and a 640x480 RGB frame. Both refuse the decompression bombs of issue 13 (checked here too, and
  what each lets through is printed).

Each figure is the median of ``--repeats`` rounds of ``--n`` calls after a warm-up; the ratio library /
hand-written is what counts (> 1: the library is slower).

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_parsers.py [--n 2000] [--repeats 7] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import append  # noqa: E402
from fleet.hub.images import check_png  # noqa: E402
from fleet.hub.multipart import parse_form  # noqa: E402

MAX_SIDE, MAX_PIXELS = 4096, 4_000_000


def png(shape: tuple[int, ...], seed: int = 0) -> bytes:
    from PIL import Image

    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def multipart_body(parts: list[tuple[str, bytes, str | None]]) -> tuple[bytes, str]:
    boundary = "----flywheelbench7MA4YWxkTrZu0gW"
    out = bytearray()
    for name, data, filename in parts:
        out += f"--{boundary}\r\n".encode()
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"Content-Disposition: {disp}\r\n".encode()
        out += b"Content-Type: " + (b"image/png" if filename else b"application/json") + b"\r\n\r\n"
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f"multipart/form-data; boundary={boundary}"


def library_form(body: bytes, content_type: str) -> dict[str, bytes]:
    """python-multipart's parser, collecting whole parts by name (what parse_form returns)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    parts: dict[str, bytes] = {}
    state: dict[str, Any] = {"name": None, "buf": bytearray(), "header": b"", "field": b""}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["header"] += data[start:end]

    def on_header_end() -> None:
        if state["field"].lower() == b"content-disposition":
            _, opts = parse_options_header(state["header"])
            state["name"] = opts[b"name"].decode()
        state["field"], state["header"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["buf"] += data[start:end]

    def on_part_end() -> None:
        parts[state["name"]] = bytes(state["buf"])
        state["buf"] = bytearray()

    parser = MultipartParser(params[b"boundary"], callbacks={
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_part_data": on_part_data, "on_part_end": on_part_end})
    parser.write(body)
    parser.finalize()
    return parts


def pillow_check(data: bytes) -> tuple[int, int]:
    """Pillow alone: open (the signature and the header), refuse a size over the limits, decode."""
    from PIL import Image

    with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
        w, h = im.size
        if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE) or w * h > MAX_PIXELS:
            raise ValueError(f"{w}x{h}")
        im.load()
    return w, h


def timed(fn: Callable[[], Any], n: int, repeats: int) -> float:
    """Median microseconds per call."""
    for _ in range(max(n // 10, 5)):
        fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rounds.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(rounds)


def bombs() -> dict[str, bytes]:
    """The three images issue 13 found accepted: huge RGBA, a 1x1 whose data inflates to 100 MB, garbage."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    def raw_png(w: int, h: int, color: int, payload: bytes) -> bytes:
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
                + chunk(b"IDAT", payload) + chunk(b"IEND", b""))

    return {
        "4096x4096 RGBA": raw_png(4096, 4096, 6, zlib.compress(bytes(4096 * (1 + 4096 * 4)), 9)),
        "1x1 inflating to 100 MB": raw_png(1, 1, 0, zlib.compress(bytes(100_000_000), 9)),
        "28x28 undecodable": raw_png(28, 28, 0, zlib.compress(b"\x07" * (28 * 29), 9)),
    }


def refuses(fn: Callable[[bytes], Any], data: bytes) -> bool:
    try:
        fn(data)
    except Exception:  # noqa: BLE001 - any refusal counts
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="calls per round")
    ap.add_argument("--repeats", type=int, default=7, help="rounds (the median is reported)")
    ap.add_argument("--append", type=Path, default=None, help="append the table to this markdown file")
    args = ap.parse_args(argv)

    case_json = (b'{"case_id":"c-1","device_id":"d-1","captured_at":1.0,"model_version":"m1","prediction":'
                 b'{"task":"classify","label":1,"probs":[0.1,0.7,0.2]},' + b'"tags":{"condition":"night"},' * 1
                 + b'"embedding":"' + b"A" * 344 + b'"}')
    image = png((28, 28))
    single = multipart_body([("case", case_json, None), ("image", image, "f.png")])
    batch = multipart_body([p for i in range(16) for p in ((f"case_{i}", case_json, None),
                                                           (f"image_{i}", png((28, 28), i), f"i{i}.png"))])
    rows = []
    for what, (body, ctype), parts in (("multipart, 1 case", single, 2), ("multipart, batch of 16", batch, 32)):
        assert len(parse_form(body, ctype, max_parts=parts)) == parts == len(library_form(body, ctype))
        ours = timed(lambda b=body, c=ctype, p=parts: parse_form(b, c, max_parts=p), args.n, args.repeats)
        lib = timed(lambda b=body, c=ctype: library_form(b, c), args.n, args.repeats)
        rows.append((what, "python-multipart", ours, lib))
    for what, data in (("PNG 28x28 grey", png((28, 28))), ("PNG 96x96 RGB", png((96, 96, 3))),
                       ("PNG 640x480 RGB", png((480, 640, 3)))):
        n = args.n if len(data) < 50_000 else max(args.n // 20, 20)
        ours = timed(lambda d=data: check_png(d, max_side=MAX_SIDE, max_pixels=MAX_PIXELS), n, args.repeats)
        lib = timed(lambda d=data: pillow_check(d), n, args.repeats)
        rows.append((what, "Pillow alone", ours, lib))

    lines = ["| input | library | hand-written (µs/call) | library (µs/call) | library / hand-written |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {w} | {lib_name} | {o:.1f} | {li:.1f} | {li / o:.2f} |" for w, lib_name, o, li in rows]
    lines += ["", "| bomb | refused by check_png | refused by Pillow alone |", "|---|---|---|"]
    for name, data in bombs().items():
        ours = refuses(lambda d: check_png(d, max_side=MAX_SIDE, max_pixels=MAX_PIXELS), data)
        lib = refuses(pillow_check, data)
        lines.append(f"| {name} | {'yes' if ours else 'NO'} | {'yes' if lib else 'NO'} |")
    table = "\n".join(lines)
    print(table)
    if args.append:
        append(args.append, "Ingest parsers: hand-written vs python-multipart and Pillow (issue 14)", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
