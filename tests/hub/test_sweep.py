"""The orphan-blob sweep: removes bytes nothing refers to, keeps everything referenced or in flight."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sqlmodel import Session, select
from typer.testing import CliRunner

from fleet.hub.blobs import FileBlobStore
from fleet.hub.models import Blob
from fleet.hub.sweep import sweep_orphan_blobs
from tests.hub.conftest import HubHarness, png_bytes

FUTURE = 2_000_000_000.0  # after the harness's clock and every file's mtime


def _age(store: FileBlobStore, sha: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(store.path(sha), (t, t))


def test_sweep_removes_orphans_and_keeps_what_is_referenced(hub: HubHarness) -> None:
    store = hub.hub.blobs
    assert isinstance(store, FileBlobStore)
    kept_case = hub.send_case("d1")
    orphan, _ = store.put(png_bytes(1234))
    young, _ = store.put(png_bytes(4321))
    with Session(hub.hub.engine) as s:  # an orphan row (bytes and row, no case) as an old hub left it
        s.add(Blob(sha256=orphan, size=1, kind="image", created_at=1.0))
        s.add(Blob(sha256="f" * 64, size=1, kind="image", created_at=1.0))  # a row whose bytes are gone too
        s.commit()
    stale_tmp = store.path(orphan).parent / ".tmp-1-2-3"
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (1.0, 1.0))
    for sha in (orphan, young):
        _age(store, sha, 7200 if sha == orphan else 0)
    all_before = {sha for sha, _ in store.list_blobs()}

    dry = sweep_orphan_blobs(hub.hub.engine, store, now=time.time(), min_age_s=3600, dry_run=True)
    assert (dry.scanned, dry.orphans, dry.too_young, dry.removed) == (len(all_before), 1, 1, 0)
    assert {sha for sha, _ in store.list_blobs()} == all_before

    report = sweep_orphan_blobs(hub.hub.engine, store, now=time.time(), min_age_s=3600)
    assert (report.orphans, report.removed, report.too_young, report.temp_files_removed) == (1, 1, 1, 1)
    assert not store.exists(orphan) and store.exists(young) and not stale_tmp.exists()
    assert hub.client.get(f"/v1/cases/{kept_case}", headers=hub.labeler).status_code == 200
    model = hub.client.get("/v1/models/m1/onnx", headers=hub.trainer)
    assert model.status_code == 200
    with Session(hub.hub.engine) as s:
        rows = set(s.exec(select(Blob.sha256)).all())
    assert orphan not in rows and "f" * 64 not in rows and len(rows) == 2  # the case's image and the model
    assert report.rows_removed == 2


def test_a_blob_uploaded_again_during_the_sweep_is_kept(hub: HubHarness) -> None:
    store = hub.hub.blobs
    assert isinstance(store, FileBlobStore)
    image = png_bytes(55)
    sha, _ = store.put(image)
    _age(store, sha, 7200)
    cutoff = time.time() - 3600
    # the sweep decided it is an orphan; an upload of the same bytes arrives before the delete
    assert not store.delete_if_unused(sha, older_than=cutoff, in_use=lambda s: store.put(image) and False)
    assert store.exists(sha)
    _age(store, sha, 7200)
    assert not store.delete_if_unused(sha, older_than=cutoff, in_use=lambda s: True)  # a row arrived meanwhile
    assert store.exists(sha)
    assert store.delete_if_unused(sha, older_than=cutoff, in_use=lambda s: False)
    assert not store.exists(sha)
    assert not list(store.path(sha).parent.glob("*.sweep-*"))


def test_sweep_blobs_command(tmp_path: Path, monkeypatch: object) -> None:
    from fleet.hub.cli import app

    monkeypatch.setenv("FLYWHEEL_HUB_DEV", "1")  # type: ignore[attr-defined]
    monkeypatch.setenv("FLYWHEEL_HUB_DATA_DIR", str(tmp_path))  # type: ignore[attr-defined]  # the command exports it
    store = FileBlobStore(tmp_path / "blobs")
    sha, _ = store.put(b"nobody's bytes")
    _age(store, sha, 7200)
    runner = CliRunner()
    # a data folder whose hub has no database (a misdirected sweep) is refused: in an empty database every blob
    # would look like an orphan
    r = runner.invoke(app, ["sweep-blobs", "--data-dir", str(tmp_path)])
    assert r.exit_code == 2 and f"no hub database at sqlite:///{tmp_path / 'hub.db'}" in r.output, r.output
    assert store.exists(sha) and not (tmp_path / "hub.db").exists()
    assert runner.invoke(app, ["migrate", "--data-dir", str(tmp_path)]).exit_code == 0
    r = runner.invoke(app, ["sweep-blobs", "--data-dir", str(tmp_path), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["orphans"] == 1 and store.exists(sha)
    r = runner.invoke(app, ["sweep-blobs", "--data-dir", str(tmp_path)])
    assert r.exit_code == 0 and json.loads(r.output)["removed"] == 1, r.output
    assert not store.exists(sha)
