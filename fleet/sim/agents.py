"""The demo's fleet from the outside: enrolling and running the agent processes, what the hub's pool holds
for the labeler, which of the models' errors the uploads captured, accuracy on the test frames, finishing a
rollout. Every call goes through the hub's API, as an operator's tools would."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from fleet.protocol import (
    MAX_DEVICES_PAGE,
    DeviceList,
    DevicePublic,
    ModelList,
    PoolPage,
    RescoreProgress,
    RescoreRequest,
    RolloutPublic,
    SignedManifest,
)
from fleet.sim.detect_world import SceneFrames
from fleet.sim.fleet import Frames
from fleet.sim.procs import HubProcess, flywheel_cmd, run_logged, start_logged, tail

if TYPE_CHECKING:
    from fleet.sim.labelers import Labeler
    from fleet.sim.settings import DemoSettings

log = logging.getLogger(__name__)

DEMO_GROUP = "demo"
Progress = Callable[[str], None]


def enroll_agents(settings: DemoSettings, hub: HubProcess, ws: Path) -> list[Path]:
    configs = []
    for i in range(settings.devices):
        dev = f"dev-{i:03d}"
        d = ws / "agents" / dev
        d.mkdir(parents=True, exist_ok=True)
        cfg = d / "agent.toml"
        cfg.write_text(
            f'device_id = "{dev}"\ndata_dir = "data"\n\n[hub]\nurl = "{hub.url}"\ngroup = "{DEMO_GROUP}"\n'
            f'fleet_secret = "{hub.fleet_secret}"\n\n[source]\nkind = "npz"\npath = "shard.npz"\n\n'
            "[runtime]\nthreads = 1\nbatch_size = 16\ntrigger_window = 32\n\n"
            "[uplink]\ndrain_timeout_s = 60\nbackoff_base_s = 0.2\nbackoff_max_s = 2\n\n"
            "[heartbeat]\ninterval_s = 1\n\n[ota]\npoll_interval_s = 1\nsync_at_start = true\n"
        )
        run_logged(flywheel_cmd("agent", "enroll", "--config", str(cfg)), d / "agent.log")
        configs.append(cfg)
    return configs


def run_agents(settings: DemoSettings, ws: Path, configs: list[Path], frames: Frames, turn: int,
               procs: list[Any], *, started: Callable[[list[tuple[Path, Any]]], None] | None = None,
               ) -> dict[str, Frames]:
    """Give each device a disjoint shard and run all agents at once, as separate processes; ``started`` hears
    of each (config, process) once all run."""
    if not configs:
        raise RuntimeError(f"no enrolled agents under {ws / 'agents'} in turn {turn}")
    shards: dict[str, Frames] = {}
    procs.clear()
    per = len(frames) // len(configs)
    for i, cfg in enumerate(configs):
        shard = frames.take(np.arange(i * per, (i + 1) * per))
        shard.save_shard(cfg.parent / "shard.npz")
        shards[cfg.parent.name] = shard
        procs.append(start_logged(flywheel_cmd("agent", "run", "--config", str(cfg), "--max-frames", str(per)),
                                  cfg.parent / "agent.log"))
    if started is not None:
        started(list(zip(configs, procs, strict=True)))
    deadline = time.monotonic() + 600
    for cfg, p in zip(configs, procs, strict=True):
        code = p.wait(max(1.0, deadline - time.monotonic()))
        if code != 0:
            raise RuntimeError(f"agent {cfg.parent.name} exited with {code} in turn {turn}:\n"
                               f"{tail(cfg.parent / 'agent.log')}")
    procs.clear()
    return shards


def pool_supply(hub: HubProcess, labeler: Labeler) -> int:
    """Cases the hub could give the labeler now: unlabeled, or queued (selected, not yet labeled)."""
    total = 0
    for state in ("unlabeled", "queued"):
        r = httpx.get(hub.url + "/v1/pool", params={"state": state, "limit": 1}, headers=labeler.headers, timeout=60)
        r.raise_for_status()
        total += int(r.json()["total"])
    return total


def labeled_total(hub: HubProcess, labeler: Labeler) -> int:
    """Cases the hub holds labels for."""
    r = httpx.get(hub.url + "/v1/pool", params={"state": "labeled", "limit": 1}, headers=labeler.headers, timeout=60)
    r.raise_for_status()
    return int(r.json()["total"])


def uploaded_frames(hub: HubProcess, labeler: Labeler) -> dict[str, str]:
    """frame id -> case id, for every case the fleet has uploaded so far."""
    out: dict[str, str] = {}
    for state in ("unlabeled", "queued", "labeled", "held", "duplicate"):
        offset = 0
        while True:
            r = httpx.get(hub.url + "/v1/pool", params={"state": state, "limit": 1000, "offset": offset},
                          headers=labeler.headers, timeout=60)
            if r.status_code == 422:
                break
            r.raise_for_status()
            cases = PoolPage.from_json(r.content).cases
            for c in cases:
                frame = c.case.tags.get("frame")
                if frame:
                    out[frame] = c.case_id
            if len(cases) < 1000:
                break
            offset += 1000
    return out


def fleet_devices(hub: HubProcess) -> list[DevicePublic]:
    """Every enrolled device, by id: GET /v1/devices a page at a time."""
    out: list[DevicePublic] = []
    while True:
        page = hub.call("GET", f"/v1/devices?limit={MAX_DEVICES_PAGE}&offset={len(out)}", DeviceList)
        out += page.devices
        if not page.devices or len(out) >= page.total:
            return out


def error_capture(hub: HubProcess, ws: Path, shards: dict[str, Frames] | dict[str, SceneFrames],
                  uploaded: dict[str, str]) -> tuple[int, int]:
    """How many errors each device's model made this turn, and how many of those were on frames it uploaded:
    a classifier's wrong frames; a detector's missed and wrong boxes (:func:`box_errors`)."""
    versions = {d.device_id: d.model_version for d in fleet_devices(hub)}
    errors = captured = 0
    cache: dict[str, Any] = {}
    for dev, shard in shards.items():
        version = versions.get(dev)
        if not version:
            continue
        if version not in cache:
            cache[version] = load_model(hub, version, ws)
        runtime = cache[version]
        if isinstance(shard, SceneFrames):
            wrong = box_errors(runtime, shard)
        else:
            wrong = (runtime.run(list(shard.images)).logits.argmax(1) != shard.labels).astype(np.int64)
        up = np.fromiter((str(f) in uploaded for f in shard.frame_ids), bool, len(shard))
        errors += int(wrong.sum())
        captured += int(wrong[up].sum())
    return errors, captured


def box_errors(runtime: Any, frames: SceneFrames, *, iou: float = 0.5) -> np.ndarray:
    """(n,) per frame: the detector's missed true boxes plus its boxes that match no true box (or one of another
    class), at IoU ``iou``, counting the boxes it reports (at its manifest's operating threshold)."""
    from fleet.inference.detector import above
    from trigger.boxes import Boxes, match_boxes

    spec = runtime.manifest.detector
    pred = Boxes.concat([above(runtime.run(list(frames.images[i:i + 128])).detections, spec.operating_threshold)
                         for i in range(0, len(frames), 128)])
    boxes, labels = frames.truth_lists()
    truth = Boxes.from_frames(boxes, labels=labels)
    match_pred, match_true = match_boxes(pred, truth, iou=iou, classes=True)
    same = match_pred >= 0
    same[same] = pred.labels[same] == truth.labels[match_pred[same]]
    wrong = np.bincount(pred.frame_index[~same], minlength=len(frames))
    missed = np.bincount(truth.frame_index[match_true < 0], minlength=len(frames))
    return (wrong + missed).astype(np.int64)


def load_model(hub: HubProcess, version: str, ws: Path) -> Any:
    from fleet.inference.runtime import ModelRuntime

    d = ws / "cache" / "models"
    d.mkdir(parents=True, exist_ok=True)
    signed = hub.call("GET", f"/v1/models/{version}/manifest", SignedManifest)
    path = d / f"{version}.onnx"
    if not path.exists():
        o = httpx.get(f"{hub.url}/v1/models/{version}/onnx", headers=hub.admin_headers, timeout=60)
        o.raise_for_status()
        path.write_bytes(o.content)
    return ModelRuntime(path, signed.manifest, threads=2)


def evaluate_onnx(onnx: Path | None, manifest: SignedManifest | None, test: Frames) -> tuple[float, dict[str, float]]:
    """Accuracy overall and per condition of an exported model on the test frames (onnxruntime)."""
    from fleet.inference.runtime import ModelRuntime

    if onnx is None:
        raise ValueError("no model to evaluate")
    if manifest is None:
        manifest = SignedManifest.from_json((onnx.parent / "manifest.json").read_text())
    rt = ModelRuntime(onnx, manifest.manifest, threads=2)
    preds = np.concatenate([rt.run(list(test.images[i:i + 512])).logits.argmax(1)
                            for i in range(0, len(test), 512)])
    ok = preds == test.labels
    per = {str(c): float(ok[test.conditions == c].mean()) for c in np.unique(test.conditions)}
    return float(ok.mean()), per


def evaluate_detector(onnx: Path | None, test_npz: Path, log_path: Path) -> tuple[float, dict[str, float]]:
    """mAP@[.5:.95] overall and per condition of an exported detector on the test scenes of ``test_npz``, run as
    the devices run it (``flywheel evaluate``: onnxruntime, the device's decoding, pycocotools' COCOeval)."""
    from fleet.sim.procs import run_json

    if onnx is None:
        raise ValueError("no model to evaluate")
    result = run_json(flywheel_cmd("evaluate", "--model", str(onnx), "--data", f"npz:{test_npz}", "--json"),
                      log_path, timeout=600)
    per = {k.removeprefix("condition="): float(v["map"]) for k, v in result["per_slice"].items()
           if k.startswith("condition=")}
    return float(result["map"]), per


def rescore_pool(hub: HubProcess, say: Progress) -> RescoreProgress | None:
    """Re-score the pool with the active model before the hub selects from it (fleet.hub.rescore), in bounded
    calls until none is left; what it did, summed (None with no active model)."""
    active = next((m.version for m in hub.call("GET", "/v1/models", ModelList).models if m.status == "active"), None)
    if active is None:
        return None
    total = RescoreProgress(version=active, scored=0, failed=0, remaining=0)
    while True:
        step = hub.call("POST", f"/v1/models/{active}/rescore", RescoreProgress,
                        body=RescoreRequest(limit=2000, batch=128), timeout=600.0)
        total.scored, total.failed = total.scored + step.scored, total.failed + step.failed
        total.remaining, total.seconds = step.remaining, round(total.seconds + step.seconds, 3)
        if step.remaining == 0 or step.scored + step.failed == 0:
            break
    if total.scored or total.failed:
        say(f"the pool re-scored by the active model {active}: {total.scored} cases"
            f"{f' ({total.failed} could not be)' if total.failed else ''} in {total.seconds:.1f} s")
    return total


def finish_rollout(hub: HubProcess, rollout_id: str, say: Progress) -> str:
    """After a canary turn: take the rollout to the whole fleet unless the hub rolled it back already."""
    status = hub.call("GET", f"/v1/rollouts/{rollout_id}", RolloutPublic)
    if status.state != "running":
        say(f"rollout of {status.version} ended as {status.state}: {status.reason or ''}")
        return f"rollout of {status.version} {status.state}"
    for _ in range(len(status.stages) + 1):
        status = hub.call("POST", f"/v1/rollouts/{rollout_id}/advance", RolloutPublic)
        if status.state != "running":
            break
    say(f"canary of {status.version} held; now active on the whole fleet")
    return f"canary ok, {status.version} active"
