"""Request and response bodies of the hub's JSON routes (the device messages use fleet.protocol)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, field_validator

from fleet.errors import ProtocolError
from fleet.protocol import check_name


class _In(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


def _name(value: str, what: str) -> str:
    try:
        return check_name(value, what)
    except ProtocolError as exc:
        raise ValueError(str(exc)) from None


class GrantCreate(_In):
    group: str | None = None
    ttl_s: FiniteFloat | None = Field(None, gt=0, le=366 * 24 * 3600)

    @field_validator("group")
    @classmethod
    def _g(cls, v: str | None) -> str | None:
        return None if v is None else _name(v, "group")


class TokenCreate(_In):
    scope: Literal["admin", "labeler", "trainer"]
    name: str

    @field_validator("name")
    @classmethod
    def _n(cls, v: str) -> str:
        return _name(v, "token name")


class TokenPublic(BaseModel):
    name: str
    scope: str
    token: str


class RolloutCreate(_In):
    version: str
    stages: list[FiniteFloat] = Field(default_factory=lambda: [0.1, 0.5, 1.0], min_length=1, max_length=20)
    stage_seconds: FiniteFloat | None = Field(None, gt=0)

    @field_validator("version")
    @classmethod
    def _v(cls, v: str) -> str:
        return _name(v, "version")

    @field_validator("stages")
    @classmethod
    def _stages(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < s <= 1.0 for s in v) or any(b <= a for a, b in zip(v, v[1:], strict=False)):
            raise ValueError(f"stages must be increasing fractions in (0, 1]; received {v}")
        return v


class PromoteRequest(_In):
    override: bool = False  # active at once instead of a one-stage rollout; recorded with the reason
    reason: str = Field("promoted by an operator", min_length=1, max_length=2000)


class RollbackRequest(_In):
    to: str | None = None
    reason: str = Field("rolled back by an operator", max_length=2000)


class CampaignCreate(_In):
    """A campaign: the trigger spec plus where it goes. A bare spec document is accepted too."""

    spec: dict[str, Any]
    groups: list[str] = Field(default_factory=list, max_length=100)
    novelty_bank: str | None = None

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        return [_name(g, "group") for g in v]

    @field_validator("novelty_bank")
    @classmethod
    def _bank(cls, v: str | None) -> str | None:
        return None if v is None else _name(v, "novelty_bank")


class BankCreate(_In):
    bank_id: str | None = None
    model_version: str | None = None
    max_size: int | None = Field(None, ge=1)
    seed: int = 0

    @field_validator("bank_id", "model_version")
    @classmethod
    def _names(cls, v: str | None) -> str | None:
        return None if v is None else _name(v, "bank_id/model_version")


