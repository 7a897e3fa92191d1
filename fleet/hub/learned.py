"""The learned trigger, fitted on the hub: which frames the deployed classifier gets wrong, predicted from the
scores the device computes (:mod:`trigger.learned`), shipped to devices as a ``learned_error`` leaf of the
campaign's spec.

:func:`learn` takes the campaign's labeled ``classify`` cases captured by the active model (a fit is per model
version: another model's scores mean something else), computes each case's features from its stored payload
with the device's own :func:`trigger.learned.error_features`, and fits a logistic regression by Newton's method
(iteratively reweighted least squares) with an L2 penalty :data:`L2` on the weights. It needs
:data:`MIN_CASES` labeled cases with both outcomes. The campaign gets a new version whose rule also fires on
the ``learned_error`` leaf at the asked ``target_rate`` (the device calibrates the threshold); an earlier
learned leaf is replaced. The answer reports the fit: cases, errors, weights and the training AUC.

For a detector (the model's manifest has ``detector``) the cases are its labeled ``detect`` cases, and the leaf is
a ``learned_box_error_count``: a Poisson regression (:func:`fit_poisson`, penalty :data:`POISSON_L2`) of how many
boxes the label contradicts on each case (the model's boxes at its operating threshold against the label's:
missed, extra, class flips) on the box features of :func:`trigger.learned.box_error_features` and their products
two by two, computed from the stored boxes the device uploaded. Its value is the expected number of box errors on
a frame, so a budget goes to the frames with the most errors (see :mod:`trigger.learned` for the measurement). The
training AUC is of its value against "the case has a box error".

With the model's own novelty bank (its training set's embeddings and labels, uploaded by the trainer with each
model) the leaf is a ``learned_error_knn`` instead: one more feature, the share of each frame's
:data:`KNN_K` nearest bank entries labeled another class than the model's top class
(:func:`trigger.learned.neighbour_features`), computed here from each labeled case's stored embedding against
that bank, and on the device from the frame's embedding against the same bank (the hub hands a device the bank
of the model it runs). Rule: the bank feature is used when the active model has a bank with at least one known
label and every case of the fit has an embedding of the bank's width; else the leaf is a plain ``learned_error``.
Where the human's action is unknown the bank feature is what lifts the learned trigger's error capture
(`benchmarks/bench_error_capture.py`).

A fit belongs to the model it was fitted for (the version's ``learned_for``; its ``learned_rate`` the rate asked).
Which model that is (:func:`fit_model`): the model the campaign's devices run outside a rollout. A campaign aimed
at groups that all run one model of their own (a group rollout completed on them) is fitted for that model, on the
cases it captured; any other campaign (no groups, or groups running different models) for the fleet's active
model, and a device running another model gets the campaign without the leaf (:func:`spec_for_model`). When that
model changes (:func:`follow_models`, from :func:`fleet.hub.rollouts.promote`, from a group rollout's completion and
from a group's unpinning), each campaign with a learned leaf gets a new version: the leaf refitted for the new model
where its labeled cases suffice, else the rule without the leaf (its budget share back to the others), so that no
device scores frames with weights fitted to another model's scores. While the leaf waits, every accepted label of
the campaign's cases tries the refit again (:func:`refit_waiting`, from :func:`fleet.hub.labels.apply`), and the
first that finds enough cases publishes it. During a canary the model the campaign's devices run is still the old
one, and so is the leaf; a rollback changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from fleet.errors import ProtocolError
from fleet.hub.blobs import BlobStore
from fleet.hub.campaign_versions import latest_live, next_version
from fleet.hub.ingest import decode_embedding_bytes, detection_boxes
from fleet.hub.models import Campaign, CaseRow, ModelVersion, NoveltyBankRow
from fleet.hub.running import active_model, model_for_group
from fleet.hub.yields import DEFAULT_OPERATING, model_wrong
from fleet.protocol import Detection, LearnedFit
from trigger.learned import (
    BANK_FEATURES,
    BOX_COUNT_FEATURES,
    FEATURES,
    box_error_features,
    error_features,
    neighbour_features,
    with_pairs,
)

log = logging.getLogger(__name__)

LEAF = "learned_error"  # the leaf's label, whichever kind it is
KNN_LEAF = "learned_error_knn"
BOX_LEAF = "learned_box_error_count"  # a detector's
KNN_K = 10  # bank neighbours read by the bank feature
MIN_CASES = 30
L2 = 1.0
POISSON_L2 = 1e-3  # on the mean deviance: the best of 1e-5..3e-2 at 100, 300 and 3000 fitted frames (bench world)


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float = L2, iters: int = 100,
                 sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """``x (n, F)``, ``y (n,)`` in {0, 1} -> ``(weights (F,), bias)`` maximising the log-likelihood (each case's
    term times its ``sample_weight``, default 1) minus ``l2 / 2 * |w|^2`` (the bias is not penalised), by Newton's
    method until the step is below 1e-10."""
    n, f = x.shape
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    a = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(f + 1)
    penalty = np.diag([l2] * f + [0.0])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(a @ theta)))
        grad = a.T @ (sw * (y - p)) - penalty @ theta
        hess = a.T @ (a * (sw * p * (1.0 - p))[:, None]) + penalty + 1e-9 * np.eye(f + 1)
        step = np.linalg.solve(hess, grad)
        theta += step
        if float(np.abs(step).max()) < 1e-10:
            break
    return theta[:f], float(theta[f])


def fit_poisson(x: np.ndarray, y: np.ndarray, *, l2: float = POISSON_L2, iters: int = 100) -> tuple[np.ndarray, float]:
    """``x (n, F)``, ``y (n,)`` counts -> ``(weights (F,), bias)`` of the Poisson regression ``log E[y] = bias + x @
    weights`` minimising the mean of ``exp(eta) - y * eta`` (half the mean Poisson deviance, up to a constant) plus
    ``l2 / 2 * |w|^2`` (the bias is not penalised: scikit-learn's ``PoissonRegressor(alpha=l2)`` objective), by
    Newton's method with step halving, until the step is below 1e-10."""
    n, f = x.shape
    y = np.asarray(y, dtype=np.float64)
    if n == 0 or (y < 0).any() or not np.isfinite(y).all():
        raise ValueError(f"a Poisson fit needs n >= 1 finite counts >= 0; received {n} (min {y.min(initial=0.0)})")
    a = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(f + 1)
    theta[f] = np.log(max(float(y.mean()), 1e-9))
    penalty = np.diag([l2] * f + [0.0])

    def loss(t: np.ndarray) -> float:
        eta = np.clip(a @ t, -50.0, 50.0)
        return float(np.mean(np.exp(eta) - y * eta) + 0.5 * l2 * float(t[:f] @ t[:f]))

    current = loss(theta)
    for _ in range(iters):
        mu = np.exp(np.clip(a @ theta, -50.0, 50.0))
        grad = a.T @ (mu - y) / n + penalty @ theta
        hess = a.T @ (a * mu[:, None]) / n + penalty + 1e-9 * np.eye(f + 1)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while True:
            candidate = theta - scale * step
            value = loss(candidate)
            if value <= current or scale < 1e-6:
                break
            scale /= 2.0
        theta, current = candidate, value
        if float(np.abs(scale * step).max()) < 1e-10:
            break
    return theta[:f], float(theta[f])


def auc(score: np.ndarray, y: np.ndarray) -> float | None:
    """The area under the ROC curve (Mann-Whitney: the chance a random error scores above a random correct
    case, ties counting half), or None without both outcomes."""
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if not n_pos or not n_neg:
        return None
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inv]  # 1-based ranks, ties averaged
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _case_probs(payloads: list[dict[str, Any]]) -> np.ndarray:
    return np.asarray([c["prediction"]["probs"] for c in payloads], dtype=np.float64)


def case_features(payloads: list[dict[str, Any]]) -> np.ndarray:
    """The features of stored ``classify`` case payloads, as the device computes them."""
    probs = _case_probs(payloads)
    human = np.asarray([(c.get("human_action") or {}).get("label", -1) for c in payloads], dtype=np.int64)
    k = probs.shape[1]
    ch = np.full(probs.shape, np.nan)
    for i, c in enumerate(payloads):
        q = ((c.get("challenger") or {}).get("prediction") or {}).get("probs")
        if q is not None and len(q) == k:
            ch[i] = q
    return error_features(probs, human, ch)


def operating_threshold(mv: ModelVersion) -> float | None:
    """A detector's operating threshold (the boxes it reports score at least this), from its signed manifest;
    None for a classifier."""
    detector = ((mv.signed_manifest or {}).get("manifest") or {}).get("detector")
    return None if not detector else float(detector.get("operating_threshold", DEFAULT_OPERATING))


def detect_case_features(payloads: list[dict[str, Any]], *, floor: float) -> np.ndarray:
    """The features of stored ``detect`` case payloads (:data:`trigger.learned.BOX_FEATURES`), as the device
    computes them from the same boxes: the model's (every decoded box), the human's where known, the
    challenger's where it gave an output."""
    model = detect_boxes([p.get("prediction") for p in payloads])
    human = detect_boxes([p.get("human_action") for p in payloads])
    challenger = detect_boxes([(p.get("challenger") or {}).get("prediction") for p in payloads])
    return box_error_features(model, human, challenger, floor=floor)


def box_error_counts(payloads: list[dict[str, Any]], labels: list[dict[str, Any] | None], *,
                     floor: float) -> np.ndarray:
    """Per stored ``detect`` case, how many of its boxes the label contradicts: the model's boxes scoring at least
    ``floor`` against the label's (missed + extra + class flips, at IoU 0.5, one to one). A detector's fit counts a
    wrong case once per box error, so that the trigger ranks frames by how many errors they hold, as a fleet's
    upload budget is best spent (``benchmarks/bench_error_capture_detect.py`` measures capture so)."""
    from trigger.box_scores import box_disagreement

    model = detect_boxes([p.get("prediction") for p in payloads])
    truth = detect_boxes([lp if lp is not None else {"task": "detect", "boxes": []} for lp in labels])
    c = box_disagreement(model, truth, iou=0.5, floor=floor)
    out: np.ndarray = (c.missed + c.extra + c.flips).astype(np.float64)
    return out


def detect_boxes(detections: list[dict[str, Any] | None]) -> Any:
    """Stored detections (wire dicts, one per case) as :class:`trigger.boxes.Boxes`; a missing one is an unknown
    frame."""
    from trigger.boxes import Boxes

    def one(d: dict[str, Any] | None) -> Boxes:
        if not d or d.get("task", "detect") != "detect":
            return Boxes.empty(1, known=np.zeros(1, bool))
        return detection_boxes([Detection.from_dict(d)])

    return Boxes.concat([one(d) for d in detections])


def model_bank(s: Session, blobs: BlobStore | None, version: str) -> tuple[Any, str, str]:
    """The newest novelty bank of model ``version`` when it has known labels (a ``trigger.NoveltyBank``), else
    None; with the bank's name (empty when there is no bank row) and a sentence describing the bank, or saying
    why there is none. A bank whose blob cannot be read is logged and treated as absent: the fit goes on without
    it."""
    from trigger import NoveltyBank

    if blobs is None:
        return None, "", "this hub has no blob store to read novelty banks from"
    row = s.exec(select(NoveltyBankRow).where(NoveltyBankRow.model_version == version)
                 .order_by(col(NoveltyBankRow.created_at).desc())).first()
    if row is None:
        return None, "", f"model {version} has no novelty bank"
    name = f"novelty bank {row.bank_id} of model {version}"
    try:
        bank = NoveltyBank.from_bytes(blobs.get(row.sha256), expected_sha256=row.sha256)
    except Exception as exc:  # noqa: BLE001 - a missing or damaged blob only costs the feature
        log.warning("%s unreadable (%s); fitting without the bank feature", name, exc)
        return None, name, f"{name} could not be read ({exc})"
    if not (bank.labels >= 0).any():
        return None, name, f"{name} has no labels"
    return bank, name, f"{name} ({len(bank.labels)} entries, k={KNN_K})"


def bank_features(payloads: list[dict[str, Any]], embeddings: list[bytes | None], bank: Any) -> np.ndarray | None:
    """:func:`case_features` plus the bank feature (``BANK_FEATURES``), or None when a case has no embedding of
    the bank's width (:func:`missing_embeddings` counts them)."""
    vecs = [decode_embedding_bytes(e) for e in embeddings]
    if any(v is None or v.shape != (bank.dim,) for v in vecs):
        return None
    x = case_features(payloads)
    probs = _case_probs(payloads)
    _, idx = bank.search(np.stack(vecs), k=KNN_K)  # type: ignore[arg-type]
    return np.column_stack([x, neighbour_features(probs, bank.labels[idx])])


def missing_embeddings(embeddings: list[bytes | None], dim: int) -> int:
    """How many cases have no embedding of width ``dim``."""
    return sum(1 for e in embeddings if (v := decode_embedding_bytes(e)) is None or v.shape != (dim,))


def fit_model(s: Session, row: Campaign) -> tuple[ModelVersion | None, str]:
    """The model campaign version ``row``'s learned leaf is fitted for, and how to name it: the model its devices
    run outside a rollout. Aimed at groups that all run one model of their own (:class:`fleet.hub.models.GroupModel`),
    that model; otherwise the fleet's active model (None without one)."""
    fleet = active_model(s)
    if row.groups:
        models = {g: model_for_group(s, g) for g in row.groups}
        versions = {m.version if m is not None else None for m in models.values()}
        own = next(iter(models.values()))
        if len(versions) == 1 and own is not None and (fleet is None or own.version != fleet.version):
            return own, f"model {own.version} (run by group{'s' * (len(models) > 1)} {', '.join(sorted(models))})"
    return fleet, f"the active model {fleet.version}" if fleet is not None else "no active model"


def learn(s: Session, campaign_id: str, *, now: float, target_rate: float, blobs: BlobStore | None = None,
          model: ModelVersion | None = None) -> tuple[Campaign, LearnedFit]:
    """Fit the campaign's learned trigger on the labeled cases of ``model`` (default: :func:`fit_model`'s, the
    model the campaign's devices run) and store the new version. ``blobs``: where that model's novelty bank is
    read from (without it, or without a bank, the leaf has no bank feature)."""
    from trigger import SpecError, parse_spec

    if not 0.0 < target_rate < 1.0:
        raise ProtocolError(f"target_rate must be in (0, 1); received {target_rate}")
    row = latest_live(s, campaign_id)
    active, named = (model, f"model {model.version}") if model is not None else fit_model(s, row)
    if active is None:
        raise ProtocolError("no active model: a learned trigger is fitted to the model the devices run")
    floor = operating_threshold(active)  # None: a classifier
    task = "classify" if floor is None else "detect"
    rows = s.exec(select(CaseRow.payload, CaseRow.label, CaseRow.predicted_class, CaseRow.embedding,
                         CaseRow.label_payload).where(
        CaseRow.campaign_id == campaign_id, CaseRow.model_version == active.version, CaseRow.task == task,
        CaseRow.label_status == "accepted")).all()
    payloads = [p for p, _, _, _, _ in rows]
    if floor is None:
        y = np.asarray([int(label != predicted) for _, label, predicted, _, _ in rows], dtype=np.float64)
    else:
        y = np.asarray([int(model_wrong("detect", None, None, p, lp, floor)) for p, _, _, _, lp in rows],
                       dtype=np.float64)
    if len(rows) < MIN_CASES or y.sum() == 0 or y.sum() == len(y):
        raise ProtocolError(f"a learned trigger for campaign {campaign_id!r} needs at least {MIN_CASES} labeled "
                            f"cases from {named} with both right and wrong ones; it has "
                            f"{len(rows)} {task} cases ({int(y.sum())} wrong)")
    x: np.ndarray | None = None
    if floor is not None:  # a detector: how many boxes each case got wrong, from the box features and their products
        kind, names = BOX_LEAF, BOX_COUNT_FEATURES
        bank_note = f"a detector's fit reads no bank (boxes reported from its operating threshold {floor:.3g})"
        x = with_pairs(detect_case_features(payloads, floor=floor))
        counts = np.maximum(box_error_counts(payloads, [lp for *_, lp in rows], floor=floor), y)
        w, b = fit_poisson(x, counts)
    else:
        bank, bank_name, bank_note = model_bank(s, blobs, active.version)
        embeddings = [e for _, _, _, e, _ in rows]
        x = None if bank is None else bank_features(payloads, embeddings, bank)
        if bank is not None and x is None:
            bank_note = (f"{missing_embeddings(embeddings, bank.dim)} of the {len(rows)} cases have no embedding "
                         f"of the width of {bank_name} ({bank.dim})")
        kind, names = (LEAF, FEATURES) if x is None else (KNN_LEAF, BANK_FEATURES)
        if x is None:
            x = case_features(payloads)
        w, b = fit_logistic(x, y)
    leaf = {"trigger": kind, "label": LEAF, "target_rate": target_rate, "bias": round(b, 6),
            **{f"w_{f}": round(float(v), 6) for f, v in zip(names, w, strict=True)}}
    if kind == KNN_LEAF:
        leaf["k"] = KNN_K
    if floor is not None:
        leaf["floor"] = round(floor, 6)
    doc = {**row.spec, "rule": _with_leaf(row.spec["rule"], leaf), "version": row.version + 1}
    if row.auto_budgets:  # the learned leaf gets an even share; the others keep their proportions
        from fleet.hub.autobudget import shares_of, with_shares

        others = {k: v for k, v in shares_of(doc).items() if k != LEAF}
        total = sum(others.values()) or 1.0
        n = len(others) + 1
        doc = with_shares(doc, {**{k: v / total * (n - 1) / n for k, v in others.items()}, LEAF: 1.0 / n})
    try:
        doc = parse_spec(doc).to_dict()
    except SpecError as exc:
        raise ProtocolError(f"the learned leaf does not fit campaign {campaign_id!r}'s spec: {exc}") from exc
    new = next_version(s, row, doc, now=now)
    new.learned_for, new.learned_rate = active.version, target_rate
    fit = LearnedFit(campaign_id=campaign_id, version=new.version, model_version=active.version, cases=len(rows),
                     errors=int(y.sum()), weights={f: float(v) for f, v in zip(names, w, strict=True)}, bias=b,
                     train_auc=auc(x @ w + b, y), target_rate=target_rate, trigger=kind,
                     bank_note=("bank feature from " if kind == KNN_LEAF else "no bank feature: ") + bank_note)
    return new, fit


def _with_leaf(rule: dict[str, Any], leaf: dict[str, Any]) -> dict[str, Any]:
    """``rule`` firing also on ``leaf``: an earlier learned leaf at the top is replaced."""
    if rule.get("trigger") == LEAF or rule.get("label") == LEAF:
        return leaf
    if "any_of" in rule:
        kept = [r for r in rule["any_of"] if r.get("label") != LEAF and r.get("trigger") != LEAF]
        return {**rule, "any_of": [*kept, leaf]}
    return {"any_of": [rule, leaf]}


def follow_models(s: Session, *, now: float, blobs: BlobStore | None = None) -> dict[str, str]:
    """The model some campaigns' devices run has changed (the fleet's active model, or a group's own): every live
    campaign whose learned leaf was fitted for another model than :func:`fit_model` names now gets a new version,
    refitted for that model or without the leaf. Returns campaign id -> what was done ("refitted for M" or "leaf
    removed until refit for M")."""
    done: dict[str, str] = {}
    for row in _latest_versions(s):
        if row.learned_for is None:
            continue
        model, _ = fit_model(s, row)
        if model is None or row.learned_for == model.version:
            continue
        rate = row.learned_rate if row.learned_rate is not None else 0.05
        try:
            learn(s, row.campaign_id, model=model, now=now, target_rate=rate, blobs=blobs)
            done[row.campaign_id] = f"refitted for {model.version}"
        except ProtocolError:
            stripped, why = spec_without_leaf(row)
            if stripped is None:
                log.warning("campaign %s v%d %s; it keeps the fit for %s until a refit for %s", row.campaign_id,
                            row.version, why, row.learned_for, model.version)
                continue
            new = next_version(s, row, stripped, now=now)
            new.learned_for, new.learned_rate = None, rate
            done[row.campaign_id] = f"leaf removed until refit for {model.version}"
    return done


def refit_waiting(s: Session, campaign_id: str, *, now: float, blobs: BlobStore | None = None) -> bool:
    """Refit ``campaign_id``'s learned leaf for the model its devices run (:func:`fit_model`) if it waits for one
    (a fit asked, none for that model) and its labeled cases now suffice; True if a new version was published. A
    concurrent refit by another worker wins quietly."""
    row = next((r for r in _latest_versions(s, campaign_id) if r.learned_rate is not None), None)
    if row is None:
        return False
    model, _ = fit_model(s, row)
    if model is None or row.learned_for == model.version:
        return False
    task = "classify" if operating_threshold(model) is None else "detect"
    labeled = s.exec(select(func.count()).select_from(CaseRow).where(
        CaseRow.campaign_id == campaign_id, CaseRow.model_version == model.version, CaseRow.task == task,
        CaseRow.label_status == "accepted")).one()
    if int(labeled) < MIN_CASES:
        return False
    try:
        with s.begin_nested():
            learn(s, campaign_id, model=model, now=now, target_rate=float(row.learned_rate or 0.05), blobs=blobs)
    except ProtocolError:  # too few errors (or right answers) yet
        return False
    except IntegrityError:  # another worker published the version first
        return False
    return True


def learned_states(s: Session) -> dict[str, str]:
    """Per live campaign that asked for a learned trigger, what the dashboard says of it: the model it is fitted for
    and the rate it fires at (``fitted for m2, 10% of frames``), or whose labels it waits for."""
    out: dict[str, str] = {}
    for row in _latest_versions(s):
        if row.learned_rate is None:
            continue
        model, named = fit_model(s, row)
        if row.learned_for is not None and (model is None or model.version == row.learned_for):
            out[row.campaign_id] = f"fitted for {row.learned_for}, {row.learned_rate:.0%} of frames"
        elif model is None:
            out[row.campaign_id] = "waits for an active model"
        else:
            out[row.campaign_id] = f"waits for {MIN_CASES} labeled cases from {named}"
    return out


def _latest_versions(s: Session, campaign_id: str | None = None) -> list[Campaign]:
    query = select(Campaign).where(col(Campaign.deleted_at).is_(None))
    if campaign_id is not None:
        query = query.where(Campaign.campaign_id == campaign_id)
    rows = s.exec(query.order_by(Campaign.campaign_id, col(Campaign.version).desc())).all()
    out: dict[str, Campaign] = {}
    for r in rows:
        out.setdefault(r.campaign_id, r)
    return list(out.values())


def spec_without_leaf(row: Campaign) -> tuple[dict[str, Any] | None, str]:
    """The campaign version's spec without its learned leaf, valid and with an auto-budgeted campaign's shares
    renormalised; or None and why not (the rule is the leaf alone, or what is left is no valid spec)."""
    stripped, why = pruned_spec(row, row.spec, _not_the_leaf, what="its learned leaf")
    return stripped, "fires on its learned leaf only" if why == NOTHING_LEFT else why


def spec_for_model(row: Campaign, model_version: str | None) -> dict[str, Any] | None:
    """What a device running ``model_version`` is sent of this campaign version: the spec, or without its learned
    leaf when the leaf was fitted for another model (a group's own model, a canary), since its weights read that
    model's scores; None when nothing would be left (the campaign is not sent to that device)."""
    if row.learned_for is None or model_version is None or row.learned_for == model_version:
        return row.spec
    return spec_without_leaf(row)[0]


def spec_for_triggers(row: Campaign, spec: dict[str, Any], triggers: frozenset[str] | None) -> dict[str, Any] | None:
    """``spec`` for a device whose agent evaluates only the trigger kinds ``triggers`` (None: it did not say, so
    all): unchanged when it can run every leaf, else without the leaves it cannot (an ``all_of`` that holds one
    goes whole; budgets follow, an auto-budgeted campaign's shares renormalised); None when nothing is left."""
    if triggers is None or all(leaf["trigger"] in triggers for leaf in _leaves(spec["rule"])):
        return spec
    return pruned_spec(row, spec, lambda leaf: leaf["trigger"] in triggers, what="the triggers its agent lacks")[0]


NOTHING_LEFT = "nothing would be left to fire"


def pruned_spec(row: Campaign, spec: dict[str, Any], keep: Any, *, what: str) -> tuple[dict[str, Any] | None, str]:
    """``spec`` with only the leaves ``keep(leaf)`` holds for (see :func:`_pruned_rule`), its per-trigger budgets
    following and an auto-budgeted campaign's shares renormalised, parsed again; or None and why not."""
    from trigger import SpecError, parse_spec

    rule = _pruned_rule(spec["rule"], keep)
    if rule is None:
        return None, NOTHING_LEFT
    doc = {**spec, "rule": rule}
    per = (doc.get("budgets") or {}).get("per_trigger") or {}
    labels = {leaf.get("label", leaf["trigger"]) for leaf in _leaves(rule)}
    if set(per) - labels:
        doc = {**doc, "budgets": {**doc["budgets"], "per_trigger": {k: v for k, v in per.items() if k in labels}}}
    if row.auto_budgets and (doc.get("budgets") or {}).get("per_trigger"):
        from fleet.hub.autobudget import shares_of, with_shares

        doc = with_shares(doc, shares_of(doc))
    try:
        return parse_spec(doc).to_dict(), ""
    except SpecError as exc:
        return None, f"without {what} is no valid spec ({exc})"


def _pruned_rule(rule: dict[str, Any], keep: Any) -> dict[str, Any] | None:
    """``rule`` with the leaves ``keep`` refuses taken out: an ``any_of`` keeps its other children (one left stands
    alone), an ``all_of`` that loses a child goes whole (dropping a condition would widen it); None when nothing
    is left."""
    if "trigger" in rule:
        return rule if keep(rule) else None
    kind = "any_of" if "any_of" in rule else "all_of"
    children = [_pruned_rule(c, keep) for c in rule[kind]]
    kept = [c for c in children if c is not None]
    if kind == "all_of":
        return {**rule, kind: kept} if len(kept) == len(children) else None
    if not kept:
        return None
    return kept[0] if len(kept) == 1 else {**rule, kind: kept}


def _leaves(rule: dict[str, Any]) -> list[dict[str, Any]]:
    if "trigger" in rule:
        return [rule]
    return [leaf for child in rule.get("any_of", rule.get("all_of", [])) for leaf in _leaves(child)]


def _not_the_leaf(leaf: dict[str, Any]) -> bool:
    return leaf.get("label") != LEAF and leaf.get("trigger") != LEAF
