"""What the in-process hub holds and was sent, read back for assertions: through its API (as a labeler or a
trainer would, parsed with the wire contract's types), its database (what no API lists: OTA reports, field
metrics, the webhook inbox) and the tap on the app (what clients sent it: heartbeats, label posts and their
receipts)."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

from fleet.protocol import (
    FIELD_COUNTERS,
    BatchReceipt,
    Case,
    CaseReceipt,
    Heartbeat,
    LabelPublic,
    ModelList,
    ModelPublic,
    OtaReport,
    RolloutList,
    RolloutPublic,
    SelectedCase,
    SnapshotList,
)
from tests.support.asgi import Tap
from tests.support.faults import FaultTransport


class HubReads:
    """Read-only views of an :class:`tests.support.inproc.InProcHub` (a mixin: it brings the client, the tap,
    the fault transport and the app)."""

    client: Any
    tap: Tap
    faults: FaultTransport
    hub: Any

    def bearer(self, name: str) -> dict[str, str]:
        raise NotImplementedError

    # -- what the hub holds --------------------------------------------------------------------

    def selected(self, case_id: str) -> SelectedCase:
        """A case as the labeling side reads it (GET /v1/cases/{id}): state, score, label and status."""
        r = self.client.get(f"/v1/cases/{case_id}", headers=self.bearer("labeler"))
        assert r.status_code == 200, r.text
        return SelectedCase.from_dict(r.json())

    def state(self, case_id: str) -> str:
        return self.selected(case_id).state

    def states(self) -> dict[str, str]:
        """Every case id -> its state."""
        return dict(self.sql("SELECT case_id, state FROM cases"))  # type: ignore[arg-type]

    def in_state(self, state: str) -> set[str]:
        return {cid for cid, s in self.states().items() if s == state}

    def requests(self) -> list[str]:
        """``"METHOD /path"`` of every request a client sent through :attr:`faults`, answered or not."""
        return [f"{m} {p}" for m, p, _ in list(self.faults.requests)]

    def case_receipts(self) -> list[CaseReceipt]:
        """Every outcome the hub answered a case upload with, single and batch uploads alike, in order."""
        out: list[CaseReceipt] = []
        for x in list(self.tap.exchanges):
            if x.method == "POST" and x.path == "/v1/cases" and x.status in (200, 201):
                out.append(CaseReceipt.from_json(x.response))
            elif x.method == "POST" and x.path == "/v1/cases/batch" and x.status == 200:
                out += BatchReceipt.from_json(x.response).results
        return out

    def case_posts(self) -> list[str]:
        """The case id of every upload the hub took (``created``, ``already`` or ``duplicate``), in order."""
        return [r.case_id for r in self.case_receipts() if r.status != "rejected"]

    def batch_sizes(self) -> list[int]:
        """Cases per batch upload the hub answered 200."""
        return [len(BatchReceipt.from_json(x.response).results)
                for x in self.tap.find("POST", "/v1/cases/batch", status=200)]

    def cases(self) -> dict[str, Case]:
        """Every case the hub stored, as the device sent it (its embedding from the hub's own column)."""
        out = {}
        for cid, payload, emb in self.sql("SELECT case_id, payload, embedding FROM cases ORDER BY received_at"):
            case = Case.from_dict(json.loads(payload) if isinstance(payload, str) else payload)
            if emb is not None:
                case = dataclasses.replace(case, embedding=base64.b64encode(bytes(emb)).decode("ascii"))
            out[cid] = case
        return out

    def image(self, case: Case) -> bytes:
        return bytes(self.hub.blobs.get(case.image_sha256))

    def labels(self, case_id: str | None = None) -> list[LabelPublic]:
        """The hub's labels (each with its verdict), oldest first."""
        params: dict[str, Any] = {"limit": 10000} | ({"case_id": case_id} if case_id else {})
        r = self.client.get("/v1/labels", headers=self.bearer("labeler"), params=params)
        assert r.status_code == 200, r.text
        return [LabelPublic.from_dict(x) for x in r.json()["labels"]]

    def label_posts(self) -> list[tuple[dict[str, Any], str]]:
        """Every label post the hub applied, in order: (the post as sent, the receipt's action)."""
        posts = self.tap.find("POST", "/v1/labels", status=200)
        return [(x.request_json(), x.response_json()["action"]) for x in posts]

    def actions(self) -> list[str]:
        return [action for _, action in self.label_posts()]

    def created(self) -> list[int]:
        """Annotation ids whose label was created, in order."""
        return [post["annotation_id"] for post, action in self.label_posts() if action == "created"]

    def events(self) -> list[dict[str, Any]]:
        """The webhook inbox, oldest first: id and body of each stored event."""
        return [{"id": i, "body": json.loads(body)} for i, body in
                self.sql("SELECT id, body FROM webhook_events ORDER BY id")]

    def acked(self) -> int:
        rows = self.sql("SELECT value FROM hub_state WHERE key = 'labeling_events_acked'")
        return int(rows[0][0]) if rows else 0

    def models(self) -> dict[str, ModelPublic]:
        """The model registry as a trainer reads it (GET /v1/models): version -> its entry."""
        r = self.client.get("/v1/models", headers=self.bearer("trainer"))
        assert r.status_code == 200, r.text
        return {m.version: m for m in ModelList.from_json(r.content).models}

    def rollouts(self) -> list[RolloutPublic]:
        """Every rollout as a trainer reads it (GET /v1/rollouts), newest first."""
        r = self.client.get("/v1/rollouts", headers=self.bearer("trainer"))
        assert r.status_code == 200, r.text
        return RolloutList.from_json(r.content).rollouts

    def snapshots(self) -> list[str]:
        """Every snapshot's id as a trainer lists them (GET /v1/snapshots), oldest first."""
        r = self.client.get("/v1/snapshots", headers=self.bearer("trainer"))
        assert r.status_code == 200, r.text
        return [snap.snapshot_id for snap in SnapshotList.from_json(r.content).snapshots]

    def ota_reports(self) -> list[OtaReport]:
        rows = self.sql("SELECT device_id, version, outcome, reason, previous_version, reported_at FROM ota_reports "
                        "ORDER BY id")
        return [OtaReport(device_id=d, version=v, outcome=o, reason=r, previous_version=p, reported_at=t)
                for d, v, o, r, p, t in rows]

    def heartbeats(self) -> list[Heartbeat]:
        """Every heartbeat the hub took (answered 204), as sent."""
        return [Heartbeat.from_json(x.request) for x in self.tap.find("POST", "/v1/heartbeats", status=204)]

    def field_metrics(self, version: str, scope: str = "all") -> dict[str, int]:
        """The hub's summed field counters for ``version`` (zeros when it has none)."""
        rows = self.sql(f"SELECT {', '.join(FIELD_COUNTERS)} FROM field_metrics WHERE scope = ? AND version = ?",
                        (scope, version))
        return dict(zip(FIELD_COUNTERS, rows[0] if rows else [0] * len(FIELD_COUNTERS), strict=True))

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of a read-only SQL statement on the hub's database (sqlite3 parameters: ``?``)."""
        with self.hub.engine.connect() as conn:
            cur = conn.connection.cursor()
            try:
                cur.execute(statement, params)
                return [tuple(r) for r in cur.fetchall()]
            finally:
                cur.close()
