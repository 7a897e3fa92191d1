"""Label Studio for the demo: find the server's executable, and run it on loopback with a known admin."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from fleet.sim.procs import ProcessFailed, free_port, port_free, start_logged, stop_process, tail

ADMIN_EMAIL = "admin@flywheel.demo"
# what scripts/services.sh sets: legacy tokens are off by default in 1.23; webhooks go to a hub on loopback,
# which SSRF protection would refuse; nothing may phone home (the version check calls pypi.org)
STUDIO_ENV = {
    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
    "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
    "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
    "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
}


# the `studio` extra, when the installed metadata lacks it: Label Studio's pin, and sentry-sdk below 3 (3.0
# refuses an option Label Studio 1.23 passes as it starts, so the server exits at once)
STUDIO_REQUIREMENTS = ("label-studio==1.23.2", "sentry-sdk>=2.16,<3")


def _studio_extra() -> list[str]:
    """The requirements of this package's ``studio`` extra (pyproject.toml is the one place they are written)."""
    import importlib.metadata as md
    import re

    try:
        reqs = md.requires("edge-flywheel") or []
    except md.PackageNotFoundError:
        return list(STUDIO_REQUIREMENTS)
    found = [name.strip().replace(" ", "") for name, _, marker in (r.partition(";") for r in reqs)
             if re.search(r"extra\s*==\s*['\"]studio['\"]", marker)]
    return found if any(r.startswith("label-studio") for r in found) else list(STUDIO_REQUIREMENTS)


def studio_requirement() -> str:
    """The Label Studio pin of this package's ``studio`` extra."""
    return next(r for r in _studio_extra() if r.startswith("label-studio"))


def studio_requirements() -> list[str]:
    """What :func:`install_studio` installs: :func:`studio_requirement` and the extra's other pins (with those of
    :data:`STUDIO_REQUIREMENTS` the installed metadata does not name: an editable install made before a pin was
    added still gets it)."""
    import re

    def name(r: str) -> str:
        return re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower()

    extra = [r for r in _studio_extra() if not r.startswith("label-studio")]
    named = {name(r) for r in extra}
    return [studio_requirement(), *extra, *(r for r in STUDIO_REQUIREMENTS[1:] if name(r) not in named)]


def studio_pins_met(venv: Path) -> bool:
    """Whether the virtualenv ``venv`` holds what :func:`studio_requirements` pins (a ``.venv-studio`` made before a
    pin was added, or by hand, may not: Label Studio 1.23 beside sentry-sdk 3 exits as it starts)."""
    python = venv / "bin" / "python"
    check = ("import importlib.metadata as m, sys\n"
             "from pip._vendor.packaging.requirements import Requirement\n"
             "def ok(r):\n"
             "    try:\n"
             "        return m.version(r.name) in r.specifier\n"
             "    except m.PackageNotFoundError:\n"
             "        return False\n"
             "sys.exit(not all(ok(Requirement(a)) for a in sys.argv[1:]))\n")
    try:
        return subprocess.run([str(python), "-c", check, *studio_requirements()], capture_output=True,
                              timeout=120).returncode == 0
    except (subprocess.SubprocessError, OSError):
        return False


def install_studio(venv: Path, *, timeout: float = 900.0) -> Path:
    """Install Label Studio (the ``studio`` extra's pin) into its own virtualenv ``venv`` (its Django pins stay out
    of ours) and return its ``label-studio`` executable. Raises ProcessFailed, with pip's last lines, on failure;
    a half-made virtualenv is removed."""
    made = not venv.exists()
    log_path = venv.parent / f"{venv.name}-install.log"
    try:
        with log_path.open("wb") as log:
            if made:
                subprocess.run([sys.executable, "-m", "venv", str(venv)], stdout=log, stderr=subprocess.STDOUT,
                               check=True, timeout=timeout)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                            "-q", *studio_requirements()], stdout=log, stderr=subprocess.STDOUT, check=True,
                           timeout=timeout)
    except (subprocess.SubprocessError, OSError) as exc:
        if made:
            shutil.rmtree(venv, ignore_errors=True)
        raise ProcessFailed(f"installing {studio_requirement()} into {venv} failed ({exc}):\n{tail(log_path, 10)}"
                            ) from exc
    binary = venv / "bin" / "label-studio"
    if not binary.is_file():
        raise ProcessFailed(f"{studio_requirement()} installed into {venv}, but {binary} is missing")
    log_path.unlink(missing_ok=True)
    return binary


def find_studio_bin() -> Path | None:
    """The ``label-studio`` executable: $FLYWHEEL_STUDIO_BIN, next to this interpreter, on PATH, or
    ``.venv-studio/bin/label-studio`` under the current directory (what scripts/services.sh creates)."""
    env = os.environ.get("FLYWHEEL_STUDIO_BIN")
    candidates: list[Path | None] = [
        Path(env) if env else None,
        Path(sys.executable).parent / "label-studio",
        Path(p) if (p := shutil.which("label-studio")) else None,
        Path.cwd() / ".venv-studio" / "bin" / "label-studio",
    ]
    for c in candidates:
        if c is not None and c.is_file() and os.access(c, os.X_OK):
            return c
    return None


@dataclass
class StudioServer:
    url: str
    token: str
    email: str
    password: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, grace=20.0)


def whoami_ok(url: str, token: str) -> bool:
    try:
        r = httpx.get(url.rstrip("/") + "/api/current-user/whoami", headers={"Authorization": f"Token {token}"},
                      timeout=5.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def start_studio(data_dir: Path, *, binary: Path, timeout: float = 300.0, port: int | None = None,
                 token: str | None = None, password: str | None = None) -> StudioServer:
    """Run Label Studio on a loopback port with its data in ``data_dir``; wait until the token answers. Fresh
    credentials and a free port by default; a server started again on the same data passes its own ``token``
    and ``password`` back (and gets its old ``port`` if that is still free)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port if port is not None and port_free(port) else free_port()
    token = token or secrets.token_hex(20)
    password = password or "fw-" + secrets.token_urlsafe(12)
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, **STUDIO_ENV}
    cmd = [str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
           "--data-dir", str(data_dir), "--username", ADMIN_EMAIL, "--password", password, "--user-token", token,
           "--enable-legacy-api-token"]
    log_path = data_dir.parent / "label-studio.log"
    proc = start_logged(cmd, log_path, env=env)
    server = StudioServer(url, token, ADMIN_EMAIL, password, proc, log_path)
    deadline = time.monotonic() + timeout
    try:
        while not whoami_ok(url, token):
            if proc.poll() is not None:
                raise ProcessFailed(f"Label Studio exited with code {proc.returncode} while starting:\n"
                                    f"{tail(log_path, 40)}")
            if time.monotonic() > deadline:
                raise ProcessFailed(f"Label Studio did not answer at {url} within {timeout:.0f}s:\n"
                                    f"{tail(log_path, 40)}")
            time.sleep(2.0)
    except BaseException:  # a timeout, or Ctrl-C while it starts: no server is left behind
        server.stop()
        raise
    return server


def studio_version(url: str, token: str) -> str | None:
    try:
        r = httpx.get(url.rstrip("/") + "/api/version", headers={"Authorization": f"Token {token}"}, timeout=10.0)
        r.raise_for_status()
        d = r.json()
    except (httpx.HTTPError, ValueError):
        return None
    for key in ("release", "label-studio-os-package"):
        v = d.get(key)
        if isinstance(v, dict):
            v = v.get("version")
        if isinstance(v, str) and v:
            return v
    return None
