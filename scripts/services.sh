#!/usr/bin/env bash
# Start the real services the integration tests need, on loopback, in throwaway data dirs.
# Sourced by scripts/test.sh. Exports FLYWHEEL_TEST_PG_URL, FLYWHEEL_TEST_LS_* and FLYWHEEL_TEST_RTSP_*;
# stop_services tears everything down.
set -euo pipefail

SERVICES_DIR="${SERVICES_DIR:-$(mktemp -d /tmp/flywheel-services.XXXXXX)}"
chmod 755 "$SERVICES_DIR"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

pg_bin() {
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/initdb" ] && { echo "$d"; return; }; done
  return 1
}

start_postgres() {
  local bin port data user
  bin=$(pg_bin)
  port=$(free_port)
  data="$SERVICES_DIR/pg"
  user=postgres
  mkdir -p "$data"; chown "$user" "$data"
  touch "$SERVICES_DIR/pg.log"; chown "$user" "$SERVICES_DIR/pg.log"  # pg_ctl writes it as $user
  runuser -u "$user" -- "$bin/initdb" -D "$data" -U flywheel --auth=trust -E UTF8 >"$SERVICES_DIR/pg-initdb.log"
  runuser -u "$user" -- "$bin/pg_ctl" -D "$data" -l "$SERVICES_DIR/pg.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c max_connections=200 -c fsync=off" start >/dev/null
  "$bin/createdb" -h 127.0.0.1 -p "$port" -U flywheel flywheel_test
  export FLYWHEEL_TEST_PG_URL="postgresql+psycopg://flywheel@127.0.0.1:$port/flywheel_test"
  export FLYWHEEL_TEST_PG_ADMIN_URL="postgresql://flywheel@127.0.0.1:$port/postgres"
  PG_DATA="$data"; PG_BINDIR="$bin"
  echo "postgres: $FLYWHEEL_TEST_PG_URL"
}

# --- Label Studio, in its own virtualenv (its Django pins stay out of .venv), as pinned by pyproject's `studio`
# extra: Label Studio's version and the pins that keep it starting (sentry-sdk below 3)
mapfile -t STUDIO_PINS < <(python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["studio"]))')
LABEL_STUDIO_VERSION="${LABEL_STUDIO_VERSION:-$(printf '%s\n' "${STUDIO_PINS[@]}" | sed -n 's/^label-studio==//p')}"
STUDIO_OTHER_PINS=()
for pin in "${STUDIO_PINS[@]}"; do [[ $pin == label-studio* ]] || STUDIO_OTHER_PINS+=("$pin"); done
STUDIO_VENV="${STUDIO_VENV:-.venv-studio}"
STUDIO_START_TIMEOUT="${STUDIO_START_TIMEOUT:-300}"

studio_venv_ok() {  # every pin met by what the virtualenv holds
  "$STUDIO_VENV/bin/python" - "label-studio==$LABEL_STUDIO_VERSION" "${STUDIO_OTHER_PINS[@]}" 2>/dev/null <<'PY'
import importlib.metadata as m, sys
from pip._vendor.packaging.requirements import Requirement
sys.exit(any(m.version(r.name) not in r.specifier for r in map(Requirement, sys.argv[1:])))
PY
}

ensure_studio_venv() {
  if [ ! -x "$STUDIO_VENV/bin/label-studio" ] || ! studio_venv_ok; then
    [ -x "$STUDIO_VENV/bin/python" ] || python3 -m venv "$STUDIO_VENV"
    "$STUDIO_VENV/bin/python" -m pip install -q --upgrade pip
    "$STUDIO_VENV/bin/python" -m pip install -q "label-studio==$LABEL_STUDIO_VERSION" "${STUDIO_OTHER_PINS[@]}"
  fi
}

# Start Label Studio on a free loopback port with a fresh data dir, a known admin and a known (legacy)
# API token; wait until the API answers with that token. Exports FLYWHEEL_TEST_LS_URL / _TOKEN / _USER /
# _PASSWORD and FLYWHEEL_TEST_LS_BIN (tests that restart a server of their own use it).
start_label_studio() {
  local port data log token user password deadline url
  ensure_studio_venv
  port=$(free_port)
  data="$SERVICES_DIR/label-studio"
  log="$SERVICES_DIR/label-studio.log"
  token=$(python3 -c 'import secrets; print(secrets.token_hex(20))')
  user="admin@flywheel.test"
  password=$(python3 -c 'import secrets; print("fw-" + secrets.token_urlsafe(12))')
  url="http://127.0.0.1:$port"
  mkdir -p "$data"
  # legacy tokens are off by default in 1.23; webhooks go to a hub on loopback, which SSRF protection
  # would refuse; and nothing may phone home (the version check calls pypi.org)
  LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
  LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false \
  LABEL_STUDIO_LATEST_VERSION_CHECK=false \
  LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK=true \
    "$STUDIO_VENV/bin/label-studio" start --no-browser --internal-host 127.0.0.1 --port "$port" \
      --data-dir "$data" --username "$user" --password "$password" --user-token "$token" \
      --enable-legacy-api-token >"$log" 2>&1 &
  STUDIO_PID=$!
  deadline=$((SECONDS + STUDIO_START_TIMEOUT))
  until python3 - "$url" "$token" <<'PY' 2>/dev/null
import sys, urllib.request
req = urllib.request.Request(sys.argv[1] + "/api/current-user/whoami", headers={"Authorization": "Token " + sys.argv[2]})
sys.exit(0 if urllib.request.urlopen(req, timeout=5).status == 200 else 1)
PY
  do
    if ! kill -0 "$STUDIO_PID" 2>/dev/null; then
      echo "label-studio exited while starting; the last lines of $log:" >&2
      tail -n 40 "$log" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "label-studio did not answer at $url within ${STUDIO_START_TIMEOUT}s; the last lines of $log:" >&2
      tail -n 40 "$log" >&2
      return 1
    fi
    sleep 2
  done
  export FLYWHEEL_TEST_LS_URL="$url" FLYWHEEL_TEST_LS_TOKEN="$token"
  export FLYWHEEL_TEST_LS_USER="$user" FLYWHEEL_TEST_LS_PASSWORD="$password"
  export FLYWHEEL_TEST_LS_BIN="$PWD/$STUDIO_VENV/bin/label-studio"
  echo "label-studio $LABEL_STUDIO_VERSION: $url (pid $STUDIO_PID)"
}

# wait_for WHAT PID LOG SECONDS CHECK...: run CHECK until it succeeds; if PID dies or SECONDS pass first, say
# that WHAT did not start, show the end of LOG and fail.
wait_for() {
  local what=$1 pid=$2 log=$3 seconds=$4 deadline
  shift 4
  deadline=$((SECONDS + seconds))
  until "$@" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null || ((SECONDS >= deadline)); then
      echo "$what did not start; the last lines of $log:" >&2
      tail -n 20 "$log" >&2
      return 1
    fi
    sleep 0.2
  done
}

# GStreamer's RTSP server (tests/support/rtsp_server.py, run by Debian's python3 with python3-gi), serving a
# moving test pattern as /h264 and /mjpeg. Exports FLYWHEEL_TEST_RTSP_URL (rtsp://127.0.0.1:PORT, no path) and
# FLYWHEEL_TEST_RTSP_SERVER (the command, for tests that stop and restart a server of their own).
RTSP_PYTHON="${RTSP_PYTHON:-/usr/bin/python3}"

start_rtsp_server() {
  local port log
  port=$(free_port)
  log="$SERVICES_DIR/rtsp.log"
  "$RTSP_PYTHON" tests/support/rtsp_server.py --port "$port" >"$log" 2>&1 &
  RTSP_PID=$!
  wait_for "the RTSP server on port $port" "$RTSP_PID" "$log" 30 grep -q '^ready ' "$log"
  export FLYWHEEL_TEST_RTSP_URL="rtsp://127.0.0.1:$port"
  export FLYWHEEL_TEST_RTSP_SERVER="$RTSP_PYTHON $PWD/tests/support/rtsp_server.py"
  echo "rtsp server: $FLYWHEEL_TEST_RTSP_URL (pid $RTSP_PID)"
}

# moto's standalone S3-compatible server (the dev extra installs moto[server] into .venv) for the object-store
# tests. Exports FLYWHEEL_TEST_S3_URL and the (made-up) AWS credentials and region moto accepts; tests make their
# own buckets.
S3_SERVER="${S3_SERVER:-.venv/bin/moto_server}"

start_s3() {
  local port log
  port=$(free_port)
  log="$SERVICES_DIR/s3.log"
  "$S3_SERVER" -H 127.0.0.1 -p "$port" >"$log" 2>&1 &
  S3_PID=$!
  wait_for "the S3 server ($S3_SERVER) on port $port" "$S3_PID" "$log" 60 \
    python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 1)"
  export FLYWHEEL_TEST_S3_URL="http://127.0.0.1:$port"
  export AWS_ACCESS_KEY_ID=flywheel-test AWS_SECRET_ACCESS_KEY=flywheel-test AWS_DEFAULT_REGION=us-east-1
  echo "s3 server: $FLYWHEEL_TEST_S3_URL (pid $S3_PID)"
}

stop_services() {
  if [ -n "${PG_DATA:-}" ]; then
    runuser -u postgres -- "$PG_BINDIR/pg_ctl" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -n "${STUDIO_PID:-}" ]; then kill "$STUDIO_PID" 2>/dev/null || true; fi
  if [ -n "${RTSP_PID:-}" ]; then kill "$RTSP_PID" 2>/dev/null || true; fi
  if [ -n "${S3_PID:-}" ]; then kill "$S3_PID" 2>/dev/null || true; fi
  rm -rf "$SERVICES_DIR"
}
