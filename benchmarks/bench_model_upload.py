"""The hub's memory under concurrent bad model uploads: N trainers each POST a large ONNX file that does not
match its (validly signed) manifest, at once, against `flywheel hub serve` on loopback (SQLite, one worker).

Measures the hub process's resident memory before and at its peak while the uploads run (sampled every
50 ms from /proc), the answers, and the wall time. Run it with another checkout's interpreter to compare
with that code (the hub is started with the same interpreter as this script):

    .venv/bin/python benchmarks/bench_model_upload.py --mib 150 --uploads 3
    /path/to/other/.venv/bin/python benchmarks/bench_model_upload.py --mib 150 --uploads 3 --label baseline
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from fleet.signing import generate_keypair, load_private_key, sign_manifest  # noqa: E402
from fleet.sim.procs import start_hub, stop_process  # noqa: E402
from tests.support.models import make_model_files  # noqa: E402

BOUNDARY = "benchupload"


def rss_kib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) if match else 0


def upload(url: str, token: str, manifest: str, mib: int) -> int:
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{manifest}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"onnx\"; filename=\"m.onnx\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    block = os.urandom(1 << 20)

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(mib):
            yield block
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    with httpx.Client(timeout=600) as c:
        r = c.post(url + "/v1/models", content=body(), headers={
            "Authorization": f"Bearer {token}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    return r.status_code


def main(args: argparse.Namespace) -> str:
    pair = generate_keypair()
    key = load_private_key(pair.private_pem)
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        hub = start_hub(Path(tmp) / "hub", pair)
        try:
            token = hub.token("trainer")
            files = make_model_files(Path(tmp) / "m", "bench-up", private_key=key)
            assert files.signed is not None
            manifest = dataclasses.replace(files.signed.manifest, onnx_size=args.mib << 20, onnx_sha256="0" * 64)
            text = sign_manifest(manifest, key).to_json()
            time.sleep(1.0)
            base = peak = rss_kib(hub.process.pid)
            t0 = time.monotonic()
            with cf.ThreadPoolExecutor(args.uploads) as pool:
                futures = [pool.submit(upload, hub.url, token, text, args.mib) for _ in range(args.uploads)]
                while not all(f.done() for f in futures):
                    peak = max(peak, rss_kib(hub.process.pid))
                    time.sleep(0.05)
                codes = [f.result() for f in futures]
            wall = time.monotonic() - t0
        finally:
            stop_process(hub.process)
    row = (f"| {args.label} | {args.uploads} x {args.mib} MiB | {base / 1024:.0f} | {peak / 1024:.0f} | "
           f"{(peak - base) / 1024:.0f} | {','.join(map(str, codes))} | {wall:.1f} |")
    print("| code | uploads | RSS before MiB | RSS peak MiB | growth MiB | answers | seconds |")
    print("|---|---|---:|---:|---:|---|---:|")
    print(row)
    return row


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=150, help="size of each upload's ONNX part")
    ap.add_argument("--uploads", type=int, default=3, help="concurrent uploads")
    ap.add_argument("--label", default="this checkout", help="name of the code under test in the table")
    main(ap.parse_args())
