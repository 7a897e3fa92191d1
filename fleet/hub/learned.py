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
a ``learned_box_error_hist``: a Poisson regression (:func:`fit_poisson`, penalty :data:`POISSON_L2`) of how many
boxes the label contradicts on each case (the model's boxes at its operating threshold against the label's:
missed, extra, class flips) on the box features of :func:`trigger.learned.box_error_features`, their products
two by two and the histogram of box scores around the operating threshold (:func:`trigger.learned.box_score_bins`),
computed from the stored boxes the device uploaded (:func:`trigger.learned.box_hist_features`). Its value is the
expected number of box errors on a frame, so a budget goes to the frames with the most errors (see
:mod:`trigger.learned` for the measurement). The training AUC is of its value against "the case has a box error".
Hubs before it shipped ``learned_box_error_count`` (without the histogram), which devices still run.

With the model's own novelty bank (its training set's embeddings and labels, uploaded by the trainer with each
model) the leaf is a ``learned_error_knn`` instead: one more feature, the share of each frame's
:data:`KNN_K` nearest bank entries labeled another class than the model's top class
(:func:`trigger.learned.neighbour_features`), computed here from each labeled case's stored embedding against
that bank, and on the device from the frame's embedding against the same bank (the hub hands a device the bank
of the model it runs). Rule: the bank feature is used when the active model has a bank with at least one known
label and every case of the fit has an embedding of the bank's width; else the leaf is a plain ``learned_error``.
Where the human's action is unknown the bank feature is what lifts the learned trigger's error capture
(`benchmarks/bench_error_capture.py`).

A fit belongs to the model it was fitted for: a leaf's weights read that model's scores. A campaign is fitted for
each model its devices run outside a rollout (:func:`fit_models`): aimed at groups, each group's model (its own,
where a group rollout completed on it, else the fleet's active model); for the whole fleet, the fleet's active model
and every group's own. Each model's leaf is fitted on the cases that model captured. The campaign version's spec
carries one of them (its ``learned_for``: the fleet's active model's where it has one), the others are kept beside
it (``learned_leaves``), and a device gets the spec with the leaf of the model it runs, or without a learned leaf
when that model has none (:func:`spec_for_model`: a canary's candidate, a model without enough labels). Its
``learned_rate`` is the rate asked. When the models change (:func:`follow_models`, from
:func:`fleet.hub.rollouts.promote`, from a group rollout's completion and from a group's unpinning), each campaign
that asked for a learned trigger gets a new version if its leaves changed: the leaves of models no longer run go,
a new model is fitted where its labeled cases suffice, and the other leaves stay as they were; with no leaf left,
the rule goes without it (its budget share back to the others). While a model waits for its leaf, every accepted
label of the campaign's cases tries again (:func:`refit_waiting`, from :func:`fleet.hub.labels.apply`), and the
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
from fleet.hub.models import Campaign, CaseRow, GroupModel, ModelVersion, NoveltyBankRow
from fleet.hub.running import active_model
from fleet.hub.yields import DEFAULT_OPERATING, model_wrong
from fleet.protocol import Detection, LearnedFit
from trigger.learned import (
    BANK_FEATURES,
    BOX_HIST_FEATURES,
    FEATURES,
    box_hist_features,
    error_features,
    neighbour_features,
)

log = logging.getLogger(__name__)

LEAF = "learned_error"  # the leaf's label, whichever kind it is
KNN_LEAF = "learned_error_knn"
BOX_LEAF = "learned_box_error_hist"  # a detector's
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


def detect_case_features(payloads: list[dict[str, Any]], *, floor: float, model: Any = None) -> np.ndarray:
    """The features of stored ``detect`` case payloads (:data:`trigger.learned.BOX_HIST_FEATURES`), as the device
    computes them from the same boxes: the model's (every decoded box; ``model``, their
    :func:`detect_boxes` where the caller has it already), the human's where known, the challenger's where it gave
    an output."""
    model = detect_boxes([p.get("prediction") for p in payloads]) if model is None else model
    human = detect_boxes([p.get("human_action") for p in payloads])
    challenger = detect_boxes([(p.get("challenger") or {}).get("prediction") for p in payloads])
    return box_hist_features(model, human, challenger, floor=floor)


def box_error_counts(payloads: list[dict[str, Any]], labels: list[dict[str, Any] | None], *,
                     floor: float, model: Any = None) -> np.ndarray:
    """Per stored ``detect`` case, how many of its boxes the label contradicts: the model's boxes scoring at least
    ``floor`` against the label's (missed + extra + class flips, at IoU 0.5, one to one). A detector's fit counts a
    wrong case once per box error, so that the trigger ranks frames by how many errors they hold, as a fleet's
    upload budget is best spent (``benchmarks/bench_error_capture_detect.py`` measures capture so). ``model``: the
    payloads' :func:`detect_boxes`, where the caller has them already."""
    from trigger.box_scores import box_disagreement

    model = detect_boxes([p.get("prediction") for p in payloads]) if model is None else model
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


def fit_models(s: Session, row: Campaign) -> list[tuple[ModelVersion, str]]:
    """The models campaign version ``row``'s devices run outside a rollout, each with how to name it, the fleet's
    active model first where they run it: a campaign aimed at groups, each group's model (its own
    (:class:`fleet.hub.models.GroupModel`), else the fleet's); a campaign for every group, the fleet's active model
    and every group's own. Empty without an active model and group models."""
    fleet = active_model(s)
    runs: dict[str, tuple[ModelVersion, list[str]]] = {}
    if row.groups:
        for group in sorted(row.groups):
            pin = s.get(GroupModel, group)
            model = s.get(ModelVersion, pin.version) if pin is not None else fleet
            if model is not None:
                runs.setdefault(model.version, (model, []))[1].append(group if pin is not None else "")
    else:
        if fleet is not None:
            runs[fleet.version] = (fleet, [""])
        for pin in s.exec(select(GroupModel).order_by(col(GroupModel.group))).all():
            model = s.get(ModelVersion, pin.version)
            if model is not None:
                runs.setdefault(model.version, (model, []))[1].append(pin.group)
    out: list[tuple[ModelVersion, str]] = []
    for version, (model, groups) in runs.items():
        pinned = sorted(g for g in groups if g)
        if fleet is not None and version == fleet.version:
            out.insert(0, (model, f"the active model {version}"))
        else:
            out.append((model, f"model {version} (run by group{'s' * (len(pinned) > 1)} {', '.join(pinned)})"))
    return out


def fitted_leaves(row: Campaign) -> dict[str, dict[str, Any]]:
    """Campaign version ``row``'s learned leaves by the model each was fitted for: the one in its spec (for
    ``learned_for``) first, then the others (``learned_leaves``); empty without a learned leaf."""
    if row.learned_for is None:
        return {}
    in_spec = next((leaf for leaf in _leaves(row.spec["rule"]) if not _not_the_leaf(leaf)), None)
    out = {row.learned_for: in_spec} if in_spec is not None else {}
    return {**out, **{v: leaf for v, leaf in (row.learned_leaves or {}).items() if v != row.learned_for}}


def learn(s: Session, campaign_id: str, *, now: float, target_rate: float,
          blobs: BlobStore | None = None) -> tuple[Campaign, LearnedFit]:
    """Fit the campaign's learned trigger for each model its devices run (:func:`fit_models`) on that model's
    labeled cases, and store the new version with every leaf that could be fitted; the answer
    describes the first (the fleet's active model's where it was fitted), the other fits in its ``others`` and the
    models that could not be fitted, and why, in its ``not_fitted``. ProtocolError when none could be, saying why
    for each. ``blobs``: where each model's novelty bank is read from (without it, or without a bank, the leaf has
    no bank feature)."""
    if not 0.0 < target_rate < 1.0:
        raise ProtocolError(f"target_rate must be in (0, 1); received {target_rate}")
    row = latest_live(s, campaign_id)
    models = fit_models(s, row)
    if not models:
        raise ProtocolError("no active model: a learned trigger is fitted to the model the devices run")
    fits: dict[str, tuple[dict[str, Any], LearnedFit]] = {}
    why: dict[str, str] = {}
    for m, named in models:
        try:
            fits[m.version] = _fit_leaf(s, campaign_id, m, named, target_rate=target_rate, blobs=blobs)
        except ProtocolError as exc:
            why[m.version] = str(exc)
    if not fits:
        raise ProtocolError("; ".join(why.values()))
    new = _publish(s, row, {v: leaf for v, (leaf, _) in fits.items()}, now=now, target_rate=target_rate)
    first, *others = (f for _, f in fits.values())
    for f in (first, *others):
        f.version = new.version
    first.others, first.not_fitted = others, why
    first.validate()
    return new, first


def _fit_leaf(s: Session, campaign_id: str, active: ModelVersion, named: str, *, target_rate: float,
              blobs: BlobStore | None) -> tuple[dict[str, Any], LearnedFit]:
    """The learned leaf fitted for model ``active`` on the campaign's labeled cases of that model, and the fit's
    report (its ``version`` set by the caller); ProtocolError when its cases do not suffice."""
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
    if floor is not None:  # a detector: how many boxes each case got wrong, from its boxes (trigger.learned)
        kind, names = BOX_LEAF, BOX_HIST_FEATURES
        bank_note = f"a detector's fit reads no bank (boxes reported from its operating threshold {floor:.3g})"
        model = detect_boxes([p.get("prediction") for p in payloads])  # parsed once, read twice
        x = detect_case_features(payloads, floor=floor, model=model)
        counts = np.maximum(box_error_counts(payloads, [lp for *_, lp in rows], floor=floor, model=model), y)
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
    fit = LearnedFit(campaign_id=campaign_id, version=0, model_version=active.version, cases=len(rows),
                     errors=int(y.sum()), weights={f: float(v) for f, v in zip(names, w, strict=True)}, bias=b,
                     train_auc=auc(x @ w + b, y), target_rate=target_rate, trigger=kind,
                     bank_note=("bank feature from " if kind == KNN_LEAF else "no bank feature: ") + bank_note)
    return leaf, fit


def _publish(s: Session, row: Campaign, leaves: dict[str, dict[str, Any]], *, now: float,
             target_rate: float) -> Campaign:
    """The version after ``row`` with learned ``leaves`` (model version -> leaf, at least one): the first in its
    spec (``learned_for``), the others kept for the devices running their models (``learned_leaves``)."""
    from trigger import SpecError, parse_spec

    primary = next(iter(leaves))
    doc = {**row.spec, "rule": _with_leaf(row.spec["rule"], leaves[primary]), "version": row.version + 1}
    if row.auto_budgets:  # the learned leaf gets an even share; the others keep their proportions
        from fleet.hub.autobudget import shares_of, with_shares

        others = {k: v for k, v in shares_of(doc).items() if k != LEAF}
        total = sum(others.values()) or 1.0
        n = len(others) + 1
        doc = with_shares(doc, {**{k: v / total * (n - 1) / n for k, v in others.items()}, LEAF: 1.0 / n})
    try:
        doc = parse_spec(doc).to_dict()
        for version, leaf in leaves.items():
            if version != primary:
                parse_spec({**doc, "rule": _with_leaf(doc["rule"], leaf)})
    except SpecError as exc:
        raise ProtocolError(f"the learned leaf does not fit campaign {row.campaign_id!r}'s spec: {exc}") from exc
    new = next_version(s, row, doc, now=now)
    new.learned_for, new.learned_rate = primary, target_rate
    new.learned_leaves = {v: leaf for v, leaf in leaves.items() if v != primary}
    return new


def _with_leaf(rule: dict[str, Any], leaf: dict[str, Any]) -> dict[str, Any]:
    """``rule`` firing also on ``leaf``: an earlier learned leaf at the top is replaced."""
    if rule.get("trigger") == LEAF or rule.get("label") == LEAF:
        return leaf
    if "any_of" in rule:
        kept = [r for r in rule["any_of"] if r.get("label") != LEAF and r.get("trigger") != LEAF]
        return {**rule, "any_of": [*kept, leaf]}
    return {"any_of": [rule, leaf]}


def follow_models(s: Session, *, now: float, blobs: BlobStore | None = None) -> dict[str, str]:
    """The models some campaigns' devices run have changed (the fleet's active model, or a group's own): every live
    campaign that asked for a learned trigger gets its leaves in line (:func:`_follow`). Returns campaign id ->
    what was done."""
    done: dict[str, str] = {}
    for row in _latest_versions(s):
        if row.learned_rate is not None and (what := _follow(s, row, now=now, blobs=blobs)) is not None:
            done[row.campaign_id] = what
    return done


def refit_waiting(s: Session, campaign_id: str, *, now: float, blobs: BlobStore | None = None) -> bool:
    """Fit ``campaign_id``'s learned leaf for each model its devices run that has none yet (a fit was asked) where
    that model's labeled cases now suffice (:func:`_follow`); True if a new version was published. A concurrent
    refit by another worker wins quietly."""
    row = next((r for r in _latest_versions(s, campaign_id) if r.learned_rate is not None), None)
    if row is None:
        return False
    try:
        with s.begin_nested():
            return _follow(s, row, now=now, blobs=blobs) is not None
    except IntegrityError:  # another worker published the version first
        return False


def _follow(s: Session, row: Campaign, *, now: float, blobs: BlobStore | None) -> str | None:
    """Campaign version ``row``'s learned leaves in line with the models its devices run (:func:`fit_models`): the
    leaves of models they no longer run go, each model without a leaf whose labeled cases now suffice is fitted,
    and the other leaves stay as fitted. A new version when anything changed (without the leaf when no model has
    one); what was done, or None."""
    models = fit_models(s, row)
    have = fitted_leaves(row)
    wanted = [m.version for m, _ in models]
    fitted: dict[str, dict[str, Any]] = {}
    for m, named in models:
        if m.version in have or _labeled(s, row.campaign_id, m) < MIN_CASES:
            continue
        try:
            fitted[m.version] = _fit_leaf(s, row.campaign_id, m, named, target_rate=float(row.learned_rate or 0.05),
                                          blobs=blobs)[0]
        except ProtocolError:  # too few errors (or right answers) yet
            continue
    dropped = sorted(set(have) - set(wanted))
    if not fitted and not dropped:
        return None
    leaves = {v: have.get(v) or fitted[v] for v in wanted if v in have or v in fitted}
    what = "; ".join([*([f"fitted for {', '.join(fitted)}"] if fitted else []),
                      *([f"the fit for {', '.join(dropped)} removed"] if dropped else [])])
    if leaves:
        try:
            _publish(s, row, leaves, now=now, target_rate=float(row.learned_rate or 0.05))
            return what
        except ProtocolError as exc:  # the leaves no longer fit the spec: go without them, as with none fitted
            log.warning("campaign %s v%d: %s", row.campaign_id, row.version, exc)
            if not have:  # it has none to take away
                return None
    stripped, why = spec_without_leaf(row)
    if stripped is None:
        log.warning("campaign %s v%d %s; it keeps its fit for %s until a model its devices run has one",
                    row.campaign_id, row.version, why, ", ".join(dropped))
        return None
    new = next_version(s, row, stripped, now=now)
    new.learned_for, new.learned_leaves = None, {}
    return f"{what}; leaf removed until refit for {', '.join(wanted) or 'an active model'}"


def _labeled(s: Session, campaign_id: str, model: ModelVersion) -> int:
    task = "classify" if operating_threshold(model) is None else "detect"
    return int(s.exec(select(func.count()).select_from(CaseRow).where(
        CaseRow.campaign_id == campaign_id, CaseRow.model_version == model.version, CaseRow.task == task,
        CaseRow.label_status == "accepted")).one())


def learned_states(s: Session) -> dict[str, str]:
    """Per live campaign that asked for a learned trigger, what the dashboard says of it: the models it is fitted
    for and the rate it fires at (``fitted for m2, 10% of frames``), and whose labels it waits for."""
    out: dict[str, str] = {}
    for row in _latest_versions(s):
        if row.learned_rate is None:
            continue
        models = fit_models(s, row)
        have = fitted_leaves(row)
        fitted = [m.version for m, _ in models if m.version in have]
        waiting = [named for m, named in models if m.version not in have]
        parts = [f"fitted for {', '.join(fitted)}, {row.learned_rate:.0%} of frames"] if fitted else []
        if waiting:
            parts.append(f"waits for {MIN_CASES} labeled cases from {' and from '.join(waiting)}")
        out[row.campaign_id] = "; ".join(parts) or "waits for an active model"
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
    """What a device running ``model_version`` is sent of this campaign version: the spec, with the learned leaf
    fitted for that model (:func:`fitted_leaves`: the spec's own, or another model's in its place), or without a
    learned leaf when none was fitted for it (a canary's candidate, a model without enough labels), since a leaf's
    weights read its own model's scores; None when nothing would be left (the campaign is not sent to that
    device)."""
    if row.learned_for is None or model_version is None or row.learned_for == model_version:
        return row.spec
    leaf = (row.learned_leaves or {}).get(model_version)
    if leaf is not None:
        return {**row.spec, "rule": _with_leaf(row.spec["rule"], leaf)}
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
