#!/usr/bin/env bash
# Install the test dependencies, start the real services the tests need (PostgreSQL, Label Studio)
# on loopback, then lint, type-check and run the whole suite. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- system packages: PostgreSQL server, Chromium for the annotator-view tests
need_apt=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || need_apt+=(postgresql)
# Debian's Chromium for playwright (driven through executable_path; `playwright install` is never run)
[ -x /usr/bin/chromium ] || need_apt+=(chromium)
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

# --- lint, types, tests (a test whose service is missing fails instead of skipping)
export FLYWHEEL_TEST_SERVICES=required
.venv/bin/ruff check fleet trigger labeling training tests benchmarks
.venv/bin/mypy trigger fleet/protocol fleet/errors.py fleet/signing.py fleet/retry.py fleet/consensus.py
.venv/bin/python -m pytest -q "$@"
