"""Publish a gated, signed model: upload it to the hub's registry and start a staged rollout."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fleet.errors import FlywheelError, InvalidInput
from fleet.protocol import SignedManifest
from fleet.signing import verify_file_sha256
from training.hub_client import HubClient

log = logging.getLogger(__name__)


def parse_stages(text: str) -> list[float]:
    """``"0.1,0.5,1.0"`` -> [0.1, 0.5, 1.0]: increasing fractions in (0, 1], ending at 1."""
    try:
        stages = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InvalidInput(
            f"--rollout-stages must be comma-separated fractions like 0.1,0.5,1.0; received {text!r}"
        ) from None
    if not stages or any(not 0 < s <= 1 for s in stages) or stages != sorted(set(stages)) or stages[-1] != 1.0:
        raise InvalidInput(f"--rollout-stages must increase within (0, 1] and end at 1.0; received {text!r}")
    return stages


def reach_hub(client: HubClient) -> None:
    """Reach the hub a run will publish to, with its token, before anything trains (as the tracking store is): a hub
    that is down, a wrong URL or a token it refuses is found now, not after the training, when only the upload is
    left. The read is one only a trainer's (or an admin's) token may make, as the upload and the rollout are, so a
    labeler's token is refused now too."""
    try:
        client.list_rollouts()
    except FlywheelError as exc:
        raise InvalidInput(f"cannot publish to {client.base_url}: {exc}; expected a running hub that accepts --token "
                           "(checked before training; --dry-run trains without publishing)") from exc


def publish(
    client: HubClient | None,
    onnx_path: Path,
    manifest_path: Path,
    *,
    stages: list[float],
    stage_seconds: float | None = None,
    dry_run: bool = False,
    bank_path: Path | None = None,
) -> dict[str, Any]:
    """Upload ``model.onnx`` with its signed manifest and its novelty bank (``bank_path``, see
    :mod:`training.bank`), then start a rollout; ``dry_run`` only checks and reports.

    The files are checked against the manifest (sha256, size) first, so what is uploaded is what was signed.
    The bank goes up before the rollout starts, so the first canary device finds the bank of its new model.
    """
    t0 = time.perf_counter()
    if manifest_path.name != "manifest.json":
        raise InvalidInput(
            f"{manifest_path} is not a signed manifest; give --sign-key or FLYWHEEL_SIGNING_KEY to publish"
        )
    signed = SignedManifest.from_json(manifest_path.read_text())
    m = signed.manifest
    verify_file_sha256(onnx_path, m.onnx_sha256, m.onnx_size)
    plan = {"version": m.version, "stages": stages, "stage_seconds": stage_seconds,
            "novelty_bank": None if bank_path is None else str(bank_path)}
    if dry_run or client is None:
        log.info("dry run: would upload %s (%d bytes) and roll out over %s", m.version, m.onnx_size, stages)
        return {"dry_run": True, "uploaded": False, **plan, "seconds": time.perf_counter() - t0}
    registered = client.upload_model(onnx_path.read_bytes(), signed.to_json())
    log.info("uploaded model %s: %s%s", m.version, registered.status, " (already there)" if registered.already else "")
    bank = None if bank_path is None else client.put_novelty_bank(m.version, bank_path.read_bytes())
    if bank is not None:
        log.info("uploaded novelty bank %s of model %s (%d embeddings of dim %d)", bank.bank_id, m.version, bank.n,
                 bank.dim)
    rollout = client.start_rollout(m.version, stages, stage_seconds)
    log.info("started rollout %s for %s", rollout.rollout_id, m.version)
    return {
        "dry_run": False, "uploaded": True, **plan, "hub": client.base_url, "registered": registered.to_dict(),
        "bank": None if bank is None else bank.to_dict(), "rollout": rollout.to_dict(),
        "seconds": time.perf_counter() - t0,
    }
