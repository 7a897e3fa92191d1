"""A hub for ``detect`` cases, served on loopback, for the labeling bridge's box tests.

The real hub (fleet.hub) does not take ``detect`` cases or box labels yet (its ingest needs a classify
prediction's probs; detect ingest is being added on another branch), so these tests speak the same HTTP
contract (fleet/protocol/labeling.py) to this small Starlette app instead. Its labels are decided by the
same entry point the hub calls, :func:`fleet.consensus.decide`, and the case's label is the consensus of
the accepted boxes (:func:`fleet.consensus.merge_detections`). Images are real PNGs with coloured objects
at the true boxes, so Label Studio's annotator view shows the model's boxes on something real.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleet.consensus import Vote, decide, merge_detections
from fleet.errors import ProtocolError
from fleet.protocol import (
    Box,
    Case,
    Detection,
    LabelPage,
    LabelPost,
    LabelPublic,
    LabelReceipt,
    PoolPage,
    SelectedCase,
    Selection,
    SelectionRequest,
    Verdict,
)
from tests.labeling.lsserver import free_port

CLASSES = ["car", "person", "bike"]
# pale object colours on a dark frame, far from the label colours Label Studio strokes the regions with
COLOURS = [(245, 235, 160), (235, 235, 235), (250, 200, 150)]


@dataclass
class DetectCase:
    case_id: str
    model_version: str
    truth: Detection
    prediction: Detection
    score: float
    cluster: int
    image: bytes
    state: str = "unlabeled"
    label: Detection | None = None
    label_status: str | None = None


@dataclass
class DetectHub:
    class_names: list[str] = field(default_factory=lambda: list(CLASSES))
    model_version: str = "det-1"
    token: str = "labeler-token"
    webhook_secret: str = "webhook-secret"
    url: str = ""
    cases: dict[str, DetectCase] = field(default_factory=dict)
    labels: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    posts: list[tuple[LabelPost, str]] = field(default_factory=list)  # every post and what it did
    events: list[dict[str, Any]] = field(default_factory=list)
    acked: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def add_cases(self, n: int, *, seed: int = 0, model_version: str | None = None) -> list[str]:
        """``n`` frames with one to three objects each; the model finds them with jittered corners and misses
        some (the score, the queue's order, is lower where it missed more)."""
        rng = np.random.default_rng(seed)
        ids = []
        with self.lock:
            for _ in range(n):
                cid = f"d-{len(self.cases):04d}-{int(rng.integers(1 << 30)):08x}"
                truth = _scene(rng, len(self.class_names))
                found = [Box(*_jitter(rng, b), b.label, score=round(float(rng.uniform(0.3, 0.95)), 3))
                         for b in truth.boxes if rng.random() < 0.8]
                score = round(len(found) / len(truth.boxes) * float(rng.uniform(0.5, 1.0)), 4)
                self.cases[cid] = DetectCase(cid, model_version or self.model_version, truth, Detection(found),
                                             score, int(rng.integers(3)), _png(truth, rng))
                ids.append(cid)
        return ids

    def truth(self, case_id: str) -> Detection | None:
        c = self.cases.get(case_id)
        return c.truth if c else None

    # -----------------------------------------------------------------------------------------

    def public(self, c: DetectCase) -> SelectedCase:
        exp = int(time.time() + 3600)
        case = Case(case_id=c.case_id, device_id="dev-1", captured_at=1.0, model_version=c.model_version,
                    prediction=c.prediction, image_sha256="0" * 64, image_size=len(c.image),
                    tags={"condition": "day"})
        return SelectedCase(case=case, image_url=f"{self.url}/v1/cases/{c.case_id}/image?exp={exp}",
                            class_names=list(self.class_names), state=c.state, score=c.score,
                            uncertainty=round(1.0 - c.score, 6), received_at=1.0, cluster=c.cluster,
                            label=c.label, label_status=c.label_status)

    def post_label(self, post: LabelPost) -> LabelReceipt:
        c = self.cases.get(post.case_id)
        if c is None:
            raise LookupError(post.case_id)
        if not isinstance(post.label, Detection):
            raise ProtocolError(f"a {post.label.task!r} label for a 'detect' case")
        post.label.check_classes(len(self.class_names), "label")
        key = (post.source, post.annotation_id)
        fields = {"case_id": post.case_id, "label": post.label.as_label(), "annotator": post.annotator,
                  "task_id": post.task_id, "created_at": post.created_at, "overlap": post.overlap,
                  "ground_truth": post.ground_truth, "gold": post.gold_label}
        existing = self.labels.get(key)
        if post.deleted:
            action = "unchanged" if self.labels.pop(key, None) is None else "deleted"
        elif existing is None:
            self.labels[key] = {**fields, "source": key[0], "annotation_id": key[1]}
            action = "created"
        elif all(existing[k] == v for k, v in fields.items()):
            action = "unchanged"
        else:
            existing.update(fields)
            action = "updated"
        self.posts.append((post, action))
        return LabelReceipt(action=action, case_state=c.state, label_id=key[1], verdicts=self._decide(c))

    def _decide(self, c: DetectCase) -> list[Verdict]:
        """As the hub decides a case: fleet.consensus.decide over all its answers, then the case's label."""
        rows = [r for r in self.labels.values() if r["case_id"] == c.case_id]
        gold = next((r["gold"] for r in rows if r["gold"] is not None), None)
        rulings = decide([Vote(r["annotation_id"], r["annotator"], r["label"], r["ground_truth"]) for r in rows],
                         n_classes=len(self.class_names), required=max((r["overlap"] for r in rows), default=1),
                         gold_label=gold)
        for r, ruling in zip(rows, rulings, strict=True):
            r.update(status=ruling.status, agreement=ruling.agreement, n_annotators=ruling.n_annotators,
                     reason=ruling.reason)
        won = [r["label"] for r in rows if r["status"] == "gold"] or \
            [r["label"] for r in rows if r["status"] == "accepted"]
        if won:
            c.label, c.state = merge_detections(won)[0], "labeled"
            c.label_status = "gold" if any(r["status"] == "gold" for r in rows) else "accepted"
        else:
            c.label, c.label_status = None, None
            c.state = "held" if rows else "queued"
        return [Verdict(annotation_id=r["annotation_id"], source=r["source"], status=r["status"],
                        agreement=r["agreement"], n_annotators=r["n_annotators"], reason=r["reason"][:500])
                for r in rows]

    def label_rows(self) -> list[LabelPublic]:
        with self.lock:
            return [LabelPublic(id=r["annotation_id"], case_id=r["case_id"], label=r["label"],
                                annotator=r["annotator"], source=r["source"], task_id=r["task_id"],
                                annotation_id=r["annotation_id"], created_at=r["created_at"],
                                updated_at=r["created_at"], status=r["status"], agreement=r["agreement"],
                                n_annotators=r["n_annotators"], reason=r["reason"][:500])
                    for r in self.labels.values()]

    # -----------------------------------------------------------------------------------------

    def app(self) -> Any:
        """The hub's labeling endpoints (HUB_API in fleet/protocol/labeling.py) as a Starlette app."""
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        hub = self

        def authed(request: Request) -> bool:
            return request.headers.get("authorization") == f"Bearer {hub.token}"

        async def select(request: Request) -> Response:
            if not authed(request):
                return JSONResponse({"detail": "bad token"}, 401)
            budget = SelectionRequest.from_dict(await request.json()).budget
            with hub.lock:
                pool = sorted((c for c in hub.cases.values() if c.state == "unlabeled"), key=lambda c: c.score)
                for c in pool[:budget]:
                    c.state = "queued"
                body = Selection(selection_id=f"sel-{time.monotonic_ns()}", strategy="uncertainty", budget=budget,
                                 pool_size=len(hub.cases), cases=[hub.public(c) for c in pool[:budget]])
            return JSONResponse(body.to_dict())

        async def pool(request: Request) -> Response:
            if not authed(request):
                return JSONResponse({"detail": "bad token"}, 401)
            state = request.query_params.get("state", "unlabeled")
            limit, offset = int(request.query_params.get("limit", 100)), int(request.query_params.get("offset", 0))
            with hub.lock:
                rows = [c for c in hub.cases.values() if c.state == state]
                page = PoolPage(total=len(rows), state=state,
                                cases=[hub.public(c) for c in rows[offset:offset + limit]])
            return JSONResponse(page.to_dict())

        async def case(request: Request) -> Response:
            c = hub.cases.get(request.path_params["case_id"])
            if not authed(request) or c is None:
                return JSONResponse({"detail": "unknown case or bad token"}, 404 if authed(request) else 401)
            return JSONResponse(hub.public(c).to_dict())

        async def image(request: Request) -> Response:
            c = hub.cases.get(request.path_params["case_id"])
            if c is None or "exp" not in request.query_params:
                return JSONResponse({"detail": "unknown case or unsigned URL"}, 403)
            return Response(c.image, media_type="image/png", headers={"Access-Control-Allow-Origin": "*"})

        async def release(request: Request) -> Response:
            c = hub.cases.get(request.path_params["case_id"])
            if not authed(request) or c is None:
                return JSONResponse({"detail": "unknown case"}, 404)
            if c.state in ("labeled", "held"):
                return JSONResponse({"detail": f"case {c.case_id!r} is {c.state}"}, 409)
            c.state = "unlabeled"
            return JSONResponse({"case_id": c.case_id, "state": c.state})

        async def labels(request: Request) -> Response:
            if not authed(request):
                return JSONResponse({"detail": "bad token"}, 401)
            if request.method == "GET":
                return JSONResponse(LabelPage(hub.label_rows()).to_dict())
            try:
                post = LabelPost.from_dict(await request.json())
                with hub.lock:
                    receipt = hub.post_label(post)
            except ProtocolError as exc:
                return JSONResponse({"detail": str(exc)}, 422)
            except LookupError:
                return JSONResponse({"detail": "unknown case"}, 404)
            return JSONResponse(receipt.to_dict())

        async def webhook(request: Request) -> Response:
            if request.headers.get("x-flywheel-webhook-secret") != hub.webhook_secret:
                return JSONResponse({"detail": "wrong webhook secret"}, 401)
            body = await request.json()
            with hub.lock:
                if body not in [e["body"] for e in hub.events]:
                    hub.events.append({"id": len(hub.events) + 1, "received_at": time.time(), "body": body})
            return Response(status_code=204)

        async def events(request: Request) -> Response:
            if not authed(request):
                return JSONResponse({"detail": "bad token"}, 401)
            after = int(request.query_params.get("after", hub.acked))
            limit = int(request.query_params.get("limit", 100))
            with hub.lock:
                out = [{k: e[k] for k in ("id", "received_at", "body")} for e in hub.events if e["id"] > after]
            return JSONResponse({"events": out[:limit]})

        async def ack(request: Request) -> Response:
            hub.acked = max(hub.acked, int((await request.json())["up_to"]))
            return Response(status_code=204)

        return Starlette(routes=[
            Route("/v1/selections", select, methods=["POST"]), Route("/v1/pool", pool),
            Route("/v1/cases/{case_id}", case), Route("/v1/cases/{case_id}/image", image),
            Route("/v1/cases/{case_id}/release", release, methods=["POST"]),
            Route("/v1/labels", labels, methods=["GET", "POST"]),
            Route("/v1/labeling/webhook", webhook, methods=["POST"]),
            Route("/v1/labeling/events", events), Route("/v1/labeling/events/ack", ack, methods=["POST"]),
        ])


@contextmanager
def serve_detect_hub(hub: DetectHub) -> Iterator[DetectHub]:
    """Serve ``hub`` on a free loopback port with uvicorn (sets ``hub.url``)."""
    import uvicorn

    port = free_port()
    hub.url = f"http://127.0.0.1:{port}"
    server = uvicorn.Server(uvicorn.Config(hub.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield hub
    finally:
        server.should_exit = True
        thread.join(10)


def _scene(rng: np.random.Generator, k: int) -> Detection:
    """One to three objects of random classes, well inside the frame and apart from each other."""
    boxes: list[Box] = []
    for _ in range(int(rng.integers(1, 4))):
        for _ in range(20):
            w, h = rng.uniform(0.18, 0.35, 2)
            x, y = rng.uniform(0.03, 0.97 - w), rng.uniform(0.03, 0.97 - h)
            cand = Box(round(float(x), 4), round(float(y), 4), round(float(x + w), 4), round(float(y + h), 4),
                       int(rng.integers(k)))
            if all(cand.x2 < b.x1 or b.x2 < cand.x1 or cand.y2 < b.y1 or b.y2 < cand.y1 for b in boxes):
                boxes.append(cand)
                break
    return Detection(boxes)


def _jitter(rng: np.random.Generator, b: Box) -> tuple[float, float, float, float]:
    w, h = b.x2 - b.x1, b.y2 - b.y1
    x1, y1, x2, y2 = np.clip(np.array([b.x1, b.y1, b.x2, b.y2]) + rng.normal(0, 0.04, 4) * [w, h, w, h], 0, 1)
    return float(x1), float(y1), float(max(x2, x1 + 0.01)), float(max(y2, y1 + 0.01))


def _png(truth: Detection, rng: np.random.Generator, size: int = 192) -> bytes:
    """A dark, speckled frame with a filled, outlined rectangle of its class's colour at each true box."""
    from PIL import Image, ImageDraw

    pixels = (rng.normal(70, 10, (size, size, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    for b in truth.boxes:
        colour = COLOURS[b.label % len(COLOURS)]
        draw.rectangle([b.x1 * size, b.y1 * size, b.x2 * size - 1, b.y2 * size - 1], fill=colour,
                       outline=(20, 20, 20), width=2)
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()
