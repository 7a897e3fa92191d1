"""The dashboard's fleet page over a large fleet: a page of 100 devices (and the fleet's counts from SQL) against
the whole fleet on one page, as the page listed it before, in one run.

For each fleet size, devices are written straight into a fresh SQLite hub (each with one boot's heartbeat
state, whose evictions the page sums), an admin logs in, and ``GET /ui/fleet`` is timed through the app in this
process (Starlette's test client: no network). The baseline is the same page listing the whole fleet, read as
the page read it before it was paged (every device and every heartbeat state at once). Figures: the median of
``--repeat`` requests, and the page's bytes. The ratio paged / whole is what counts.

Run (from the repository root)::

    .venv/bin/python benchmarks/bench_dashboard.py [--devices 1000,10000,100000] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlmodel import select  # noqa: E402

from benchmarks._common import append, started_hub  # noqa: E402
from fleet.hub.db import write_session  # noqa: E402
from fleet.hub.models import Device, HeartbeatState  # noqa: E402
from fleet.hub.routes.devices import DevicePage, device_page  # noqa: E402
from fleet.hub.ui import pages  # noqa: E402
from fleet.protocol import DevicePublic  # noqa: E402


def hub_with(n: int, tmp: Path) -> Any:
    """A logged-in test client of a fresh SQLite hub holding ``n`` devices in 20 groups."""
    client = started_hub(f"sqlite:///{tmp / 'hub.sqlite'}", tmp)
    hub = client.app.state.hub
    with write_session(hub.engine) as s:
        for i in range(n):
            device_id = f"cam-{i:07d}"
            s.add(Device(device_id=device_id, group=f"site-{i % 20:02d}", enrolled_at=1.0, last_seen_at=2.0 + i,
                         model_version=f"m{i % 3}", spool_bytes=4096, spool_items=2))
            s.add(HeartbeatState(device_id=device_id, boot_id="boot-1", values={"evicted": i % 7}, sent_at=2.0,
                                 received_at=2.0))
    r = client.post("/ui/login", data={"token": hub.settings.admin_token.get_secret_value()}, follow_redirects=False)
    if r.status_code != 303:
        raise SystemExit(f"the benchmark's login was refused: {r.status_code} {r.text[:200]}")
    return client


def whole_fleet(s: Any, **_: Any) -> DevicePage:
    """The page's rows as the hub read them before: every device, and every heartbeat state at once."""
    summed: dict[str, dict[str, int]] = {}
    for device_id, values in s.exec(select(HeartbeatState.device_id, HeartbeatState.values)).all():
        acc = summed.setdefault(device_id, {})
        for k in ("evicted", "human_compared", "human_disagreed"):
            acc[k] = acc.get(k, 0) + int(values.get(k, 0))
    devices = [DevicePublic(device_id=d.device_id, group=d.group, enrolled_at=d.enrolled_at, revoked_at=d.revoked_at,
                            last_seen_at=d.last_seen_at, model_version=d.model_version, boot_id=d.boot_id,
                            spool_bytes=d.spool_bytes, spool_items=d.spool_items, **summed.get(d.device_id, {}))
               for d in s.exec(select(Device).order_by(Device.device_id)).all()]
    return DevicePage(devices, len(devices))


def timed(client: Any, repeat: int) -> tuple[float, int]:
    """(median seconds, bytes) of ``GET /ui/fleet``."""
    times, size = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        r = client.get("/ui/fleet")
        times.append(time.perf_counter() - t)
        if r.status_code != 200:
            raise SystemExit(f"GET /ui/fleet answered {r.status_code}: {r.text[:200]}")
        size = len(r.content)
    return statistics.median(times), size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1000,10000,100000", help="fleet sizes, comma-separated")
    ap.add_argument("--repeat", type=int, default=5, help="requests timed per side (the median is reported)")
    ap.add_argument("--append", type=Path, help="append the table to this RESULTS.md")
    args = ap.parse_args()
    shown = pages.DEVICES_SHOWN
    rows = []
    for n in [int(s) for s in args.devices.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            client = hub_with(n, Path(tmp))
            try:
                paged_s, paged_b = timed(client, args.repeat)
                # the baseline: the whole fleet on one page, read as the page read it before (every device, and
                # every heartbeat state, at once)
                pages.DEVICES_SHOWN, pages.device_page = n, whole_fleet
                try:
                    whole_s, whole_b = timed(client, args.repeat)
                finally:
                    pages.DEVICES_SHOWN, pages.device_page = shown, device_page
            finally:
                client.__exit__(None, None, None)
        rows.append((n, paged_s, paged_b, whole_s, whole_b))
        print(f"{n} devices: a page of {shown} {paged_s * 1000:.0f} ms {paged_b / 1024:.0f} KiB; the whole fleet "
              f"{whole_s * 1000:.0f} ms {whole_b / 1024:.0f} KiB", flush=True)
    lines = [f"| devices | page of {shown}: ms | KiB | whole fleet on one page: ms | KiB | time, paged / whole | "
             "bytes, paged / whole |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, ps, pb, ws, wb in rows:
        lines.append(f"| {n:,} | {ps * 1000:.0f} | {pb / 1024:.0f} | {ws * 1000:.0f} | {wb / 1024:.0f} | "
                     f"{ps / ws:.3f} | {pb / wb:.3f} |")
    body = "\n".join(lines) + (
        f"\n\n`GET /ui/fleet` through the app in one process (SQLite, Starlette's test client), the median of "
        f"{args.repeat} requests each; every device has one boot's heartbeat state. The whole-fleet side is the same "
        "page listing every device, read as before the page was paged (every device and heartbeat state at once).\n")
    print(body)
    if args.append:
        append(args.append, "Dashboard: the fleet page a page at a time vs the whole fleet (bench_dashboard.py)", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
