"""Simulated annotators: Label Studio users who take tasks from the real queue and answer from ground truth.

Each bot signs up once through the organization's invite link (like a person), logs in, and then
works like an annotator: asks Label Studio for its next task (so uncertainty sampling, overlap and
task locks all apply), answers correctly with probability ``accuracy`` (otherwise a wrong class at
random), takes ``seconds_per_task`` on average, and skips a share of tasks. For fault tests a bot can
also send malformed answers. Used by the demo and the benchmarks.

On a detect project a bot draws boxes: the true boxes with a person's small errors. Each true box is
missed with probability ``1 - accuracy``, and every box it draws has its corners jittered by Gaussian
noise of ``box_jitter`` times the box's width and height (clipped to the image).

In a team, an answer's draws (skip, slip, right or wrong, which boxes are missed, the jitter) are keyed by the
team's seed, the task's case (or a stable key the caller gives for it, such as the frame it shows: case ids are
made afresh by each upload) and how many answers the team has given that case before, not by the bot that
happens to take it: Label Studio serves each annotator a random one of its most uncertain tasks, so which bot
gets which task changes from run to run, while a seeded team gives every task the same answer each time. Two
annotators of one task (overlap above 1) still draw apart (the second answer has its own key); a bot's spec
(its accuracy, jitter, skip rate) still sets what each draw means. Think times stay the bot's own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from fleet.consensus import detection_f1
from fleet.errors import Conflict, FlywheelError, InvalidInput, RetryableError
from fleet.protocol import Box, Detection
from labeling.configs import FROM_NAME, TO_NAME, classification_result, detection_result
from labeling.login import user_token
from labeling.studio import Studio

log = logging.getLogger(__name__)

BOT_DOMAIN = "bots.flywheel.local"

Truth = int | Detection | None  # what a bot knows of a case: its class, or its true boxes


@dataclass(frozen=True)
class BotSpec:
    """One simulated annotator: how often it is right, how fast it works, how often it skips."""

    name: str
    accuracy: float = 0.9
    seconds_per_task: float = 2.0
    skip_rate: float = 0.0
    malformed_rate: float = 0.0
    box_jitter: float = 0.03  # detect: corner noise, as a fraction of the box's width and height

    def __post_init__(self) -> None:
        if not math.isfinite(self.box_jitter) or not 0.0 <= self.box_jitter <= 0.5:
            raise InvalidInput(f"box_jitter must lie in [0, 0.5]; received {self.box_jitter!r}")
        if not self.name.replace("-", "").replace("_", "").isalnum():
            raise InvalidInput(f"bot name must be letters, digits, '-' or '_'; received {self.name!r}")
        for attr in ("accuracy", "skip_rate", "malformed_rate"):
            value = getattr(self, attr)
            if not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{attr} must lie in [0, 1]; received {value!r}")
        if not math.isfinite(self.seconds_per_task) or self.seconds_per_task < 0:
            raise InvalidInput(f"seconds_per_task must be >= 0; received {self.seconds_per_task!r}")

    @property
    def email(self) -> str:
        return f"{self.name}@{BOT_DOMAIN}"


def parse_bot_specs(text: str) -> list[BotSpec]:
    """``"3x0.9@2"`` (three bots, 90% accurate, 2 s per task) or ``"alice:0.95@1,bob:0.7@3"``."""
    specs: list[BotSpec] = []
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        try:
            head, _, speed = part.partition("@")
            seconds = float(speed) if speed else 2.0
            if "x" in head and ":" not in head:
                count, _, acc = head.partition("x")
                specs += [BotSpec(f"bot-{len(specs) + j + 1}", float(acc or 0.9), seconds) for j in range(int(count))]
            else:
                name, _, acc = head.partition(":")
                specs.append(BotSpec(name or f"bot-{i + 1}", float(acc or 0.9), seconds))
        except ValueError as exc:
            raise InvalidInput(f"bot spec {part!r} is not 'NxACCURACY@SECONDS' or 'NAME:ACCURACY@SECONDS' "
                               f"({exc})") from None
    return specs


@dataclass
class BotStats:
    answered: int = 0
    correct: int = 0
    skipped: int = 0
    malformed: int = 0
    errors: int = 0
    submitted_at: list[tuple[int, float]] = field(default_factory=list)  # (annotation id, unix time)
    served: list[str | None] = field(default_factory=list)  # case ids in the order the queue gave them
    answers: dict[str, Detection] = field(default_factory=dict)  # detect: the boxes drawn, by case id


class Bot:
    """One annotator at work. ``truth`` maps a case id to its class index, or on a detect project to its true
    boxes (a :class:`Detection`); None when unknown."""

    def __init__(self, spec: BotSpec, studio: Studio, project_id: int, truth: Callable[[str], Truth],
                 class_names: Sequence[str], *, seed: int | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 draws: Callable[[str], np.random.Generator] | None = None) -> None:
        self.spec = spec
        self.studio = studio
        self.project_id = project_id
        self.truth = truth
        self.class_names = list(class_names)
        self.rng = np.random.default_rng(seed)
        self.draws = draws  # a task's own draws, by case id (a team's); else the bot's generator
        self.sleep = sleep
        self.stats = BotStats()
        self._lock = threading.Lock()

    def answer(self, case_id: str | None) -> tuple[list[dict[str, Any]], bool, bool, int | Detection | None]:
        """``(result, was_cancelled, malformed, label)`` for one task, drawn from the bot's spec."""
        k = len(self.class_names)
        rng = self.draws(case_id) if self.draws is not None and case_id else self.rng
        if rng.random() < self.spec.skip_rate:
            return [], True, False, None
        known = self.truth(case_id) if case_id else None
        if isinstance(known, Detection):
            return self._draw(known, rng)
        if rng.random() < self.spec.malformed_rate:
            two = list(rng.choice(self.class_names, size=min(2, k), replace=False))
            bad = [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "choices", "value": {"choices": two}}]
            return bad, False, True, None
        if known is None:
            label = int(rng.integers(k))
        elif rng.random() < self.spec.accuracy or k == 1:
            label = int(known)
        else:
            label = int(rng.choice([c for c in range(k) if c != known]))
        return classification_result(self.class_names[label]), False, False, label

    def _draw(self, truth: Detection, rng: np.random.Generator) -> tuple[list[dict[str, Any]], bool, bool,
                                                                         Detection | None]:
        """The true boxes with a person's errors (see the module docstring), or a malformed region."""
        if rng.random() < self.spec.malformed_rate:  # a box of no size, as a slipped click makes
            bad = [{"from_name": FROM_NAME, "to_name": TO_NAME, "type": "rectanglelabels",
                    "value": {"x": 10.0, "y": 10.0, "width": 0.0, "height": 0.0, "rotation": 0,
                              "rectanglelabels": [self.class_names[0]]}}]
            return bad, False, True, None
        xyxy = np.array([[b.x1, b.y1, b.x2, b.y2] for b in truth.boxes], np.float64).reshape(-1, 4)
        kept = rng.random(len(xyxy)) < self.spec.accuracy
        size = np.tile(xyxy[:, 2:] - xyxy[:, :2], 2)
        drawn = np.clip(xyxy + rng.normal(0.0, self.spec.box_jitter, xyxy.shape) * size, 0.0, 1.0)
        ok = kept & (drawn[:, 2] > drawn[:, 0] + 1e-4) & (drawn[:, 3] > drawn[:, 1] + 1e-4)
        answer = Detection([Box(x1, y1, x2, y2, truth.boxes[i].label)
                            for i, (x1, y1, x2, y2) in zip(np.flatnonzero(ok), drawn[ok].tolist(), strict=True)])
        return detection_result(answer, self.class_names), False, False, answer

    def step(self) -> bool:
        """Take and answer one task. False when the queue has nothing for this bot."""
        task = self.studio.next_task(self.project_id)
        if task is None:
            return False
        result, cancelled, malformed, label = self.answer(task.case_id)
        seconds = self._think_time()
        if seconds:
            self.sleep(seconds)
        unique = str(uuid.uuid4())  # the same id on every retry: a lost answer cannot become two annotations
        try:
            ann = self.studio.create_annotation(task.id, result, unique_id=unique, was_cancelled=cancelled,
                                                lead_time=round(seconds, 3))
            ann_id = ann.id
        except Conflict:
            ann_id = -1
        with self._lock:
            self.stats.served.append(task.case_id)
            self.stats.submitted_at.append((ann_id, time.time()))
            if cancelled:
                self.stats.skipped += 1
            elif malformed:
                self.stats.malformed += 1
            else:
                self.stats.answered += 1
                known = self.truth(task.case_id) if task.case_id else None
                if isinstance(label, Detection) and task.case_id:
                    self.stats.answers[task.case_id] = label
                    self.stats.correct += int(isinstance(known, Detection) and detection_f1(label, known) == 1.0)
                else:
                    self.stats.correct += int(known is not None and label == known)
        return True

    def run(self, stop: threading.Event, *, max_tasks: int | None = None, idle_s: float = 0.5) -> BotStats:
        done = 0
        while not stop.is_set() and (max_tasks is None or done < max_tasks):
            try:
                worked = self.step()
            except RetryableError as exc:
                log.warning("bot %s: %s", self.spec.name, exc)
                self.stats.errors += 1
                stop.wait(idle_s)
                continue
            except FlywheelError as exc:
                log.error("bot %s: %s", self.spec.name, exc)
                self.stats.errors += 1
                stop.wait(idle_s)
                continue
            if worked:
                done += 1
            else:
                stop.wait(idle_s)
        return self.stats

    def _think_time(self) -> float:
        mean = self.spec.seconds_per_task
        if mean <= 0:
            return 0.0
        sigma = 0.35  # lognormal spread around the mean
        return float(self.rng.lognormal(math.log(mean) - sigma**2 / 2, sigma))


def enroll(url: str, admin: Studio, specs: Sequence[BotSpec], *, password: str,
           transport: httpx.BaseTransport | None = None) -> dict[str, str]:
    """Sign each bot up (or log it in) and return its API token by name."""
    invite = admin.invite_token()
    return {s.name: user_token(url, s.email, password, invite_token=invite, transport=transport) for s in specs}


class BotTeam:
    """Several bots working the same project, in threads or one after another. Answers are drawn per task (see
    the module docstring)."""

    def __init__(self, url: str, admin: Studio, project_id: int, specs: Sequence[BotSpec],
                 truth: Callable[[str], Truth], class_names: Sequence[str], *,
                 password: str = "flywheel-bot-password", seed: int = 0,
                 http_factory: Callable[[], httpx.Client] | None = None,
                 draw_key: Callable[[str], str | None] | None = None) -> None:
        tokens = enroll(url, admin, specs, password=password)
        self.seed = seed
        self.draw_key = draw_key  # a case's stable key for its draws (None: the case id)
        self._given: Counter[str] = Counter()  # answers drawn so far, by case id
        self._given_lock = threading.Lock()
        self.bots = [
            Bot(s, Studio(url, tokens[s.name], http=http_factory() if http_factory else None), project_id, truth,
                class_names, seed=seed + i, draws=self.draws)
            for i, s in enumerate(specs)
        ]
        self.stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def draws(self, case_id: str) -> np.random.Generator:
        """The draws for the team's next answer to ``case_id``: keyed by the seed, the case's key (its id when it
        has none) and how many answers the team has drawn for the case before."""
        with self._given_lock:
            nth = self._given[case_id]
            self._given[case_id] += 1
        key = (self.draw_key(case_id) if self.draw_key is not None else None) or case_id
        return np.random.default_rng([self.seed, zlib.crc32(key.encode()), nth])

    def start(self, *, max_tasks: int | None = None) -> None:
        for bot in self.bots:
            t = threading.Thread(target=bot.run, args=(self.stop,), kwargs={"max_tasks": max_tasks},
                                 name=f"bot-{bot.spec.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def join(self, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for t in self._threads:
            t.join(None if deadline is None else max(deadline - time.monotonic(), 0))

    def close(self) -> None:
        self.stop.set()
        self.join(10)
        for bot in self.bots:
            bot.studio.close()

    def run_until_idle(self, *, idle_rounds: int = 1) -> None:
        """Work in this thread, bot after bot, until no bot gets a task ``idle_rounds`` times in a row."""
        idle = 0
        while idle < idle_rounds:
            worked = False
            for bot in self.bots:
                worked |= bot.step()
            idle = 0 if worked else idle + 1

    @property
    def stats(self) -> dict[str, BotStats]:
        return {b.spec.name: b.stats for b in self.bots}
