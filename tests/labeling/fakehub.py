"""An in-memory stand-in for the hub's labeling endpoints (HUB_API.md), for tests and the benchmark.

It follows the contract the real hub implements: selections move cases to ``queued``; labels are
idempotent on ``(source, annotation_id)`` (same payload = unchanged, changed payload = updated,
``deleted`` removes); a release of a labeled case is a 409; the webhook inbox is idempotent by a hash
of the body. It answers through ``httpx.MockTransport`` (unit tests) or a real loopback HTTP server
(so a real Label Studio can post webhooks to it and annotators' browsers can load its images).
Faults can be injected per path.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx

from fleet.consensus import Vote, decide
from fleet.errors import ProtocolError
from fleet.protocol import (
    Case,
    Classification,
    LabelPost,
    LabelPublic,
    LabelReceipt,
    PoolPage,
    SelectedCase,
    Selection,
    SelectionRequest,
    Verdict,
)


@dataclass
class FakeCase:
    case_id: str
    truth: int
    predicted_class: int
    score: float
    cluster: int
    state: str = "unlabeled"
    label: int | None = None


@dataclass
class Fault:
    method: str
    path_prefix: str
    times: int
    kind: str  # "503", "drop" (connection refused), "lose" (applied, then the answer is lost)


@dataclass
class FakeHub:
    class_names: list[str]
    model_version: str = "m-1"
    token: str = "labeler-token"
    webhook_secret: str = "webhook-secret"
    url_secret: bytes = b"url-secret"
    base_url: str = "http://hub.test"
    image_ttl_s: float = 7 * 24 * 3600.0  # the real hub's default
    cases: dict[str, FakeCase] = field(default_factory=dict)
    labels: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    acked: int = 0
    history: list[tuple[str, str, int]] = field(default_factory=list)
    label_log: list[tuple[float, dict[str, Any], str]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    # -----------------------------------------------------------------------------------------
    # setup
    # -----------------------------------------------------------------------------------------

    def add_cases(self, n: int, *, seed: int = 0, clusters: int = 4, prefix: str = "case") -> list[str]:
        import random

        rng = random.Random(seed)
        k = len(self.class_names)
        ids = []
        with self.lock:
            start = len(self.cases)
            for i in range(n):
                cid = f"{prefix}-{start + i:05d}"
                truth = rng.randrange(k)
                pred = truth if rng.random() < 0.6 else rng.randrange(k)
                self.cases[cid] = FakeCase(cid, truth, pred, round(rng.random(), 4), rng.randrange(clusters))
                ids.append(cid)
        return ids

    def truth(self, case_id: str) -> int | None:
        c = self.cases.get(case_id)
        return c.truth if c else None

    def fail(self, method: str, path_prefix: str, *, times: int = 1, kind: str = "503") -> None:
        with self.lock:
            self.faults.append(Fault(method, path_prefix, times, kind))

    def live_labels(self, case_id: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(v) for v in self.labels.values() if case_id is None or v["case_id"] == case_id]

    def post_webhook(self, body: dict[str, Any]) -> None:
        """Deliver a webhook body to the inbox as Label Studio would (idempotent by body hash)."""
        raw = json.dumps(body).encode()
        self.handle("POST", "/v1/labeling/webhook", {}, {"x-flywheel-webhook-secret": self.webhook_secret}, raw)

    # -----------------------------------------------------------------------------------------
    # the HTTP surface
    # -----------------------------------------------------------------------------------------

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: bytes) -> tuple[int, str, bytes]:
        with self.lock:
            fault = self._fault(method, path)
            if fault == "503":
                self.history.append((method, path, 503))
                return 503, "application/json", b'{"detail": "injected fault"}'
            status, ctype, out = self._route(method, path, query, {k.lower(): v for k, v in headers.items()}, body)
            self.history.append((method, path, status))
            if fault == "lose":
                raise httpx.ReadTimeout("injected fault: the answer was lost")
            return status, ctype, out

    def _fault(self, method: str, path: str) -> str | None:
        for f in self.faults:
            if f.times > 0 and f.method == method and path.startswith(f.path_prefix):
                f.times -= 1
                if f.kind == "drop":
                    raise httpx.ConnectError("injected fault: connection refused")
                return f.kind
        return None

    def _route(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str],
               body: bytes) -> tuple[int, str, bytes]:
        if method == "GET" and path.startswith("/v1/cases/") and path.endswith("/image"):
            return self._image(path.split("/")[3], query)
        if method == "POST" and path == "/v1/labeling/webhook":
            if headers.get("x-flywheel-webhook-secret") != self.webhook_secret:
                return _json(401, {"detail": "missing or wrong X-Flywheel-Webhook-Secret header"})
            digest = hashlib.sha256(body).hexdigest()
            if not any(e["sha"] == digest for e in self.events):
                self.events.append({"id": len(self.events) + 1, "received_at": time.time(), "sha": digest,
                                    "body": json.loads(body)})
            return 204, "application/json", b""
        if headers.get("authorization") != f"Bearer {self.token}":
            return _json(401, {"detail": "bad token"})
        data = json.loads(body) if body else {}
        if method == "POST" and path == "/v1/selections":
            return _json(200, self._select(SelectionRequest.from_dict(data).budget))
        if method == "GET" and path == "/v1/pool":
            state = query.get("state", ["unlabeled"])[0]
            limit, offset = int(query.get("limit", ["100"])[0]), int(query.get("offset", ["0"])[0])
            rows = [c for c in self.cases.values() if c.state == state]
            return _json(200, PoolPage(total=len(rows), state=state,
                                       cases=[self._public(c) for c in rows[offset:offset + limit]]).to_dict())
        if method == "GET" and path.startswith("/v1/cases/"):
            c = self.cases.get(path.split("/")[3])
            return _json(200, self._public(c).to_dict()) if c else _json(404, {"detail": "unknown case"})
        if method == "POST" and path.endswith("/release"):
            c = self.cases.get(path.split("/")[3])
            if c is None:
                return _json(404, {"detail": "unknown case"})
            if c.state in ("labeled", "held"):
                return _json(409, {"detail": f"case {c.case_id!r} is {c.state}; delete its annotations first"})
            c.state = "unlabeled"
            return _json(200, {"case_id": c.case_id, "state": c.state})
        if method == "POST" and path == "/v1/labels":
            return self._label(data)
        if method == "GET" and path == "/v1/labels":
            rows = self.live_labels(query.get("case_id", [None])[0])
            return _json(200, {"labels": [self._label_public(v) for v in rows]})
        if method == "GET" and path == "/v1/labeling/events":
            after = int(query["after"][0]) if "after" in query else self.acked
            limit = int(query.get("limit", ["100"])[0])
            evs = [{"id": e["id"], "received_at": e["received_at"], "body": e["body"]}
                   for e in self.events if e["id"] > after][:limit]
            return _json(200, {"events": evs})
        if method == "POST" and path == "/v1/labeling/events/ack":
            self.acked = max(self.acked, int(data["up_to"]))
            return 204, "application/json", b""
        return _json(404, {"detail": f"no route {method} {path}"})

    def _select(self, budget: int) -> dict[str, Any]:
        pool = sorted((c for c in self.cases.values() if c.state == "unlabeled"), key=lambda c: c.score)[:budget]
        for c in pool:
            c.state = "queued"
        return Selection(selection_id=f"sel-{len(self.history)}", strategy="uncertainty+diversity", budget=budget,
                         pool_size=len(self.cases), cases=[self._public(c) for c in pool]).to_dict()

    def _public(self, c: FakeCase) -> SelectedCase:
        """The case as the contract's type (fleet.protocol.SelectedCase) has it."""
        exp = int(time.time() + self.image_ttl_s)
        sig = hmac.new(self.url_secret, f"{c.case_id}:{exp}".encode(), hashlib.sha256).hexdigest()
        k = len(self.class_names)
        probs = [0.5 / (k - 1)] * k
        probs[c.predicted_class] = 0.5
        case = Case(case_id=c.case_id, device_id="dev-1", captured_at=1.0, model_version=self.model_version,
                    prediction=Classification(c.predicted_class, probs), image_sha256="0" * 64, image_size=1,
                    tags={"condition": "night" if c.cluster % 2 else "day"})
        return SelectedCase(case=case, image_url=f"{self.base_url}/v1/cases/{c.case_id}/image?exp={exp}&sig={sig}",
                            class_names=list(self.class_names), state=c.state, score=c.score,
                            uncertainty=round(1.0 - c.score, 6), received_at=1.0, cluster=c.cluster,
                            label=None if c.label is None else Classification(c.label),
                            label_status=None if c.label is None else "accepted")

    def _label(self, d: dict[str, Any]) -> tuple[int, str, bytes]:
        """A :class:`fleet.protocol.LabelPost`, decided by :mod:`fleet.consensus` as the hub decides it."""
        c = self.cases.get(d.get("case_id", ""))
        if c is None:
            return _json(404, {"detail": f"unknown case {d.get('case_id')!r}"})
        try:
            post = LabelPost.from_dict(d)
        except ProtocolError as exc:
            return _json(422, {"detail": str(exc)})
        if post.label.label >= len(self.class_names):
            return _json(400, {"detail": f"label {post.label.label} is out of range"})
        key = (post.source, post.annotation_id)
        existing = self.labels.get(key)
        if existing is not None and existing["case_id"] != post.case_id:
            return _json(409, {"detail": "annotation belongs to another case"})
        fields = {"case_id": post.case_id, "label": post.label.label, "annotator": post.annotator,
                  "task_id": post.task_id, "created_at": post.created_at, "overlap": post.overlap,
                  "ground_truth": post.ground_truth,
                  "gold": None if post.gold_label is None else post.gold_label.label}
        if post.deleted:
            action = "unchanged" if existing is None else "deleted"
            self.labels.pop(key, None)
        elif existing is None:
            self.labels[key] = {**fields, "annotation_id": key[1], "source": key[0]}
            action = "created"
        elif all(existing[k] == v for k, v in fields.items()):
            action = "unchanged"
        else:
            existing.update(fields)
            action = "updated"
        self.label_log.append((time.time(), dict(d), action))
        verdicts = self._recompute(c)
        return _json(200, LabelReceipt(action=action, case_state=c.state, label_id=key[1],
                                       verdicts=verdicts).to_dict())

    def _recompute(self, c: FakeCase) -> list[Verdict]:
        rows = [v for v in self.labels.values() if v["case_id"] == c.case_id]
        if not rows:
            c.label = None
            c.state = "queued" if c.state in ("labeled", "held", "queued") else c.state
            return []
        gold = next((r["gold"] for r in rows if r["gold"] is not None), None)
        rulings = decide([Vote(i, r["annotator"], r["label"], r["ground_truth"]) for i, r in enumerate(rows)],
                         n_classes=len(self.class_names), required=max(r["overlap"] for r in rows), gold_label=gold)
        for r, ruling in zip(rows, rulings, strict=True):
            r["status"], r["agreement"], r["n_annotators"], r["reason"] = (ruling.status, ruling.agreement,
                                                                            ruling.n_annotators, ruling.reason)
        won = [r for r in rows if r["status"] == "gold"] or [r for r in rows if r["status"] == "accepted"]
        if won:
            c.label, c.state = Counter(r["label"] for r in won).most_common(1)[0][0], "labeled"
        else:
            c.label, c.state = None, "held"
        return [Verdict(annotation_id=r["annotation_id"], source=r["source"], status=r["status"],
                        agreement=r["agreement"], n_annotators=r["n_annotators"], reason=r["reason"]) for r in rows]

    def _label_public(self, r: dict[str, Any]) -> dict[str, Any]:
        return LabelPublic(id=r["annotation_id"], case_id=r["case_id"], label=Classification(r["label"]),
                           annotator=r["annotator"], source=r["source"], task_id=r["task_id"],
                           annotation_id=r["annotation_id"], created_at=r["created_at"], updated_at=r["created_at"],
                           status=r.get("status", "held"), agreement=r.get("agreement"),
                           n_annotators=r.get("n_annotators", 0), reason=r.get("reason", "")).to_dict()

    def _image(self, case_id: str, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        c = self.cases.get(case_id)
        try:
            exp = int(query["exp"][0])
            sig = query["sig"][0]
        except (KeyError, ValueError):
            return _json(403, {"detail": "missing signature"})
        want = hmac.new(self.url_secret, f"{case_id}:{exp}".encode(), hashlib.sha256).hexdigest()
        if c is None or not hmac.compare_digest(want, sig) or exp < time.time():
            return _json(403, {"detail": "bad or expired signature"})
        return 200, "image/png", png_for(c.truth, len(self.class_names), seed=sum(map(ord, case_id)))

    # -----------------------------------------------------------------------------------------
    # adapters
    # -----------------------------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        def handler(request: httpx.Request) -> httpx.Response:
            status, ctype, out = self.handle(request.method, request.url.path, parse_qs(request.url.query.decode()),
                                             dict(request.headers), request.content)
            headers = {"content-type": ctype}
            if ctype == "image/png":
                headers["access-control-allow-origin"] = "*"
            return httpx.Response(status, content=out, headers=headers)

        return httpx.MockTransport(handler)

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Serve on a free loopback port; yields (and sets) the base URL."""
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _do(self) -> None:
                u = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                try:
                    status, ctype, out = hub.handle(self.command, u.path, parse_qs(u.query), dict(self.headers), body)
                except httpx.TransportError:
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                if ctype == "image/png":  # Label Studio's image tag loads cross-origin (crossOrigin=anonymous)
                    self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _do

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{server.server_address[1]}"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield self.base_url
        finally:
            server.shutdown()
            server.server_close()


def _json(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


PALETTE = [(220, 60, 50), (40, 140, 220), (60, 170, 80), (230, 170, 40), (150, 80, 200), (40, 190, 190)]


def png_for(cls: int, n_classes: int, *, seed: int = 0, size: int = 96, noise: Any = None) -> bytes:
    """A small PNG whose colour and stripes say its class (so a screenshot shows something real);
    ``noise`` (a numpy Generator) speckles it so no two images are near-duplicates."""
    r, g, b = PALETTE[cls % len(PALETTE)]
    jitter = noise.random((size, size)) if noise is not None else None
    rows = []
    for y in range(size):
        row = bytearray([0])
        for x in range(size):
            stripe = ((x + y + seed) // (6 + cls * 2)) % 2
            shade = (1.0 if stripe else 0.7) * (0.6 + 0.4 * jitter[y, x] if jitter is not None else 1.0)
            row += bytes((int(r * shade), int(g * shade), int(b * shade)))
        rows.append(bytes(row))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows))) + \
        chunk(b"IEND", b"")
