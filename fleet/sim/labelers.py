"""Who labels the hub's selection in the demo: Label Studio with simulated annotators, or an oracle."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from fleet.protocol import LabelPost, PoolPage, SelectedCase, Selection, SelectionRequest
from fleet.sim.fleet import World
from fleet.sim.settings import selection_seed

if TYPE_CHECKING:
    from fleet.sim.detect_world import SceneWorld
    from fleet.sim.procs import HubProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelRound:
    """One turn of labeling: how many cases the hub gave the labeler, how many labels reached the hub, and
    every fault met on the way (a refused push, annotations that never arrived)."""

    selected: int
    labeled: int
    problems: tuple[str, ...] = ()
    finished_early: bool = False  # a person ended the turn before labeling every task (--annotate)


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
    if round_.finished_early:
        return f"you finished the turn early: {round_.labeled} of {round_.selected} task(s) labeled", False
    if round_.labeled >= wanted and not round_.problems:
        return f"the pool held only {supply} case(s) for a budget of {budget}", False
    if round_.labeled == round_.selected < wanted and not round_.problems:
        return (f"the hub selected {round_.selected} of the {wanted} asked for (the rest are near-duplicates of "
                f"labeled cases)"), False
    why = "; ".join(round_.problems[:3]) or "no fault was reported"
    return (f"labeled {round_.labeled} of {wanted} (the hub selected {round_.selected}; the pool held "
            f"{supply}): {why}"), True


_JSON = {"Content-Type": "application/json"}


class Labeler(Protocol):
    name: str

    @property
    def headers(self) -> dict[str, str]: ...

    def label(self, budget: int, turn: int, *, before: int | None = None) -> LabelRound:
        """Have the hub select up to ``budget`` cases and label them. ``before``: the hub's labeled count when
        this turn's labeling began, when it began before an interruption (the labels since count toward the
        budget, and cases already selected are labeled before any new ones)."""
        ...

    def session(self) -> dict[str, Any]:
        """What a resumed demo needs to come back to the same queue ({} when nothing)."""
        ...

    def processes(self) -> dict[str, list[Any]]:
        """Processes this labeler started: name -> [pid, a word their command line holds]."""
        ...

    def close(self) -> None: ...


class OracleLabeler:
    """Labels the hub's selection with the ground truth, through the hub's labels API (one 'annotator')."""

    name = "built-in oracle labeler (ground truth)"

    def __init__(self, hub_url: str, token: str, world: World | SceneWorld, *, strategy: str,
                 balance: str | None = None, seed: int | None = None) -> None:
        # seed: the demo's; each turn's selection asks the hub for selection_seed(seed, turn) (None: unseeded)
        self.url, self.world, self.strategy, self.balance, self.seed = hub_url, world, strategy, balance, seed
        self._headers = {"Authorization": f"Bearer {token}"}
        self._next_id = time.time_ns() // 1000  # task and annotation ids, unique across restarts of the demo
        self.client = httpx.Client(base_url=hub_url, headers=self._headers, timeout=60)

    @property
    def headers(self) -> dict[str, str]:
        return self._headers

    def label(self, budget: int, turn: int, *, before: int | None = None) -> LabelRound:
        done_already, cases = 0, []
        if before is not None:  # resumed: what the interrupted run selected but did not label comes first
            done_already = max(0, self._total("labeled") - before)
            cases = self._queued()
        wanted = budget - done_already - len(cases)
        if wanted > 0:
            body = SelectionRequest(wanted, strategy=self.strategy, balance=self.balance,
                                    seed=None if self.seed is None else selection_seed(self.seed, turn))
            r = self.client.post("/v1/selections", content=body.to_json(), headers=_JSON)
            r.raise_for_status()
            cases += Selection.from_json(r.content).cases
        done = done_already
        problems: list[str] = []
        for c in cases:
            frame = c.case.tags.get("frame")
            if frame not in self.world.truth:
                problems.append(f"case {c.case_id} has no known frame ({frame!r}); released")
                log.warning("%s", problems[-1])
                self.client.post(f"/v1/cases/{c.case_id}/release").raise_for_status()
                continue
            post = LabelPost(case_id=c.case_id, label=self.world.label(frame),
                             annotator="oracle", source="oracle", task_id=self._next_id,
                             annotation_id=self._next_id, created_at=time.time())
            self._next_id += 1
            self.client.post("/v1/labels", content=post.to_json(), headers=_JSON).raise_for_status()
            done += 1
        return LabelRound(done_already + len(cases), done, tuple(problems))

    def session(self) -> dict[str, Any]:
        return {}

    def processes(self) -> dict[str, list[Any]]:
        return {}

    def close(self) -> None:
        self.client.close()

    def _total(self, state: str) -> int:
        r = self.client.get("/v1/pool", params={"state": state, "limit": 1})
        r.raise_for_status()
        return int(r.json()["total"])

    def _queued(self) -> list[SelectedCase]:
        """The cases selected for labeling and not labeled yet, as the hub hands them out."""
        out: list[SelectedCase] = []
        while True:
            r = self.client.get("/v1/pool", params={"state": "queued", "limit": 1000, "offset": len(out)})
            r.raise_for_status()
            page = PoolPage.from_json(r.content).cases
            out += page
            if len(page) < 1000:
                return out


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
    """Labels the hub's selection in a real Label Studio, through the labeling bridge's own command line, each
    step its own process (as in production, where the bridge runs beside the hub): ``flywheel label sync``
    pushes the selection as tasks, ``flywheel label bots`` are simulated annotators answering them from the
    ground truth in Label Studio's queue, and ``flywheel label sync --no-push`` brings their annotations back
    to the hub (webhooks, then a reconciliation pass). Secrets reach the child processes by environment,
    never on their command lines.

    Starts its own Label Studio under the workspace, unless FLYWHEEL_STUDIO_URL and FLYWHEEL_STUDIO_TOKEN
    (an admin's API token) name a running one.
    """

    def __init__(self, hub: HubProcess, labeler_token: str, world: World | SceneWorld, ws: Path, *,
                 strategy: str = "uncertainty+diversity", balance: str | None = None, seed: int | None = None,
                 say: Callable[[str], None] | None = None, annotators: int = 3, accuracy: float = 1.0,
                 settle_s: float = 600.0, return_s: float = 120.0,
                 annotate: bool = False, poll_s: float = 3.0, session: dict[str, Any] | None = None) -> None:
        from fleet.sim.studio import StudioServer, find_studio_bin, start_studio, studio_version

        # settle_s: the most the bots may take for a turn's tasks; return_s: for their labels to reach the hub;
        # annotate: a person labels in Label Studio's UI instead of the bots (the demo waits, polling every poll_s);
        # session: what session() returned before an interruption (the same server login, project and annotators)
        session = session or {}
        self.world, self.settle_s, self.return_s, self.strategy = world, settle_s, return_s, strategy
        self.balance, self.seed = balance, seed  # seed: the demo's, as OracleLabeler's
        self.annotate, self.poll_s = annotate, poll_s
        self.finish_path = ws / "finish-turn"  # --annotate: touch it to end a turn with the labels so far
        self.say = say or (lambda msg: log.info("%s", msg))
        self._headers = {"Authorization": f"Bearer {labeler_token}"}
        self.hub = httpx.Client(base_url=hub.url, headers=self._headers, timeout=60)
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
            login = session.get("server") or {}
            self.server = start_studio(ws / "label-studio" / "data", binary=binary, port=login.get("port"),
                                       token=login.get("token"), password=login.get("password"))
            self.url, self.token = self.server.url, self.server.token
            self.say(f"Label Studio on {self.url}: log in as {self.server.email} with password "
                     f"{self.server.password} to watch the queue fill (data in {ws / 'label-studio'})")
        run = secrets.token_hex(3)
        self.dir = ws / "label-studio"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.truth_path = self.dir / "truth.jsonl"
        self.project = session.get("project") or f"Flywheel demo {time.strftime('%Y-%m-%d %H:%M')} {run}"
        self.team = session.get("team") or ",".join(f"demo-{run}-{i + 1}:{accuracy}@0" for i in range(annotators))
        self.env = {
            **os.environ, "FLYWHEEL_HUB_URL": hub.url, "FLYWHEEL_LABELER_TOKEN": labeler_token,
            "FLYWHEEL_LS_URL": self.url, "FLYWHEEL_LS_TOKEN": self.token, "FLYWHEEL_LS_PROJECT": self.project,
            "FLYWHEEL_LABEL_STATE": str(self.dir / "bridge.sqlite"), "FLYWHEEL_WEBHOOK_SECRET": hub.webhook_secret,
            "FLYWHEEL_BOT_PASSWORD": session.get("bot_password") or "fw-bot-" + secrets.token_urlsafe(12),
        }
        # case id -> the bots' truth row: its true label, and the frame it shows as the stable key of its answer
        self._answers: dict[str, dict[str, Any]] = {}
        self.correct = 0
        version = studio_version(self.url, self.token)
        who = "you as the annotator" if annotate else f"{annotators} simulated annotators"
        self.name = f"Label Studio {version or ''}".rstrip() + f" with {who}"

    @property
    def headers(self) -> dict[str, str]:
        return self._headers

    def session(self) -> dict[str, Any]:
        server = None if self.server is None else {
            "port": int(self.server.url.rsplit(":", 1)[1]), "token": self.server.token,
            "password": self.server.password}
        return {"project": self.project, "team": self.team, "bot_password": self.env["FLYWHEEL_BOT_PASSWORD"],
                "server": server}

    def processes(self) -> dict[str, list[Any]]:
        if self.server is None or self.server.process is None:
            return {}
        return {"label-studio": [self.server.process.pid, str(self.dir / "data")]}

    def label(self, budget: int, turn: int, *, before: int | None = None) -> LabelRound:
        start, open_before = self._labeled(), self._open_slots()
        before = start if before is None else before
        done_already = max(0, start - before)  # resumed: labels given since the turn's labeling began count
        # the throttle lets the whole budget through at once: the bots keep no queue of their own; what is
        # still open in Label Studio (an interrupted turn's tasks, or an earlier turn's unlabeled ones) counts
        depth = budget - done_already
        seeded = () if self.seed is None else ("--seed", str(selection_seed(self.seed, turn)))
        report = self._sync("--min-depth", str(depth), "--max-depth", str(depth), *seeded) if depth > 0 \
            else self._sync("--no-push")
        problems = list(report.get("errors") or [])
        pushed = int(report.get("pushed") or 0)
        tasks = done_already + pushed + open_before
        if pushed == 0 and not open_before:
            return LabelRound(done_already, done_already, tuple(problems))
        if self.annotate:
            return self._wait_for_person(turn, before, tasks, problems)
        self._learn_answers()
        # the bots draw the true boxes, as the random arm's labels are: the two arms differ in which frames they
        # label, not in how well (the world's person errs in the human action at the device, not here)
        tallies = self._label_cmd("bots", "--truth", str(self.truth_path), "--team", self.team, "--until-idle",
                                  "--box-jitter", "0",
                                  *(("--seed", str(self.seed % 2**63)) if self.seed is not None else ()),  # >= 0
                                  timeout=self.settle_s)
        answered = sum(int(t["answered"]) for t in tallies.values())
        self.correct += sum(int(t["correct"]) for t in tallies.values())
        # bring the annotations back: webhooks first, then a full reconciliation, until the hub has them
        target = start + answered
        deadline = time.monotonic() + self.return_s
        while True:
            report = self._sync("--no-push")
            got = self._labeled()
            if got >= target or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        problems += [e for e in report.get("errors") or [] if e not in problems]
        done = got - before
        self.say(f"Label Studio turn {turn}: pushed {pushed} tasks, {answered} annotations by {len(tallies)} "
                 f"simulated annotators ({self.correct} correct in all so far), {done} labels in the hub")
        if got - start < answered:
            problems.append(f"only {got - start} of {answered} annotations reached the hub within "
                            f"{self.return_s:.0f}s")
        return LabelRound(tasks, done, tuple(problems))

    def _wait_for_person(self, turn: int, before: int, tasks: int, problems: list[str]) -> LabelRound:
        """Wait until a person has labeled this turn's ``tasks`` in Label Studio's UI, or ends the turn early by
        creating :attr:`finish_path`; annotations come back through the bridge (webhooks, then reconciliation),
        and progress is said whenever it moves."""
        self.finish_path.unlink(missing_ok=True)
        self.say(f"turn {turn}: {tasks} task(s) wait for you in Label Studio at {self.url}, project "
                 f"{self.project!r}; label them there (the turn ends when all are labeled), or end the turn early "
                 f"with: touch {self.finish_path}")
        shown, early = -1, False
        while True:
            report = self._sync("--no-push")
            problems += [e for e in report.get("errors") or [] if e not in problems]
            done = self._labeled() - before
            if done != shown:
                self.say(f"turn {turn}: {done} / {tasks} labeled")
                shown = done
            if done >= tasks:
                break
            if self.finish_path.exists():
                self.finish_path.unlink(missing_ok=True)
                early = True
                break
            time.sleep(self.poll_s)
        return LabelRound(tasks, done, tuple(problems), finished_early=early)

    def close(self) -> None:
        self.hub.close()
        if self.server is not None:
            self.server.stop()

    # -----------------------------------------------------------------------------------------

    def _label_cmd(self, *args: str, timeout: float = 300.0) -> Any:
        """``flywheel label ARGS --json`` as its own process; its last stdout line, parsed."""
        from fleet.sim.procs import flywheel_cmd, run_json

        return run_json(flywheel_cmd("label", *args, "--json"), self.dir / "bridge.log", env=self.env,
                        timeout=timeout, ok_codes=(0, 1))

    def _sync(self, *args: str) -> dict[str, Any]:
        """One bridge turn with the demo's settings (one annotator a task, a full reconciliation every turn,
        the whole budget let through at once: the bots keep no queue of their own); its report (exit code 1
        only says the report lists errors)."""
        report = self._label_cmd("sync", "--overlap", "1", "--overlap-share", "0", "--strategy", self.strategy,
                                 *(("--balance", self.balance) if self.balance else ()),
                                 "--horizon", "1", "--reconcile-every", "0", "--task", self.world.task, *args)
        if not isinstance(report, dict):
            raise RuntimeError(f"flywheel label sync printed no report: {report!r}")
        return report

    def _labeled(self) -> int:
        r = self.hub.get("/v1/pool", params={"state": "labeled", "limit": 1})
        r.raise_for_status()
        return int(r.json()["total"])

    def _open_slots(self) -> int:
        if not Path(self.env["FLYWHEEL_LABEL_STATE"]).exists():
            return 0
        status = self._label_cmd("status")
        return int(status["queue"]["open_slots"])

    def _learn_answers(self) -> None:
        """The true label of every case queued for annotators, for the bots (they answer from it)."""
        offset = 0
        while True:
            r = self.hub.get("/v1/pool", params={"state": "queued", "limit": 1000, "offset": offset})
            r.raise_for_status()
            cases = PoolPage.from_json(r.content).cases
            for c in cases:
                frame = c.case.tags.get("frame")
                if frame in self.world.truth:
                    self._answers[c.case_id] = {"case_id": c.case_id, "label": self.world.answer(frame),
                                                "key": str(frame)}
            offset += len(cases)
            if len(cases) < 1000:
                break
        self.truth_path.write_text("".join(json.dumps(row) + "\n" for row in self._answers.values()))
