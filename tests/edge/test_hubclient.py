from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from fleet.edge.heartbeat import HeartbeatSender, Telemetry
from fleet.edge.hubclient import HubClient
from fleet.edge.spool import Spool
from fleet.edge.uplink import UplinkStats
from fleet.errors import Forbidden, IntegrityError, InvalidInput, NotFound, ServerBusy, TransportError, Unauthorized
from fleet.protocol import BatchReceipt, CaseReceipt, Heartbeat
from tests.edge.conftest import bank, client
from tests.support.inproc import InProcHub


def client_answering(status: int, body: object = None) -> HubClient:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body if body is not None else {"detail": f"status {status}"})

    return HubClient(httpx.Client(base_url="http://hub", transport=httpx.MockTransport(handle)), token="t")


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, Unauthorized), (403, Unauthorized), (400, InvalidInput), (404, NotFound), (422, InvalidInput),
     (408, ServerBusy), (429, ServerBusy), (500, ServerBusy), (503, ServerBusy)],
)
def test_status_codes_map_onto_the_error_tree(status: int, error: type[Exception]) -> None:
    with pytest.raises(error, match=f"HTTP {status}: status {status}"):
        client_answering(status).upload_case("{}", b"png")


def test_network_faults_are_retryable_transport_errors() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    client = HubClient(httpx.Client(base_url="http://hub", transport=httpx.MockTransport(handle)), token="t")
    with pytest.raises(TransportError, match="ConnectTimeout"):
        client.get_assignment()


def test_calls_need_enrollment_and_send_the_token(hub: InProcHub) -> None:
    with pytest.raises(Unauthorized, match="not enrolled"):
        client(hub, token="").get_assignment()
    assert client(hub).get_assignment().device_id == "dev-1"
    assert hub.requests() == ["GET /v1/assignment"]


def test_download_is_streamed_hashed_and_size_capped(tmp_path: Path, hub: InProcHub) -> None:
    row = bank(hub, np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), bank_id="b1")
    sha = client(hub).download_novelty_bank("b1", tmp_path / "b.npz")
    import hashlib

    assert sha == row["sha256"] == hashlib.sha256((tmp_path / "b.npz").read_bytes()).hexdigest()
    with pytest.raises(IntegrityError, match="more than 100 bytes"):
        client(hub).download_novelty_bank("b1", tmp_path / "c.npz", max_bytes=100)
    with pytest.raises(NotFound, match="404"):
        client(hub).download_model("nope", tmp_path / "m.onnx")


def test_telemetry_counts_and_percentiles() -> None:
    t = Telemetry()
    t.record_batch(predicted=np.array([0, 1, 2, -1]), latency_ms=np.array([1.0, 2.0, 3.0, 4.0]), flagged=1,
                   human=np.array([0, 2, -1, 1]), challenger_predicted=np.array([0, 1, -1, 1]))
    snap = t.snapshot()
    assert snap["frames_seen"] == 4 and snap["flagged"] == 1
    assert (snap["human_compared"], snap["human_disagreed"]) == (2, 1)  # the -1 frame is not compared
    assert (snap["challenger_compared"], snap["challenger_agreed"]) == (2, 2)
    p50, p95 = t.latency_percentiles()
    assert p50 == pytest.approx(2.5) and 3.8 <= p95 <= 4.0


def test_heartbeat_is_valid_and_counts_evictions_since_boot(tmp_path: Path, hub: InProcHub) -> None:
    spool = Spool(tmp_path / "s.db", max_bytes=70_000)
    spool.put("old", 0.1, "{}", b"x" * 60_000)
    spool.put("new", 0.9, "{}", b"x" * 60_000)  # evicts "old" before this boot's sender exists
    sender = HeartbeatSender(device_id="dev-1", telemetry=Telemetry(), spool=spool, uplink_stats=UplinkStats(),
                             client=client(hub), versions=lambda: ("v1", None))
    spool.put("newer", 0.95, "{}", b"x" * 60_000)
    assert sender.send()
    hb = hub.heartbeats()[-1]
    assert hb.counters["evicted"] == 1 and hb.spool_items == 1 and hb.model_version == "v1"
    [(values,)] = hub.sql("SELECT \"values\" FROM heartbeat_states WHERE device_id = 'dev-1'")
    assert '"evicted": 1' in values  # what the hub keeps of it
    hub.faults.add("POST", "^/v1/heartbeats$", "503")
    assert not sender.send() and sender.failed == 1


def test_the_heartbeat_carries_the_active_models_prediction_histogram(tmp_path: Path, hub: InProcHub) -> None:
    t = Telemetry()
    t.record_batch(predicted=np.array([0, 2, 2, -1]), latency_ms=1.0, flagged=0, version="v1")
    t.record_batch(predicted=np.array([1, 2]), latency_ms=1.0, flagged=0, version="v1")
    assert t.predictions() == ("v1", [1, 1, 3], 1)
    t.record_batch(predicted=np.array([0, -1]), latency_ms=1.0, flagged=0, version="v2")  # a new model: afresh
    assert t.predictions() == ("v2", [1], 1)
    sender = HeartbeatSender(device_id="dev-1", telemetry=t, spool=Spool(tmp_path / "s.db", max_bytes=1 << 20),
                             uplink_stats=UplinkStats(), client=client(hub), versions=lambda: ("v2", None))
    hb = sender.build()
    assert (hb.predicted_version, hb.predicted_counts, hb.predicted_none) == ("v2", [1], 1)
    assert Heartbeat.from_json(hb.to_json()) == hb


@pytest.mark.parametrize(
    "body",
    [{"results": [{"case_id": "a", "status": "created"}]},  # one result for two cases
     {"results": [{"status": "weird"}, {"status": "created"}]},
     {"results": [{"case_id": "a", "status": "rejected", "error_status": "bad"},
                  {"case_id": "b", "status": "created"}]},
     {"nope": 1}, [1, 2]],
)
def test_a_batch_answer_off_the_contract_is_a_protocol_error(body: object) -> None:
    from fleet.errors import ProtocolError

    with pytest.raises(ProtocolError):
        client_answering(200, body).upload_cases([("{}", b"png"), ("{}", b"png")])


def test_batch_outcomes_map_onto_the_error_tree_item_by_item() -> None:
    results = [CaseReceipt("a", "created"), CaseReceipt("b", "already"), CaseReceipt("c", "duplicate", "a"),
               CaseReceipt("d", "rejected", error_status=422, error="probs"),
               CaseReceipt("e", "rejected", error_status=403, error="device"),
               CaseReceipt("", "rejected", error_status=503, error="busy")]
    out = client_answering(200, BatchReceipt(results).to_dict()).upload_cases([("{}", b"png")] * 6)
    assert out[:3] == results[:3]
    assert [type(x) for x in out[3:]] == [InvalidInput, Forbidden, ServerBusy]
    assert "item 3 (case d): hub answered 422: probs" in str(out[3])
