"""Video sources (fleet/edge/video.py) on files the tests encode, an HTTP server, a lavfi "camera", and a real RTSP
server on loopback (GStreamer's, started by scripts/test.sh), with network cuts and server restarts."""

from __future__ import annotations

import functools
import http.server
import io
import itertools
import logging
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import av
import numpy as np
import pytest
from PIL import Image

from fleet.edge.config import SourceConfig, config_from_dict, source_from_spec
from fleet.edge.sources import Frame, open_source
from fleet.edge.video import LiveSource, RateCap, VideoFileSource, open_video, redact
from fleet.errors import InvalidInput, NotFound, PermanentError, TransportError
from fleet.retry import RetryPolicy
from tests.edge.conftest import DEVICE, Keys, assign, client, publish
from tests.edge.test_agent import stored
from tests.support.inproc import InProcHub
from tests.support.services import missing_service
from tests.support.tcpproxy import TcpProxy
from tests.support.video import CODECS, SQUARE, square_x, write_clip

FAST_RETRY = RetryPolicy(attempts=10_000, base_s=0.05, cap_s=0.3, deadline_s=20.0)


@pytest.fixture(scope="session")
def rtsp_base() -> str:
    url = os.environ.get("FLYWHEEL_TEST_RTSP_URL", "")
    if not url:
        missing_service("no RTSP server: FLYWHEEL_TEST_RTSP_URL is not set (scripts/test.sh starts one)")
    return url.rstrip("/")


def square_left(image: np.ndarray) -> int:
    """The left edge of the red square in an RGB frame (its red-and-not-green pixels)."""
    mask = (image[:, :, 0] > 128) & (image[:, :, 1] < 100)
    cols = np.flatnonzero(mask.any(axis=0))
    assert cols.size, "no red square in the frame"
    return int(cols[0])


def strictly_increasing(values: list[Any]) -> bool:
    return all(b > a for a, b in itertools.pairwise(values))


# -- the rate cap ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("fps", "kept_per_30"), [(0, 30), (10, 10), (12, 12), (15, 15), (30, 30), (60, 30)])
def test_rate_cap_keeps_at_most_fps_frames_a_second(fps: float, kept_per_30: int) -> None:
    cap = RateCap(fps)
    t = np.arange(90) / 30  # 3 s at 30 fps
    kept = t[[cap.keep(float(x)) for x in t]]
    assert len(kept) == 3 * kept_per_30
    for start in np.arange(0, 3, 0.05):  # any window of w seconds holds at most fps * w + 1 kept frames
        for w in (0.1, 0.25, 1.0):
            n = np.count_nonzero((kept >= start) & (kept < start + w))
            assert n <= (fps or 30) * w + 1


def test_rate_cap_restarts_after_a_gap_instead_of_bursting() -> None:
    cap = RateCap(10)
    assert [cap.keep(t) for t in (0.0, 0.05, 0.1)] == [True, False, True]
    assert [cap.keep(t) for t in (5.0, 5.033, 5.066, 5.1)] == [True, False, False, True]
    with pytest.raises(InvalidInput, match=r"max_fps must be a finite number >= 0 \(0: no cap\); received -1"):
        RateCap(-1)


# -- files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", list(CODECS))
def test_video_file_frames_are_rgb_in_order_with_the_encoded_timestamps(tmp_path: Path, codec: str) -> None:
    clip = write_clip(tmp_path / f"clip{CODECS[codec]}", codec=codec, frames=12, fps=12)
    src = VideoFileSource(clip.path)
    frames = list(src)
    assert len(frames) == 12 and src.stats.delivered == 12
    assert [f.index for f in frames] == list(range(12))
    assert [f.stream_time for f in frames] == pytest.approx(clip.times(), abs=1e-9)
    assert all(f.stream == str(clip.path) and f.frame_id == f"{clip.path.name}:{f.index}" for f in frames)
    assert all(f.ts is None for f in frames)  # no creation_time: the agent stamps them
    for f in frames:
        assert f.image.dtype == np.uint8 and f.image.shape == (48, 64, 3) and f.image.flags.c_contiguous
        assert abs(square_left(f.image) - square_x(f.index)) <= 1  # the red square moves right, in RGB order


def test_gray_scaled_and_creation_time(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mp4", frames=6, fps=12, creation_time="2024-05-01T12:00:00.000000Z")
    gray = list(VideoFileSource(clip.path, channels=1))
    assert gray[0].image.shape == (48, 64)
    y = (48 - SQUARE) // 2 + SQUARE // 2
    assert gray[2].image[y, square_x(2) + 2] > 40 > gray[2].image[2, 60]  # red shows as mid gray on black
    half = list(VideoFileSource(clip.path, width=32))
    assert half[0].image.shape == (24, 32, 3)  # the aspect ratio kept
    assert list(VideoFileSource(clip.path, width=20, height=10))[0].image.shape == (10, 20, 3)
    assert [f.ts for f in gray] == pytest.approx([1714564800.0 + t for t in clip.times()])


def test_rate_cap_on_a_file_uses_stream_time(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c30.mp4", frames=30, fps=30)
    src = VideoFileSource(clip.path, max_fps=10)
    frames = list(src)
    assert [f.index for f in frames] == list(range(0, 30, 3))
    assert (src.stats.decoded, src.stats.delivered, src.stats.capped) == (30, 10, 20)
    assert np.diff([f.stream_time for f in frames]) == pytest.approx(0.1, abs=1e-6)
    assert len(list(VideoFileSource(clip.path, max_fps=12))) == 12  # 2 frames in 5


def test_a_looped_file_goes_on_with_increasing_index_and_stream_time(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mkv", codec="mjpeg", frames=5, fps=10)
    frames = list(itertools.islice(VideoFileSource(clip.path, loop=True), 13))
    assert [f.index for f in frames] == list(range(13))
    assert strictly_increasing([f.stream_time for f in frames])
    assert np.diff([f.stream_time for f in frames]) == pytest.approx(0.1, abs=2e-3)
    assert np.array_equal(frames[5].image, frames[0].image)  # the second pass is the same footage
    assert len(list(VideoFileSource(clip.path))) == 5  # without loop, a file that ends just ends


def test_a_folder_of_videos_is_read_in_name_order_each_its_own_stream(tmp_path: Path) -> None:
    write_clip(tmp_path / "b.webm", codec="libvpx", frames=3, fps=10)
    write_clip(tmp_path / "a.mp4", frames=4, fps=10)
    (tmp_path / "notes.txt").write_text("not a video")
    frames = list(open_source("video", tmp_path))
    assert [f.frame_id for f in frames] == ["a.mp4:0", "a.mp4:1", "a.mp4:2", "a.mp4:3", "b.webm:0", "b.webm:1",
                                            "b.webm:2"]
    assert {f.stream for f in frames} == {str(tmp_path / "a.mp4"), str(tmp_path / "b.webm")}
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match=r"video folder .*empty holds no \.mp4/"):
        VideoFileSource(tmp_path / "empty")
    with pytest.raises(InvalidInput, match=r"video file or folder .*nowhere does not exist"):
        VideoFileSource(tmp_path / "nowhere")


def test_unreadable_files_are_refused_with_what_was_expected(tmp_path: Path) -> None:
    (tmp_path / "garbage.mp4").write_bytes(os.urandom(4096))
    with pytest.raises(InvalidInput, match=r"garbage.mp4: cannot be opened as a video \(Invalid data found"):
        list(VideoFileSource(tmp_path / "garbage.mp4"))
    with av.open(str(tmp_path / "tone.wav"), "w") as out:  # audio only
        stream = out.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    with pytest.raises(InvalidInput, match=r"tone.wav: has no video stream \(found: audio \(pcm_s16le\)\); "
                                           "expected at least one video stream"):
        list(VideoFileSource(tmp_path / "tone.wav"))
    clip = write_clip(tmp_path / "c.avi", codec="mpeg4", frames=4)  # a codec tag FFmpeg does not know
    (tmp_path / "unknown.avi").write_bytes(clip.path.read_bytes().replace(b"FMP4", b"QQQQ"))
    with pytest.raises(InvalidInput, match=r"its video codec is not one this FFmpeg build decodes; expected a "
                                           "common codec such as h264"):
        list(VideoFileSource(tmp_path / "unknown.avi"))


def test_a_damaged_file_gives_the_frames_it_can_and_ends(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "c.mkv", codec="mjpeg", frames=20, fps=10)
    data = bytearray(clip.path.read_bytes())
    (tmp_path / "cut.mkv").write_bytes(data[: len(data) // 2])  # a recording cut off by a power loss
    cut = list(VideoFileSource(tmp_path / "cut.mkv"))
    assert 3 <= len(cut) < 20 and [f.index for f in cut] == list(range(len(cut)))
    mid = len(data) // 2  # garbage over a stretch in the middle: the decoder skips what it cannot read
    data[mid:mid + 2000] = os.urandom(2000)
    (tmp_path / "noisy.mkv").write_bytes(data)
    src = VideoFileSource(tmp_path / "noisy.mkv")
    noisy = list(src)
    assert 10 <= len(noisy) <= 20 and strictly_increasing([f.stream_time for f in noisy])


# -- live: HTTP, a lavfi "camera", bad addresses -----------------------------------------------------------


@pytest.fixture
def http_server(tmp_path: Path) -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_stream_and_its_errors(tmp_path: Path, http_server: str) -> None:
    clip = write_clip(tmp_path / "feed.ts", codec="libx264", frames=10, fps=10)
    src = LiveSource(f"{http_server}/feed.ts", retry=FAST_RETRY)
    frames = list(itertools.islice(src, 14))  # the server's file ends: the stream reconnects and goes on
    assert src.stats.connects == 2 and src.stats.drops == 1
    assert [f.index for f in frames] == list(range(14))
    assert strictly_increasing([f.stream_time for f in frames]) and strictly_increasing([f.ts for f in frames])
    assert abs(frames[0].ts - time.time()) < 30
    assert abs(square_left(frames[3].image) - square_x(3)) <= 1
    assert clip.frames == 10
    t0 = time.monotonic()
    with pytest.raises(NotFound, match=r"/missing.ts: no such stream \(Server returned 404 Not Found\)"):
        next(iter(LiveSource(f"{http_server}/missing.ts", retry=FAST_RETRY)))
    assert time.monotonic() - t0 < 5  # permanent: not retried until the deadline


def test_a_stream_that_cannot_connect_is_retried_then_refused_without_its_password() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    url = f"rtsp://viewer:hunter2@127.0.0.1:{port}/cam"
    policy = RetryPolicy(attempts=10_000, base_s=0.05, cap_s=0.1, deadline_s=0.6)
    src = LiveSource(url, retry=policy)
    with pytest.raises(TransportError) as err:
        next(iter(src))
    message = str(err.value)
    assert f"rtsp://viewer:***@127.0.0.1:{port}/cam" in message and "hunter2" not in message
    assert "gave up after" in message and "Connection refused" in message
    assert redact("http://u:p@h:8/x?y=1") == "http://u:***@h:8/x?y=1" and redact("rtsp://h/x") == "rtsp://h/x"
    for bad, why in (("ftp://h/x", "scheme in"), ("rtsp:/x", "scheme in"), ("/dev/video0", "scheme in")):
        with pytest.raises(InvalidInput, match=why):
            LiveSource(bad)


def test_camera_reads_a_live_device_capped_by_the_wall_clock() -> None:
    # lavfi's test source slowed to real time stands in for a v4l2 device: same code path, another format
    cam = LiveSource("testsrc=size=64x48:rate=30,realtime", kind="camera", format="lavfi", max_fps=10)
    t0 = time.monotonic()
    frames = list(itertools.islice(cam, 6))
    elapsed = time.monotonic() - t0
    assert len(frames) <= 10 * elapsed + 1  # never above the cap
    assert cam.stats.capped > 0 and strictly_increasing([f.index for f in frames])
    assert frames[0].stream == "camera:testsrc=size=64x48:rate=30,realtime" and frames[0].image.shape == (48, 64, 3)
    missing = LiveSource("/dev/video99", kind="camera", retry=RetryPolicy(attempts=3, base_s=0.01, cap_s=0.02))
    assert missing.format == "v4l2"
    with pytest.raises(TransportError, match=r"camera:/dev/video99: gave up after 3 failed connection attempt\(s\) "
                                             r".*\(No such file or directory\)"):
        next(iter(missing))  # a camera that is not there (yet) is retried: USB devices come and go


def test_stop_ends_a_reconnect_wait_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = LiveSource(f"rtsp://127.0.0.1:{port}/x", retry=RetryPolicy(attempts=10_000, base_s=5, cap_s=5,
                                                                       deadline_s=600))
    got: list[Frame] = []
    thread = threading.Thread(target=lambda: got.extend(src), daemon=True)
    thread.start()
    time.sleep(0.3)  # now waiting up to 5 s before the next try
    t0 = time.monotonic()
    src.stop()
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - t0 < 2 and got == []


# -- RTSP on loopback -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mount", ["h264", "mjpeg"])
def test_rtsp_stream_frames_and_timestamps(rtsp_base: str, mount: str) -> None:
    src = LiveSource(f"{rtsp_base}/{mount}", retry=FAST_RETRY)
    t0 = time.time()
    frames = list(itertools.islice(src, 20))
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [f.index for f in frames] == list(range(20))
    assert np.diff([f.stream_time for f in frames]) == pytest.approx(1 / 15, abs=2e-3)  # the server's 15 fps
    assert np.diff([f.ts for f in frames]) == pytest.approx(1 / 15, abs=2e-3)
    assert t0 <= frames[0].ts <= time.time()
    assert not np.array_equal(frames[0].image, frames[10].image)  # the ball moves
    assert frames[0].stream == f"{rtsp_base}/{mount}"
    with pytest.raises(NotFound, match="no such stream"):
        next(iter(LiveSource(f"{rtsp_base}/no-such-mount", retry=FAST_RETRY)))


def test_rtsp_network_cut_reconnects_with_backoff(rtsp_base: str) -> None:
    target = urlsplit(rtsp_base)
    with TcpProxy(target.hostname or "127.0.0.1", target.port or 554) as proxy:
        src = LiveSource(f"rtsp://127.0.0.1:{proxy.port}/h264", retry=FAST_RETRY, read_timeout_s=5)
        it = iter(src)
        before = [next(it) for _ in range(5)]
        proxy.cut(down_for=1.0)
        cut_at = time.time()
        after: list[Frame] = []
        for frame in it:  # frames FFmpeg had buffered come first, then the new connection's
            (after if src.stats.connects == 2 else before).append(frame)
            if len(after) == 5:
                break
    assert src.stats.drops == 1 and src.stats.connects == 2
    assert proxy.refused >= 1 and proxy.accepted == 2  # it kept trying while the link was down
    frames = before + after
    assert strictly_increasing([f.index for f in frames])
    assert strictly_increasing([f.stream_time for f in frames]) and strictly_increasing([f.ts for f in frames])
    assert after[0].ts >= cut_at + 0.5  # the new connection's frames were captured after the link came back
    assert after[0].stream_time - before[-1].stream_time >= 0.5


def test_rtsp_server_restart_is_survived(tmp_path: Path, rtsp_base: str) -> None:
    command = os.environ.get("FLYWHEEL_TEST_RTSP_SERVER", "")
    if not command:
        missing_service("FLYWHEEL_TEST_RTSP_SERVER is not set (scripts/test.sh sets it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen([*shlex.split(command), "--port", str(port)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().startswith("ready"), "RTSP server did not start"
        return proc

    servers = [start()]
    try:
        src = LiveSource(f"rtsp://127.0.0.1:{port}/mjpeg", retry=FAST_RETRY, read_timeout_s=5)
        it = iter(src)
        first = next(it)
        servers[0].kill()  # the camera loses power, and comes back a moment later
        servers[0].wait(5)
        restart = threading.Timer(0.8, lambda: servers.append(start()))
        restart.start()
        frame = next(it)
        while src.stats.connects < 2:
            frame = next(it)
        restart.join()
    finally:
        for proc in servers:
            proc.kill()
            proc.wait(5)
    assert src.stats.drops == 1 and frame.index > first.index and frame.stream_time > first.stream_time


# -- configuration, CLI and the agent ----------------------------------------------------------------------


def test_config_and_cli_spec_accept_the_video_kinds(tmp_path: Path) -> None:
    def cfg(**source: Any) -> SourceConfig:
        doc = {"device_id": "d", "hub": {"url": "http://h"}, "source": source}
        return config_from_dict(doc, base_dir=tmp_path).source

    s = cfg(kind="stream", url="rtsp://cam/1", max_fps=5, options={"rtsp_transport": "udp", "stimeout": 5})
    assert s.options == (("rtsp_transport", "udp"), ("stimeout", "5")) and s.target == "rtsp://cam/1"
    assert cfg(kind="video", path="clips").path == tmp_path / "clips"
    assert cfg(kind="camera", device="/dev/video0", channels=1).target == "/dev/video0"
    bad = [
        (dict(kind="stream", url="ftp://x/y"), "scheme in"),
        (dict(kind="stream"), "source.url is required for kind 'stream'"),
        (dict(kind="stream", url="rtsp://c/1", fps=5), "source.fps applies to kind .* a live source comes at its "
                                                         "own pace: source.max_fps caps it"),
        (dict(kind="video", path="x", url="rtsp://c/1"), "source.url applies to kind 'stream' only"),
        (dict(kind="npz", path="x", max_fps=3), "source.max_fps applies to kind 'video' or 'stream' or 'camera'"),
        (dict(kind="camera"), "source.device is required"),
        (dict(kind="camera", device="/dev/video0", channels=2), "channels must be 3 .* or 1 .*; received 2"),
        (dict(kind="stream", url="rtsp://c/1", reconnect_base_s=2, reconnect_max_s=1), "reconnect_max_s must be"),
        (dict(kind="stream", url="rtsp://c/1", options={"a": [1]}), "source.options.a must be a string or a number"),
        (dict(kind="webcam", path="x"), "source.kind must be one of"),
    ]
    for source, message in bad:
        with pytest.raises(InvalidInput, match=message):
            cfg(**source)
    base = cfg(kind="npz", path="f.npz", fps=5)
    assert source_from_spec("rtsp://u:p@cam/s", base, cwd=tmp_path) == SourceConfig(kind="stream", url="rtsp://u:p@cam/s")
    assert source_from_spec("video:clips", base, cwd=tmp_path).path == tmp_path / "clips"
    assert source_from_spec("video:clips", base, cwd=tmp_path).fps == 5
    assert source_from_spec("camera:/dev/video2", base, cwd=tmp_path).device == "/dev/video2"
    for spec in ("clips", "webcam:0", "camera:", "stream:ftp://x"):
        with pytest.raises(InvalidInput):
            source_from_spec(spec, base, cwd=tmp_path)


def test_agent_cli_reports_a_bad_source(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fleet.edge.cli import app

    (tmp_path / "agent.toml").write_text('device_id = "d"\n[hub]\nurl = "http://h"\n[source]\nkind = "npz"\n'
                                         'path = "f.npz"\n')
    result = CliRunner().invoke(app, ["run", "-c", str(tmp_path / "agent.toml"), "--source", "webcam:0"])
    assert result.exit_code == 2 and "--source must be KIND:PATH" in result.output


KEEP_ALL = {"id": "all", "version": 1, "rule": {"trigger": "entropy", "above": -1.0}}


def run_agent(tmp_path: Path, hub: InProcHub, keys: Keys, source: dict[str, Any], max_frames: int) -> Any:
    agent = video_agent(tmp_path, hub, keys, source)
    try:
        return agent.run(max_frames=max_frames)
    finally:
        agent.close()


def video_agent(tmp_path: Path, hub: InProcHub, keys: Keys, source: dict[str, Any]) -> Any:
    from fleet.edge.agent import Agent
    from fleet.protocol import Enrollment

    doc = {"device_id": DEVICE, "data_dir": "data", "hub": {"url": "http://hub.test"}, "source": source,
           "heartbeat": {"interval_s": 0.05}, "ota": {"poll_interval_s": 0.05},
           "runtime": {"trigger_window": 4}, "uplink": {"backoff_base_s": 0.02, "backoff_max_s": 0.1}}
    cfg = config_from_dict(doc, base_dir=tmp_path)
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    (cfg.data_dir / "enrollment.json").write_text(
        Enrollment(device_id=DEVICE, token=hub.tokens[DEVICE], fleet_public_key=keys.public_b64).to_json())
    return Agent(cfg, client=client(hub))


def test_agent_mines_a_video_file(tmp_path: Path, hub: InProcHub, keys: Keys, make_model: Any) -> None:
    v1 = make_model("v1", channels=3)
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    write_clip(tmp_path / "clip.mp4", frames=30, fps=30, creation_time="2024-05-01T12:00:00Z")
    summary = run_agent(tmp_path, hub, keys, {"kind": "video", "path": "clip.mp4", "max_fps": 10}, 1000)
    assert summary.stopped_by == "source-ended" and summary.frames == 10 and summary.uploaded == 10
    cases = stored(hub)
    captured = sorted(case.captured_at - 1714564800.0 for case, _ in cases)
    assert captured == pytest.approx([i / 10 for i in range(10)], abs=1e-6)
    _, png = cases[0]
    assert np.asarray(Image.open(io.BytesIO(png))).shape == (48, 64, 3)


def test_agent_mines_an_rtsp_stream_in_gray(tmp_path: Path, hub: InProcHub, keys: Keys, make_model: Any,
                                           rtsp_base: str) -> None:
    v1 = make_model("v1", channels=1)
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    t0 = time.time()
    summary = run_agent(tmp_path, hub, keys, {"kind": "stream", "url": f"{rtsp_base}/h264", "channels": 1}, 24)
    assert summary.stopped_by == "max-frames" and summary.frames == 24 and summary.uploaded == 24
    cases = sorted(stored(hub), key=lambda c: c[0].captured_at)
    assert t0 <= cases[0][0].captured_at <= cases[-1][0].captured_at <= time.time()
    assert np.asarray(Image.open(io.BytesIO(cases[0][1]))).shape == (48, 64)  # gray, as the model wants


def test_stopping_the_agent_ends_its_wait_for_a_stream(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                       make_model: Any) -> None:
    v1 = make_model("v1", channels=3)
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens: the agent waits to reconnect, up to 5 s between tries
    agent = video_agent(tmp_path, hub, keys, {"kind": "stream", "url": f"rtsp://127.0.0.1:{port}/cam",
                                              "reconnect_base_s": 5, "reconnect_max_s": 5})
    stopped: list[float] = []

    class StopWhileWaiting(logging.Handler):  # once the source waits to retry, stop the agent (as SIGTERM does)
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying in" in record.getMessage() and not stopped:
                stopped.append(time.monotonic())
                agent.stop()

    handler = StopWhileWaiting()
    logging.getLogger("fleet.retry").addHandler(handler)
    try:
        summary = agent.run()
    finally:
        logging.getLogger("fleet.retry").removeHandler(handler)
        agent.close()
    assert summary.stopped_by == "signal" and summary.frames == 0
    assert stopped and time.monotonic() - stopped[0] < 2  # not the up-to-5 s wait, nor the 300 s deadline


def test_video_kinds_are_permanent_errors_for_bad_input(tmp_path: Path) -> None:
    with pytest.raises(PermanentError):
        open_video(SourceConfig(kind="video", path=tmp_path / "none.mp4"))
    with pytest.raises(InvalidInput, match="source kind 'npz' takes no options"):
        open_source("npz", tmp_path / "x.npz", max_fps=3)
