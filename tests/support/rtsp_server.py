"""A real RTSP server on loopback for the video-source tests: GStreamer's RTSP server (gst-rtsp-server).

Run with Debian's interpreter, which has the GObject bindings (``python3-gi``, ``gir1.2-gst-rtsp-server-1.0``,
GStreamer's base, good and ugly plugins): ``/usr/bin/python3 tests/support/rtsp_server.py --port 8554``.
scripts/services.sh starts it for the test command. Every client gets its own pipeline (a fresh stream that
starts on a key frame), with a ball moving over a 64x48 test pattern at 15 frames/s:

- ``/h264``: H.264 (x264, zero latency), the codec most IP cameras send;
- ``/mjpeg``: Motion JPEG (RFC 2435), what cheaper cameras send;
- ``/frames`` (with ``--frames DIR``): the PNG files ``DIR/00000.png``, ``DIR/00001.png``, ... over and over as
  H.264, for tests that need to know what the camera shows.

It prints ``ready rtsp://127.0.0.1:PORT`` once it listens and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

SOURCE = ("videotestsrc is-live=true pattern=ball ! video/x-raw,width={w},height={h},framerate={fps}/1 "
          "! videoconvert ! video/x-raw,format=I420")
MOUNTS = {
    "/h264": "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} ! rtph264pay name=pay0 pt=96 "
             "config-interval=-1",
    "/mjpeg": "jpegenc quality=85 ! rtpjpegpay name=pay0 pt=26",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--height", type=int, default=48)
    ap.add_argument("--fps", type=int, default=15)
    ap.add_argument("--frames", default="", help="a folder of 00000.png, 00001.png, ... to serve at /frames")
    args = ap.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    source = SOURCE.format(w=args.width, h=args.height, fps=args.fps)
    launches = {path: f"( {source} ! {tail.format(fps=args.fps)} )" for path, tail in MOUNTS.items()}
    if args.frames:
        pngs = (f'multifilesrc location="{args.frames}/%05d.png" loop=true caps=image/png,framerate={args.fps}/1 '
                f"! pngdec ! videoconvert ! video/x-raw,format=I420")
        launches["/frames"] = f"( {pngs} ! {MOUNTS['/h264'].format(fps=args.fps)} )"
    for path, launch in launches.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch)
        factory.set_shared(False)
        mounts.add_factory(path, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{args.port}")
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"ready rtsp://127.0.0.1:{args.port}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
