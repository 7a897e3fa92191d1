#!/usr/bin/env bash
# Start the real services the integration tests need, on loopback, in throwaway data dirs.
# Sourced by scripts/test.sh. Exports FLYWHEEL_TEST_PG_URL; stop_services tears everything down.
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
  runuser -u "$user" -- "$bin/initdb" -D "$data" -U flywheel --auth=trust -E UTF8 >"$SERVICES_DIR/pg-initdb.log"
  runuser -u "$user" -- "$bin/pg_ctl" -D "$data" -l "$SERVICES_DIR/pg.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c max_connections=200 -c fsync=off" start >/dev/null
  "$bin/createdb" -h 127.0.0.1 -p "$port" -U flywheel flywheel_test
  export FLYWHEEL_TEST_PG_URL="postgresql+psycopg://flywheel@127.0.0.1:$port/flywheel_test"
  export FLYWHEEL_TEST_PG_ADMIN_URL="postgresql://flywheel@127.0.0.1:$port/postgres"
  PG_DATA="$data"; PG_BINDIR="$bin"
  echo "postgres: $FLYWHEEL_TEST_PG_URL"
}

stop_services() {
  if [ -n "${PG_DATA:-}" ]; then
    runuser -u postgres -- "$PG_BINDIR/pg_ctl" -D "$PG_DATA" -m immediate stop >/dev/null 2>&1 || true
  fi
  if [ -n "${STUDIO_PID:-}" ]; then kill "$STUDIO_PID" 2>/dev/null || true; fi
  rm -rf "$SERVICES_DIR"
}
