"""The trigger campaigns a device evaluates: built from the hub's assignment, state kept across restarts.

Each campaign's spec is validated with ``trigger.parse_spec``; a campaign whose spec or novelty bank
does not check out is refused with a log line and the others go on, and the hub is told why
(:meth:`Campaigns.flush_refusals`, ``POST /v1/campaign-refusals``), so an operator sees it there. A spec refused
stays refused for that campaign version; a novelty bank that arrives not hashing to the sha256 the assignment
names may have been corrupted on the way, so it is fetched again after BANK_RETRY_S, then twice as long each
time, up to BANK_RETRY_MAX_S (each failed try is a refusal the hub counts).
An evaluator's state (calibration, budgets, dedup memory) is saved as JSON beside the agent's data, so a
restart does not recalibrate from scratch or spend a budget twice. With no campaign assigned, an optional local
default spec applies.

Calibrated thresholds are kept per model version (:meth:`Campaigns.use_model`): a threshold fitted to
one model's scores means nothing for another's, so after an OTA the triggers calibrate afresh on the new
model, and a rollback returns to the old model's thresholds. Budgets and dedup memory are the device's,
whatever model runs, and carry over.

Novelty banks are per model version too: a bank holds one model's embeddings, and distances to it mean
nothing for another model's. The hub names the version each campaign's bank was built in
(``CampaignRef.novelty_bank_version``); a campaign is live only while that version is the model the device
runs. A campaign whose bank is for another model is built but parked (its bank already fetched, so an OTA
or a rollback to that model brings it in at once, without a download on the inference path); a campaign
whose hub has no bank yet for the assigned model waits (retried at each assignment, logged once). So a
device never scores novelty against another model's bank: between an OTA and the bank of the new model,
the campaign is paused.

A learned leaf (a ``learned_*`` trigger: the hub's weights over one model's scores, fleet.hub.learned) belongs to
one model in the same way. The hub sends each campaign with the leaf fitted for the model the same assignment
makes active (fleet.hub.learned.spec_for_model), so a campaign with such a leaf is live only while that model
runs: between taking the assignment and the OTA swap (a download, a canary check), or after the device falls back
to another model on its own, it is parked, and the old model's outputs are never scored with the new model's
weights. The assignment's model is recorded with its campaigns, so this holds across a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.edge.fsutil import atomic_write_json
from fleet.edge.hubclient import HubClient
from fleet.errors import FlywheelError, IntegrityError, InvalidInput, NotFound, PermanentError, RetryableError
from fleet.protocol import CampaignRef, CampaignRefusal
from fleet.protocol.campaigns import MAX_REASON

log = logging.getLogger(__name__)

ASSIGNED_FILE = "assigned.json"  # {"model_version": the assignment's active model, "campaigns": [its refs]}
LEARNED_PREFIX = "learned_"  # trigger kinds whose parameters are the hub's fit to one model's scores
MAX_PENDING_REFUSALS = 64  # refusals kept for the hub while it cannot be told (the newest)
BANK_RETRY_S = 60.0  # a bank that arrived not hashing to its sha256 is fetched again after this, then twice as long
BANK_RETRY_MAX_S = 3600.0  # ... up to this between tries


@dataclass(eq=False)
class Campaign:
    campaign_id: str
    version: int | None  # None for the local default spec
    evaluator: Any  # trigger.Evaluator
    expires_at: float | None = None
    model_version: str | None = None  # the model the evaluator's calibrators are fitted to
    calibrations: dict[str, Any] = field(default_factory=dict)  # other models' calibration, by version
    bank_version: str | None = None  # the model whose embeddings the novelty bank holds (None: no bank, or unknown)
    bank_key: tuple[str | None, str | None] = (None, None)  # (bank id, sha256) it was built with
    leaf_version: str | None = None  # the model its learned leaf was fitted for (None: it has no learned leaf)
    spec_digest: str = ""  # of the spec it was built from (the hub may send one version in two forms)

    @property
    def key(self) -> str:
        return f"{self.campaign_id}-v{self.version}" if self.version is not None else f"{self.campaign_id}-local"

    def use_model(self, version: str) -> bool:
        """Fit the calibrators to ``version``: keep the current model's, take back ``version``'s if this
        campaign ran it before, else start afresh. True when anything changed."""
        if version == self.model_version:
            return False
        if self.model_version is None:  # a campaign that never ran (or state saved before this was kept)
            self.model_version = version
            return True
        self.calibrations[self.model_version] = self.evaluator.calibration_state()
        self.evaluator.load_calibration(self.calibrations.pop(version, None))
        previous, self.model_version = self.model_version, version
        if previous is not None and self.evaluator.calibrators:
            log.info("campaign %s: triggers calibrated for model %s (were for %s)", self.key, version, previous)
        return True


class Campaigns:
    """Holds the live campaigns. ``apply`` runs on the control thread; ``current`` is swapped whole.
    Hold ``lock`` while running the evaluators: saving their state takes it too."""

    def __init__(
        self,
        client: HubClient | None,
        state_dir: str | Path,
        *,
        default_spec: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self.lock = threading.RLock()
        self._default = self._build_default(default_spec) if default_spec is not None else None
        self.current: tuple[Campaign, ...] = (self._default,) if self._default else ()
        self._assigned: tuple[Campaign, ...] = ()  # built from the assignment, live or parked (see fits)
        self._refused: set[tuple[str, int, str]] = set()  # (campaign, version, spec digest)
        self._waiting: set[tuple[str, int, str | None]] = set()  # logged once: (campaign, version, bank version)
        self._untold: list[tuple[str, int, str, float]] = []  # refusals the hub has not had: (id, version, why, when)
        self._bank_retry: dict[tuple[str, int, str], tuple[int, float]] = {}  # refused on a bank: (tries, next at)
        self.model_version: str | None = None  # the active model the triggers run on (see use_model)
        self._restore_assigned()

    def use_model(self, version: str) -> None:
        """The active model is now ``version``: each campaign's calibrated thresholds follow it, and campaigns
        whose novelty bank is another model's are paused (parked ones for ``version`` come back)."""
        if version == self.model_version:
            return
        with self.lock:
            self.model_version = version
            self._go_live()
            for c in self.current:
                c.use_model(version)

    def fits(self, c: Campaign) -> bool:
        """Whether ``c`` may run on the current model: its novelty bank (if any) holds this model's space and its
        learned leaf (if any) was fitted to this model's scores."""
        return self.waits_for(c) is None

    def waits_for(self, c: Campaign) -> str | None:
        """None when ``c`` may run on the current model, else why not (the model its bank or leaf belongs to)."""
        if self.model_version is None:
            return None
        if c.bank_version is not None and c.bank_version != self.model_version:
            return f"its novelty bank holds model {c.bank_version}'s embeddings"
        if c.leaf_version is not None and c.leaf_version != self.model_version:
            return f"its learned leaf was fitted for model {c.leaf_version}"
        return None

    def apply(self, refs: Sequence[CampaignRef], model_version: str | None = None) -> tuple[Campaign, ...]:
        """Make the live set match the assignment's campaigns that fit the model (or the default spec if none do).
        ``model_version``: the active model of the same assignment, which the campaigns' learned leaves were
        fitted for (None: not known, an assignment recorded before it was kept; the leaves then run whatever
        model runs)."""
        now = self.clock()
        built = {_key(c.campaign_id, c.version, c.bank_key, c.spec_digest): c for c in self._assigned}
        out: list[Campaign] = []
        for ref in refs:
            if ref.expires_at is not None and ref.expires_at <= now:
                continue
            digest = spec_digest(ref.spec)
            key = _key(ref.campaign_id, ref.version, (ref.novelty_bank, ref.novelty_bank_sha256), digest)
            if key in built:
                built[key].leaf_version = _leaf_version(built[key], model_version)
                out.append(built[key])
                continue
            if (ref.campaign_id, ref.version, digest) in self._refused:
                if now < self._bank_retry.get((ref.campaign_id, ref.version, digest), (0, float("inf")))[1]:
                    continue
                self._refused.discard((ref.campaign_id, ref.version, digest))  # its bank is fetched again
            campaign = self._build(ref, digest)
            if campaign is not None:
                campaign.leaf_version = _leaf_version(campaign, model_version)
                why = self.waits_for(campaign)
                log.info("campaign %s v%d is %s", ref.campaign_id, ref.version,
                         "live" if why is None else f"parked: {why}, the device runs {self.model_version}")
                out.append(campaign)
        with self.lock:  # what leaves the live set saves its state there; a parked campaign never ran
            self._assigned = tuple(out)
            self._go_live()
        self._remember(refs, model_version)
        return self.current

    def flush_refusals(self, device_id: str) -> None:
        """Tell the hub which campaign versions this device refused, and why; keep those that hit a retryable
        fault for the next call. A hub that refuses one (or predates refusals: 404) is logged, not asked again."""
        if self.client is None:
            return
        with self.lock:
            pending, self._untold = self._untold, []
        keep: list[tuple[str, int, str, float]] = []
        for i, (campaign_id, version, reason, at) in enumerate(pending):
            try:
                self.client.send_campaign_refusal(CampaignRefusal(
                    device_id=device_id, campaign_id=campaign_id, version=version,
                    reason=reason[:MAX_REASON], refused_at=at))
            except RetryableError as exc:
                log.debug("refusal of campaign %s v%d not delivered yet: %s", campaign_id, version, exc)
                keep = pending[i:]
                break
            except NotFound as exc:
                log.warning("the hub did not take the refusal of campaign %s v%d: %s", campaign_id, version, exc)
            except PermanentError as exc:
                log.error("the hub refused the refusal of campaign %s v%d: %s", campaign_id, version, exc)
        with self.lock:
            self._untold = (keep + self._untold)[-MAX_PENDING_REFUSALS:]

    def save_state(self) -> None:
        """Persist every live evaluator's state."""
        with self.lock:
            for c in self.current:
                self._save(c)

    # -- private ------------------------------------------------------------------------------

    def _go_live(self) -> None:
        """Set ``current`` to the assigned campaigns that fit the model (else the default spec); hold ``lock``.

        Campaigns that leave save their state first; those that come in (a parked one: the same campaign with
        the bank or the learned leaf of the model now running) take it back, so budgets and dedup memory carry
        over."""
        live = [c for c in self._assigned if self.fits(c)]
        paused = {id(c): why for c in self._assigned if (why := self.waits_for(c)) is not None}
        if not live and self._default is not None:  # nothing assigned runs (none, or all paused): the local spec
            live = [self._default]
        leaving = [c for c in self.current if all(c is not o for o in live)]
        for c in leaving:
            self._save(c)
            if id(c) in paused:
                log.info("campaign %s paused: %s, the device runs %s", c.key, paused[id(c)], self.model_version)
        for c in live:
            if all(c is not o for o in self.current):
                self._restore(c)
                if self.model_version is not None:
                    c.use_model(self.model_version)
        self.current = tuple(live)

    def _build(self, ref: CampaignRef, digest: str) -> Campaign | None:
        from trigger import Evaluator, SpecError, parse_spec

        try:
            spec = parse_spec(ref.spec)
            if "bank" in spec.needs and ref.novelty_bank is None and ref.novelty_bank_version is not None:
                self._wait(ref)
                return None
            bank = self._bank(ref) if ref.novelty_bank else None
            evaluator = Evaluator(spec, bank=bank, clock=self.clock)
        except RetryableError as exc:
            log.warning("campaign %s v%d: novelty bank not fetched yet (%s); will retry",
                        ref.campaign_id, ref.version, exc)
            return None
        except (SpecError, FlywheelError, ValueError) as exc:
            key = (ref.campaign_id, ref.version, digest)
            self._refused.add(key)
            why = str(exc)
            if isinstance(exc, IntegrityError):  # corrupted on the way, perhaps: fetched again later, less often
                tries = self._bank_retry.get(key, (0, 0.0))[0] + 1
                wait = min(BANK_RETRY_MAX_S, BANK_RETRY_S * 2 ** (tries - 1))
                self._bank_retry[key] = (tries, self.clock() + wait)
                why = f"{why} (try {tries}; fetching it again in {wait:.0f} s)"
            log.error("refusing campaign %s v%d from the hub: %s", ref.campaign_id, ref.version, why)
            with self.lock:
                self._untold = [*self._untold, (ref.campaign_id, ref.version, why, self.clock())][
                    -MAX_PENDING_REFUSALS:]
            return None
        self._bank_retry.pop((ref.campaign_id, ref.version, digest), None)
        self._waiting.discard((ref.campaign_id, ref.version, ref.novelty_bank_version))
        return Campaign(ref.campaign_id, ref.version, evaluator, ref.expires_at,
                        bank_version=ref.novelty_bank_version if bank is not None else None,
                        bank_key=(ref.novelty_bank, ref.novelty_bank_sha256), spec_digest=digest)

    def _wait(self, ref: CampaignRef) -> None:
        key = (ref.campaign_id, ref.version, ref.novelty_bank_version)
        if key not in self._waiting:
            self._waiting.add(key)
            log.warning("campaign %s v%d paused: the hub has no novelty bank for model %s yet; waiting for it",
                        ref.campaign_id, ref.version, ref.novelty_bank_version)

    def _build_default(self, doc: dict[str, Any]) -> Campaign:
        from trigger import Evaluator, SpecError, parse_spec

        try:
            spec = parse_spec(doc)
        except SpecError as exc:
            raise InvalidInput(f"triggers.default_spec is not a valid trigger spec: {exc}") from exc
        campaign = Campaign(spec.id, None, Evaluator(spec, clock=self.clock), spec.expires_at)
        self._restore(campaign)
        return campaign

    def _bank(self, ref: CampaignRef) -> Any:
        from trigger import NoveltyBank

        assert ref.novelty_bank is not None
        if self.client is None:
            raise InvalidInput(f"campaign {ref.campaign_id} needs novelty bank {ref.novelty_bank} but no hub is set")
        path = self.state_dir / f"bank-{ref.novelty_bank}.npz"
        if not (path.exists() and ref.novelty_bank_sha256 and _sha256(path) == ref.novelty_bank_sha256):
            tmp = path.with_suffix(".part")
            got = self.client.download_novelty_bank(ref.novelty_bank, tmp)
            if ref.novelty_bank_sha256 and got != ref.novelty_bank_sha256:
                tmp.unlink(missing_ok=True)
                raise IntegrityError(
                    f"novelty bank {ref.novelty_bank}: sha256 {got}, expected {ref.novelty_bank_sha256}"
                )
            tmp.replace(path)
        return NoveltyBank.load(path)

    def _remember(self, refs: Sequence[CampaignRef], model_version: str | None) -> None:
        """Keep the assignment's campaigns and its model on disk, so the next start mines at once, even offline."""
        doc = {"model_version": model_version, "campaigns": [r.to_dict() for r in refs]}
        path = self.state_dir / ASSIGNED_FILE
        try:
            if not path.exists() or json.loads(path.read_text()) != doc:
                atomic_write_json(path, doc)
        except (OSError, ValueError) as exc:
            log.warning("could not record the assigned campaigns: %s", exc)

    def _restore_assigned(self) -> None:
        path = self.state_dir / ASSIGNED_FILE
        if not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
            if isinstance(doc, list):  # recorded before the assignment's model was kept with its campaigns
                doc = {"model_version": None, "campaigns": doc}
            if not isinstance(doc, dict) or not isinstance(doc.get("campaigns"), list):
                raise ValueError(f"expected an object with a list of campaigns; received {type(doc).__name__}")
            model_version = doc.get("model_version")
            if model_version is not None and not isinstance(model_version, str):
                raise ValueError(f"model_version must be a string or null; received {model_version!r}")
            refs = [CampaignRef.from_dict(d) for d in doc["campaigns"]]
        except (OSError, ValueError, TypeError, FlywheelError) as exc:
            log.warning("recorded campaigns in %s are unusable (%s); waiting for the hub", path, exc)
            return
        self.apply(refs, model_version)
        if refs:
            log.info("resumed %d campaign(s) from the last assignment", len(self.current))

    def _state_path(self, c: Campaign) -> Path:
        return self.state_dir / f"{c.key}.state.json"

    def _restore(self, c: Campaign) -> None:
        path = self._state_path(c)
        if not path.exists():
            return
        try:
            state = json.loads(path.read_text())
            c.evaluator.load_state_dict(state)
            by_model = state.get("calibration_by_model") or {}
            if not isinstance(by_model, dict):
                raise ValueError(f"calibration_by_model must be an object; received {type(by_model).__name__}")
            c.calibrations = dict(by_model)
            saved_for = state.get("model_version")
            c.model_version = saved_for if isinstance(saved_for, str) else None
            log.info("campaign %s: restored trigger state from %s", c.key, path.name)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("campaign %s: saved trigger state unusable (%s); starting fresh", c.key, exc)

    def _save(self, c: Campaign) -> None:
        state = {**c.evaluator.state_dict(), "model_version": c.model_version, "calibration_by_model": c.calibrations}
        try:
            atomic_write_json(self._state_path(c), state)
        except (OSError, TypeError, ValueError) as exc:
            log.warning("campaign %s: could not save trigger state: %s", c.key, exc)


def _leaf_version(c: Campaign, model_version: str | None) -> str | None:
    """The model ``c``'s learned leaf was fitted for: the assignment's model when its spec has such a leaf."""
    if model_version is None or not any(x.trigger.startswith(LEARNED_PREFIX) for x in c.evaluator.spec.leaves):
        return None
    return model_version


def _key(campaign_id: str, version: int | None, bank: tuple[str | None, str | None], digest: str
         ) -> tuple[str, int | None, str | None, str | None, str]:
    """What identifies a built campaign: a new campaign version, a new bank for it, or another form of its spec
    (with or without a learned leaf fitted for another model, fleet.hub.learned.spec_for_model) is a new
    evaluator; it takes back what still matches of the state the one it replaces saved (by trigger label)."""
    return (campaign_id, version, *bank, digest)


def spec_digest(spec: dict[str, Any]) -> str:
    """A short sha256 of the spec's canonical JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
