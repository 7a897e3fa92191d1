#!/usr/bin/env bash
# Install the test dependencies, start the real services the tests need (PostgreSQL, Label Studio, an RTSP
# server, an S3-compatible server) on loopback, then lint, type-check and run the whole suite. Exits non-zero on
# any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- system packages: PostgreSQL server, Chromium for the annotator-view tests, GStreamer's RTSP server
need_apt=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
# Debian's Chromium for playwright (driven through executable_path; `playwright install` is never run)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
# the RTSP server for the video-source tests: its Python bindings, videotestsrc (base), RTP payloaders and
# jpegenc (good), x264enc (ugly)
/usr/bin/python3 - 2>/dev/null <<'PY' || need_apt+=(python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)
import gi
gi.require_version("Gst", "1.0"); gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst
Gst.init(None)
assert all(Gst.ElementFactory.find(e) for e in ("videotestsrc", "x264enc", "rtph264pay", "jpegenc", "rtpjpegpay"))
PY
if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# --- Python packages, in the project's own virtualenv
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[all,dev]'

# --- real services on loopback
source scripts/services.sh
trap stop_services EXIT
start_postgres
start_label_studio
start_rtsp_server
start_s3

# --- lint, types, tests (a test whose service is missing fails instead of skipping)
export FLYWHEEL_TEST_SERVICES=required
.venv/bin/ruff check fleet trigger labeling training tests benchmarks
.venv/bin/mypy trigger fleet/protocol fleet/errors.py fleet/signing.py fleet/retry.py fleet/consensus.py fleet/consensus_boxes.py
.venv/bin/python -m pytest -q "$@"
