"""Who labels the hub's selection in the demo: Label Studio with simulated annotators, or an oracle."""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from fleet.sim.fleet import World

if TYPE_CHECKING:
    from fleet.sim.procs import HubProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelRound:
    """One turn of labeling: how many cases the hub gave the labeler, how many labels reached the hub, and
    every fault met on the way (a refused push, annotations that never arrived)."""

    selected: int
    labeled: int
    problems: tuple[str, ...] = ()


def shortfall(round_: LabelRound, *, budget: int, supply: int) -> tuple[str, bool]:
    """Why a turn spent less than its ``budget``, and whether that is a fault: ``("", False)`` when it spent
    it all.

    ``supply`` is what the hub's pool held before the turn (unlabeled and queued cases). A pool smaller
    than the budget, or a selection the hub kept smaller (it drops near-duplicates of labeled cases),
    with every selected case labeled and nothing going wrong, is the fleet's supply, not a fault.
    Anything else (cases selected but never labeled, a labeling fault) is a fault: labeling broke.
    """
    wanted = min(budget, supply)
    if round_.labeled >= budget:
        return "", False
    if round_.labeled >= wanted and not round_.problems:
        return f"the pool held only {supply} case(s) for a budget of {budget}", False
    if round_.labeled == round_.selected < wanted and not round_.problems:
        return (f"the hub selected {round_.selected} of the {wanted} asked for (the rest are near-duplicates of "
                f"labeled cases)"), False
    why = "; ".join(round_.problems[:3]) or "no fault was reported"
    return (f"labeled {round_.labeled} of {wanted} (the hub selected {round_.selected}; the pool held "
            f"{supply}): {why}"), True


class Labeler(Protocol):
    name: str

    @property
    def headers(self) -> dict[str, str]: ...

    def label(self, budget: int, turn: int) -> LabelRound:
        """Have the hub select up to ``budget`` cases and label them."""
        ...

    def close(self) -> None: ...


class OracleLabeler:
    """Labels the hub's selection with the ground truth, through the hub's labels API (one 'annotator')."""

    name = "built-in oracle labeler (ground truth)"

    def __init__(self, hub_url: str, token: str, world: World, *, strategy: str) -> None:
        self.url, self.world, self.strategy = hub_url, world, strategy
        self._headers = {"Authorization": f"Bearer {token}"}
        self._next_id = 1
        self.client = httpx.Client(base_url=hub_url, headers=self._headers, timeout=60)

    @property
    def headers(self) -> dict[str, str]:
        return self._headers

    def label(self, budget: int, turn: int) -> LabelRound:
        r = self.client.post("/v1/selections", json={"budget": budget, "strategy": self.strategy})
        r.raise_for_status()
        done = 0
        problems: list[str] = []
        cases = r.json()["cases"]
        for case in cases:
            frame = (case.get("tags") or {}).get("frame")
            if frame not in self.world.truth:
                problems.append(f"case {case['case_id']} has no known frame ({frame!r}); released")
                log.warning("%s", problems[-1])
                self.client.post(f"/v1/cases/{case['case_id']}/release").raise_for_status()
                continue
            body: dict[str, Any] = {
                "case_id": case["case_id"], "label": int(self.world.truth[frame]), "annotator": "oracle",
                "source": "oracle", "task_id": self._next_id, "annotation_id": self._next_id,
                "created_at": time.time(), "status": "accepted",
            }
            self._next_id += 1
            self.client.post("/v1/labels", json=body).raise_for_status()
            done += 1
        return LabelRound(len(cases), done, tuple(problems))

    def close(self) -> None:
        self.client.close()


def studio_available() -> str | None:
    """None when Label Studio can be used here (a running one named by FLYWHEEL_STUDIO_URL/TOKEN, or a
    ``label-studio`` executable to start), else why not."""
    from fleet.sim.studio import find_studio_bin

    if importlib.util.find_spec("label_studio_sdk") is None:
        return "the labeling extra (label-studio-sdk) is not installed"
    if os.environ.get("FLYWHEEL_STUDIO_URL") and os.environ.get("FLYWHEEL_STUDIO_TOKEN"):
        return None
    if find_studio_bin() is None:
        return ("the studio extra (the Label Studio server) is not installed: no label-studio executable beside "
                "this Python, on PATH, in ./.venv-studio or at $FLYWHEEL_STUDIO_BIN")
    return None


class StudioLabeler:
    """Labels the hub's selection in a real Label Studio: the labeling bridge pushes the selection as tasks,
    simulated annotators (:mod:`labeling.bots`) answer them from the ground truth, and the bridge brings
    their annotations back to the hub (webhooks, then a reconciliation pass).

    Starts its own Label Studio under the workspace, unless FLYWHEEL_STUDIO_URL and FLYWHEEL_STUDIO_TOKEN
    (an admin's API token) name a running one.
    """

    def __init__(self, hub: HubProcess, labeler_token: str, world: World, ws: Path, *,
                 strategy: str = "uncertainty+diversity", say: Callable[[str], None] | None = None,
                 annotators: int = 3, accuracy: float = 1.0, settle_s: float = 180.0) -> None:
        from fleet.sim.studio import StudioServer, find_studio_bin, start_studio, studio_version
        from labeling.bridge import Bridge, BridgeConfig
        from labeling.hub_client import HubClient
        from labeling.ledger import Ledger
        from labeling.studio import Studio

        self.world, self.settle_s = world, settle_s
        self.say = say or (lambda msg: log.info("%s", msg))
        self._headers = {"Authorization": f"Bearer {labeler_token}"}
        self.server: StudioServer | None = None
        url, token = os.environ.get("FLYWHEEL_STUDIO_URL"), os.environ.get("FLYWHEEL_STUDIO_TOKEN")
        if url and token:
            self.url, self.token = url.rstrip("/"), token
            self.say(f"Label Studio: using the running server at {self.url}")
        else:
            binary = find_studio_bin()
            if binary is None:
                raise RuntimeError("no label-studio executable found (install the studio extra)")
            self.say(f"starting Label Studio ({binary}); the first start takes a minute or two")
            self.server = start_studio(ws / "label-studio" / "data", binary=binary)
            self.url, self.token = self.server.url, self.server.token
            self.say(f"Label Studio on {self.url} (data in {ws / 'label-studio'})")
        run = secrets.token_hex(3)
        self.studio = Studio(self.url, self.token)
        self.hub = HubClient(hub.url, labeler_token, timeout_s=60.0)
        (ws / "label-studio").mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(ws / "label-studio" / "bridge.sqlite")
        self.config = BridgeConfig(
            project_title=f"Flywheel demo {time.strftime('%Y-%m-%d %H:%M')} {run}", overlap=1, overlap_share=0.0,
            strategy=strategy, reconcile_every_s=0.0,
            webhook_url=f"{hub.url}/v1/labeling/webhook", webhook_secret=hub.webhook_secret,
        )
        self.bridge = Bridge(self.studio, self.hub, self.ledger, self.config)
        self.bot_names = [f"demo-{run}-{i + 1}" for i in range(annotators)]
        self.accuracy = accuracy
        self._bot_password = "fw-bot-" + secrets.token_urlsafe(12)
        self._answers: dict[str, int] = {}  # case id -> true label, for the cases pushed so far
        self._team: Any = None
        version = studio_version(self.url, self.token)
        self.name = f"Label Studio {version or ''}".rstrip() + f" with {annotators} simulated annotators"

    @property
    def headers(self) -> dict[str, str]:
        return self._headers

    def _labeled(self) -> int:
        return self.hub.pool("labeled", limit=1)[0]

    def _learn_answers(self) -> None:
        for case in self.hub.iter_pool("queued"):
            frame = (case.get("tags") or {}).get("frame")
            if frame in self.world.truth:
                self._answers[str(case["case_id"])] = int(self.world.truth[frame])

    def _ensure_team(self) -> Any:
        if self._team is None:
            from labeling.bots import BotSpec, BotTeam

            specs = [BotSpec(n, accuracy=self.accuracy, seconds_per_task=0.0) for n in self.bot_names]
            self._team = BotTeam(self.url, self.studio, self.bridge.project_id, specs, self._answers.get,
                                 self.bridge.class_names, password=self._bot_password)
        return self._team

    def label(self, budget: int, turn: int) -> LabelRound:
        from dataclasses import replace

        from labeling.push import Throttle

        before = self._labeled()
        open_before = self.ledger.open_slots()
        # the throttle lets the whole budget through at once: the bots keep no queue of their own
        self.bridge.config = replace(self.config, throttle=Throttle(horizon_s=1.0, min_depth=budget,
                                                                    max_depth=budget, max_batch=budget))
        report = self.bridge.sync_once(push=True, reconcile=True)
        problems = list(report.errors)
        for e in report.errors:
            log.error("label sync: %s", e)
        pushed = report.pushed
        if pushed == 0 and not self.ledger.open_slots():
            return LabelRound(0, 0, tuple(problems))
        self._learn_answers()
        team = self._ensure_team()
        deadline = time.monotonic() + self.settle_s
        answered = 0
        while time.monotonic() < deadline:
            worked = False
            for bot in team.bots:
                if bot.step():
                    worked, answered = True, answered + 1
            if not worked:
                break
        # bring the annotations back: webhooks first, then a full reconciliation, until the hub has them
        target = before + answered
        while True:
            report = self.bridge.sync_once(push=False, reconcile=True)
            got = self._labeled()
            if got >= target or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        problems += [e for e in report.errors if e not in problems]
        done = got - before
        correct = sum(b.stats.correct for b in team.bots)
        self.say(f"Label Studio turn {turn}: pushed {pushed} tasks, {answered} annotations by "
                 f"{len(team.bots)} simulated annotators ({correct} correct in all so far), {done} labels in the hub")
        if done < answered:
            problems.append(f"only {done} of {answered} annotations reached the hub within {self.settle_s:.0f}s")
        return LabelRound(pushed + open_before, done, tuple(problems))

    def close(self) -> None:
        if self._team is not None:
            self._team.close()
        self.studio.close()
        self.hub.close()
        self.ledger.close()
        if self.server is not None:
            self.server.stop()
