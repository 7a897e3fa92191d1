"""Campaign messages: versioned, expiring trigger specs aimed at device groups, and the novelty banks they
ship with (built at the hub from labeled cases' embeddings; devices download them by id).

==============================================  ================================================================
``POST /v1/campaigns``                          :class:`CampaignCreate` -> :class:`CampaignReceipt`
``GET  /v1/campaigns``                          -> :class:`CampaignList`
``GET  /v1/campaigns/{id}``                     -> :class:`CampaignVersions`
``DELETE /v1/campaigns/{id}``                   -> :class:`CampaignDeleted`
``POST /v1/campaign-refusals``                  :class:`CampaignRefusal` (a device) -> 204
``GET  /v1/campaigns/{id}/refusals``            -> :class:`CampaignRefusals`
``POST /v1/novelty-banks``                      :class:`BankCreate` -> :class:`BankPublic`
``GET  /v1/novelty-banks``                      -> :class:`BankList`
``GET  /v1/novelty-banks/{id}``                 -> the bank as ``.npz`` (``trigger.NoveltyBank``)
``PUT  /v1/models/{version}/novelty-bank``      ``.npz`` body (trainer) -> :class:`BankPublic`: the bank of the
                                                model's training set, in its embedding space (bank id
                                                ``model-{version}``)
==============================================  ================================================================

What a device is assigned of a campaign is a :class:`~fleet.protocol.device.CampaignRef`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from fleet.errors import ProtocolError
from fleet.protocol.base import (
    DB_INT,
    SCHEMA_VERSION,
    Message,
    check_bool,
    check_finite,
    check_fraction,
    check_int,
    check_name,
    check_names_list,
    check_one_of,
    check_sha256,
    check_str,
    opt,
)

MAX_FITS = 64  # models one learned-trigger answer describes (fits and models not fitted)


@dataclass
class CampaignCreate(Message):
    """A campaign: a trigger spec (``trigger.parse_spec`` checks it), the device groups it is aimed at (none:
    every group) and the novelty bank it ships with. A bare spec document is read as ``{"spec": doc}``."""

    spec: dict[str, Any]
    groups: list[str] = field(default_factory=list)
    novelty_bank: str | None = None
    schema: int = SCHEMA_VERSION

    @classmethod
    def from_dict(cls, data: Any) -> Self:
        if isinstance(data, dict) and "spec" not in data:  # a bare trigger spec document
            data = {"spec": data}
        return super().from_dict(data)

    def validate(self) -> None:
        if not isinstance(self.spec, dict):
            raise ProtocolError(f"spec must be a trigger spec object; received {type(self.spec).__name__}")
        check_names_list(self.groups, "groups", max_len=100, name_check=True)
        opt(self.novelty_bank, check_name, "novelty_bank")


@dataclass
class CampaignPublic(Message):
    """One version of a campaign (``expired``: whether it had expired when listed; None when not asked;
    ``auto_budgets``: the hub moves its trigger budgets towards yield, fleet.hub.autobudget)."""

    campaign_id: str
    version: int
    spec: dict[str, Any]
    groups: list[str]
    created_at: float
    expires_at: float | None = None
    novelty_bank: str | None = None
    deleted_at: float | None = None
    expired: bool | None = None
    auto_budgets: bool = False
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.campaign_id, "campaign_id")
        check_int(self.version, "version", lo=0, hi=DB_INT)
        if not isinstance(self.spec, dict):
            raise ProtocolError(f"spec must be an object; received {type(self.spec).__name__}")
        check_names_list(self.groups, "groups", max_len=100, name_check=True)
        check_finite(self.created_at, "created_at")
        opt(self.expires_at, check_finite, "expires_at")
        opt(self.novelty_bank, check_name, "novelty_bank")
        opt(self.deleted_at, check_finite, "deleted_at")
        opt(self.expired, check_bool, "expired")
        check_bool(self.auto_budgets, "auto_budgets")


@dataclass
class CampaignReceipt(CampaignPublic):
    """The campaign a create stored (201), or found ``already`` stored with the same content (200)."""

    already: bool = False


@dataclass
class CampaignList(Message):
    """The newest version of each campaign."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"campaigns": (CampaignPublic, 100_000)}

    campaigns: list[CampaignPublic]
    schema: int = SCHEMA_VERSION


@dataclass
class CampaignVersions(Message):
    """Every version of one campaign, newest first."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"versions": (CampaignPublic, 100_000)}

    campaign_id: str
    versions: list[CampaignPublic]
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.campaign_id, "campaign_id")


@dataclass
class CampaignDeleted(Message):
    """A campaign withdrawn from every assignment (its rows stay, for lineage)."""

    campaign_id: str
    deleted_versions: int
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.campaign_id, "campaign_id")
        check_int(self.deleted_versions, "deleted_versions", lo=0)


@dataclass
class BankCreate(Message):
    """Build a novelty bank from the embeddings of labeled cases of ``model_version`` (default: the active
    model), at most ``max_size`` of them (sampled with ``seed``)."""

    bank_id: str | None = None
    model_version: str | None = None
    max_size: int | None = None
    seed: int = 0
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        opt(self.bank_id, check_name, "bank_id")
        opt(self.model_version, check_name, "model_version")
        opt(self.max_size, check_int, "max_size", lo=1)
        check_int(self.seed, "seed", lo=0, hi=2**63 - 1)


@dataclass
class BankPublic(Message):
    """A novelty bank: ``n`` embeddings of width ``dim`` from ``model_version``, stored by ``sha256``."""

    bank_id: str
    sha256: str
    size: int  # bytes of the .npz served at /v1/novelty-banks/{bank_id}
    n: int
    dim: int
    created_at: float
    model_version: str | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.bank_id, "bank_id")
        check_sha256(self.sha256, "sha256")
        for name in ("size", "n", "dim"):
            check_int(getattr(self, name), name, lo=0)
        check_finite(self.created_at, "created_at")
        opt(self.model_version, check_name, "model_version")


@dataclass
class BankList(Message):
    """Every novelty bank, oldest first."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"banks": (BankPublic, 100_000)}

    banks: list[BankPublic]
    schema: int = SCHEMA_VERSION


@dataclass
class TriggerYield(Message):
    """What one trigger of one campaign found (``trigger`` ``"*"``: the campaign's cases, each counted once).

    ``uploads``: cases it flagged (a case several triggers flagged counts for each); ``labeled``: those with an
    accepted label; ``errors``: labeled cases on which the model that captured them was wrong (classify: the
    label is another class; detect: a box missed, added or of another class at IoU 0.5, over the boxes at or
    above the model's operating threshold); ``yield_`` errors / labeled; ``labels_per_error`` labeled / errors
    and ``bytes_per_error`` uploaded image bytes / errors (null without an error found).
    """

    campaign_id: str
    trigger: str
    uploads: int
    labeled: int
    errors: int
    bytes: int
    yield_: float | None = None
    labels_per_error: float | None = None
    bytes_per_error: float | None = None
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.campaign_id, "campaign_id")
        check_str(self.trigger, "trigger", max_len=128)
        for name in ("uploads", "labeled", "errors", "bytes"):
            check_int(getattr(self, name), name, lo=0)
        if not self.errors <= self.labeled <= self.uploads:
            raise ProtocolError(f"a yield needs errors <= labeled <= uploads; received {self.errors}, "
                                f"{self.labeled}, {self.uploads}")
        opt(self.yield_, check_fraction, "yield_")
        opt(self.labels_per_error, check_finite, "labels_per_error")
        opt(self.bytes_per_error, check_finite, "bytes_per_error")


@dataclass
class YieldReport(Message):
    """Per campaign and trigger, what the uploads turned out to be worth once labeled (``GET /v1/yields``)."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"yields": (TriggerYield, 100_000)}

    yields: list[TriggerYield]
    schema: int = SCHEMA_VERSION


@dataclass
class LearnedFit(Message):
    """The learned trigger the hub fitted for a campaign (``POST /v1/campaigns/{id}/learn``): the new campaign
    version that carries it, the model version and labeled cases it was fitted on, its weights per feature
    (trigger.learned.FEATURES), intercept, training AUC and the rate it fires at; the trigger kind shipped
    (``learned_error_knn`` with the model's own bank; ``learned_box_error_hist`` for a detector, whose weights are
    over trigger.learned.BOX_HIST_FEATURES; ``learned_box_error_count`` and ``learned_box_error`` from hubs before
    it) and a sentence on the bank feature: which bank it reads, or why there is none.

    A campaign is fitted for every model its devices run; this message describes the first fit (the fleet's
    active model's where it was fitted), ``others`` the fits for the other models in the same version (each
    with empty ``others`` and ``not_fitted``), and ``not_fitted`` each model whose cases did not suffice and
    why."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"others": ("LearnedFit", MAX_FITS)}

    campaign_id: str
    version: int
    model_version: str
    cases: int
    errors: int
    weights: dict[str, float]
    bias: float
    target_rate: float
    train_auc: float | None = None
    trigger: str = "learned_error"
    bank_note: str | None = None
    others: list[LearnedFit] = field(default_factory=list)
    not_fitted: dict[str, str] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.campaign_id, "campaign_id")
        check_one_of(self.trigger, ("learned_error", "learned_error_knn", "learned_box_error",
                                    "learned_box_error_count", "learned_box_error_hist"), "trigger")
        if not isinstance(self.not_fitted, dict) or len(self.not_fitted) > MAX_FITS:
            raise ProtocolError(f"not_fitted must be an object of at most {MAX_FITS} model version -> reason; "
                                f"received {self.not_fitted!r:.80}")
        for model, why in self.not_fitted.items():
            check_name(model, "not_fitted model version")
            check_str(why, f"not_fitted[{model!r}]", max_len=2000)
        models = [self.model_version]
        for other in self.others:
            if other.others or other.not_fitted or other.campaign_id != self.campaign_id:
                raise ProtocolError(f"others must be fits of campaign {self.campaign_id!r} with no others or "
                                    f"not_fitted of their own; received one for model {other.model_version!r}")
            models.append(other.model_version)
        if len(set(models) | set(self.not_fitted)) != len(models) + len(self.not_fitted):
            raise ProtocolError(f"each model is fitted or not_fitted once; received fits for {models} and "
                                f"not_fitted {sorted(self.not_fitted)}")
        opt(self.bank_note, check_str, "bank_note", max_len=2000)
        check_int(self.version, "version", lo=0, hi=DB_INT)
        check_name(self.model_version, "model_version")
        check_int(self.cases, "cases", lo=0)
        check_int(self.errors, "errors", lo=0)
        if not isinstance(self.weights, dict) or len(self.weights) > 64:
            raise ProtocolError(f"weights must be an object of at most 64 feature -> number; received "
                                f"{self.weights!r:.80}")
        for k, v in self.weights.items():
            check_str(k, "feature name", max_len=64)
            check_finite(v, f"weights[{k!r}]")
        check_finite(self.bias, "bias")
        check_fraction(self.target_rate, "target_rate")
        opt(self.train_auc, check_fraction, "train_auc")


MAX_REASON = 2000  # characters of a refusal's reason kept


@dataclass
class CampaignRefusal(Message):
    """A device could not run a campaign version it was assigned (``POST /v1/campaign-refusals``): its agent
    refused the spec (a trigger kind or parameter it does not know) or the novelty bank (a download that did not
    hash to the assignment's sha256), and says why. The device runs its other campaigns meanwhile."""

    device_id: str
    campaign_id: str
    version: int
    reason: str
    refused_at: float
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_name(self.campaign_id, "campaign_id")
        check_int(self.version, "version", lo=1, hi=DB_INT)
        check_str(self.reason, "reason", max_len=MAX_REASON)
        check_finite(self.refused_at, "refused_at")


@dataclass
class DeviceRefusal(Message):
    """One device's refusal of one campaign version, as the hub keeps it: the last reason it gave, when it last
    refused (its clock) and when the hub heard it, and how many times it refused (again after each restart)."""

    VERSIONED: ClassVar[bool] = False

    device_id: str
    version: int
    reason: str
    refused_at: float
    received_at: float
    times: int = 1

    def validate(self) -> None:
        check_name(self.device_id, "device_id")
        check_int(self.version, "version", lo=1, hi=DB_INT)
        check_str(self.reason, "reason", max_len=MAX_REASON)
        check_finite(self.refused_at, "refused_at")
        check_finite(self.received_at, "received_at")
        check_int(self.times, "times", lo=1)


@dataclass
class CampaignRefusals(Message):
    """The devices that refused a version of one campaign, newest version first, then by device
    (``GET /v1/campaigns/{id}/refusals``)."""

    LISTS: ClassVar[dict[str, tuple[type[Message] | str, int]]] = {"refusals": (DeviceRefusal, 1_000_000)}

    campaign_id: str
    refusals: list[DeviceRefusal]
    schema: int = SCHEMA_VERSION

    def validate(self) -> None:
        check_name(self.campaign_id, "campaign_id")
