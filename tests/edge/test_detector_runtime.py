"""Detector models on the device: the layout checked at load, dense outputs decoded into boxes, health check,
OTA refusal and rollback, and the shadow challenger beside a detector."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet.edge.modelstore import ModelStore
from fleet.edge.ota import LoadedModels, OtaManager
from fleet.edge.shadow import decide, infer
from fleet.edge.sources import Frame
from fleet.inference.detector import Detections, best_labels, box_sets_agree, decode, to_detection
from fleet.inference.runtime import ModelError, ModelRuntime, health_check, synthetic_frames
from fleet.protocol import Detection, DetectorSpec, ModelManifest
from fleet.signing import sign_manifest
from tests.edge.conftest import DEVICE, Keys, assign, client, publish
from tests.edge.test_agent import make_agent
from tests.support.detectors import Square, draw_squares, make_detector_files, square_box
from tests.support.inproc import InProcHub
from tests.support.models import ModelFiles, make_model_files

H = W = 32
RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)
# three squares, no two sharing a row or a column (the detector's counting window would see both)
SCENE: list[Square] = [(1, 1, 11, 11, RED), (20, 12, 30, 22, GREEN), (11, 22, 19, 31, BLUE)]


def expected_score(square: Square, *, stride: int = 4, gain: float = 12.0) -> tuple[int, float]:
    """The class and score the hand-set detector must give ``square``: the best anchor inside it, by its
    class score (sigmoid of the channel's brightness) times FCOS centerness."""
    x1, y1, x2, y2, colour = square
    best = (-1, -1.0)
    for y in range(stride // 2, H, stride):
        for x in range(stride // 2, W, stride):
            if not (x1 <= x < x2 and y1 <= y < y2):
                continue
            lr = sorted([x - x1 + 0.5, x2 - x - 0.5])
            tb = sorted([y - y1 + 0.5, y2 - y - 0.5])
            ctr = np.sqrt(lr[0] / lr[1] * tb[0] / tb[1])
            cls = 1 / (1 + np.exp(-gain * (np.array(colour) / 255 - 0.5)))
            label = int(np.argmax(cls))
            if cls[label] * ctr > best[1]:
                best = (label, float(cls[label] * ctr))
    return best


def detector(tmp_path: Path, version: str = "d1", **kw: Any) -> ModelRuntime:
    files = make_detector_files(tmp_path / "models", version, **kw)
    return ModelRuntime(files.onnx_path, files.manifest)


def frame_boxes(d: Detections, i: int) -> list[list[float]]:
    return [[round(float(v) * W, 4) for v in b] for b in d.boxes[d.rows(i)]]


# -- decoding on the hand-set detector ------------------------------------------------------------


def test_detector_finds_each_square_once_with_its_class_score_and_distribution(tmp_path: Path) -> None:
    rt = detector(tmp_path)
    out = rt.run([draw_squares(H, W, SCENE), np.zeros((H, W, 3), np.uint8)])
    assert out.logits is None and out.embedding.shape == (2, 16)
    assert out.boxes is not None and out.boxes.shape == (2, 64, 4) and out.scores is not None
    d = out.detections
    assert d is not None and len(d) == 2 and d.counts.tolist() == [3, 0] and d.known_mask.all()
    want = sorted(((expected_score(s), square_box(s, H, W)) for s in SCENE), key=lambda t: -t[0][1])
    got = d.boxes[d.rows(0)]
    assert np.allclose(got, [box for _, box in want], atol=1e-6)  # the squares' exact boxes, best first
    assert d.labels[d.rows(0)].tolist() == [label for (label, _), _ in want]
    assert np.allclose(d.scores[d.rows(0)], [score for (_, score), _ in want], atol=1e-5)
    probs = d.probs[d.rows(0)]
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6) and (probs.argmax(axis=1) == d.labels[d.rows(0)]).all()
    assert probs.max(axis=1).min() > 0.99  # a pure colour leaves little doubt
    first = to_detection(d, 0)
    first.validate()
    assert [b.label for b in first.boxes] == d.labels[d.rows(0)].tolist()
    assert to_detection(d, 1) == Detection([])  # nothing found is an empty list
    assert best_labels(d).tolist() == [want[0][0][0], -1]


def test_nms_keeps_one_box_per_object_and_class(tmp_path: Path) -> None:
    rt = detector(tmp_path)
    big = (4, 4, 20, 20, RED)  # 16 anchors inside, every one of them decodes the same box
    out = rt.run([draw_squares(H, W, [big])])
    assert out.scores is not None and int((out.scores[0].max(axis=1) >= 0.05).sum()) == 16
    d = out.detections
    assert d is not None and d.counts.tolist() == [1]
    assert np.allclose(d.boxes[0], square_box(big, H, W)) and d.labels[0] == 0
    # a yellow square is red and green alike: one box (its best class), with the tie in its distribution
    d = rt.run([draw_squares(H, W, [(8, 8, 20, 20, YELLOW)])]).detections
    assert d is not None and d.counts.tolist() == [1]
    assert np.allclose(d.probs[0], [0.5, 0.5, 0.0], atol=3e-3)


def test_thresholds_top_k_and_max_detections_follow_the_manifest(tmp_path: Path) -> None:
    grid = [(x, y, x + 8, y + 8, (RED, GREEN, BLUE, WHITE)[(x + y) % 4]) for x in (2, 20, 38, 56)
            for y in (2, 20, 38, 56)]
    image = draw_squares(64, 64, grid)
    runs = {}
    for name, spec in {"all": DetectorSpec(), "max5": DetectorSpec(max_detections=5),
                       "top3": DetectorSpec(pre_nms_top_k=3),
                       "strict": DetectorSpec(score_threshold=0.6, operating_threshold=0.6)}.items():
        rt = detector(tmp_path, f"g-{name}", height=64, width=64, reach=10, detector=spec)
        runs[name] = rt.run([image]).detections
    everything = runs["all"]
    assert everything.counts.tolist() == [16]
    boxes = {tuple(np.round(b * 64).astype(int)) for b in everything.boxes}
    assert boxes == {(x1, y1, x2, y2) for x1, y1, x2, y2, _ in grid}
    scores = everything.scores
    assert (np.diff(scores) <= 0).all()  # best first
    assert np.array_equal(runs["max5"].boxes, everything.boxes[:5])  # the five best, not any five
    assert runs["top3"].counts.tolist() == [3]  # only three anchors survive to NMS: three boxes at most
    strict = runs["strict"]
    assert strict.counts.tolist() == [int((scores >= 0.6).sum())] and (strict.scores >= 0.6).all()
    assert 0 < strict.counts[0] < 16


def test_empty_and_nonfinite_frames(tmp_path: Path) -> None:
    d = detector(tmp_path).run([np.zeros((H, W, 3), np.uint8), np.full((H, W), 40, np.uint8)]).detections
    assert d is not None and d.counts.tolist() == [0, 0] and d.known_mask.all()
    assert d.boxes.shape == (0, 4) and d.probs.shape == (0, 3) and best_labels(d).tolist() == [-1, -1]
    boxes = np.tile([[0.1, 0.1, 0.5, 0.5]], (2, 3, 1)).astype(np.float32)
    scores = np.full((2, 3, 2), 0.9, np.float32)
    scores[1, 2, 0] = np.nan
    d = decode(boxes, scores, DetectorSpec())
    assert d.known_mask.tolist() == [True, False] and d.counts.tolist() == [1, 0]
    scores[1, 2, 0] = 1.5  # a score out of [0, 1] is as much a fault as NaN
    boxes[0, 0, 0] = np.inf
    assert decode(boxes, scores, DetectorSpec()).known_mask.tolist() == [False, False]


# -- the decoder against torchvision's post-processing -------------------------------------------


def reference_decode(boxes: np.ndarray, scores: np.ndarray, spec: DetectorSpec) -> list[Any]:
    """What torchvision's detectors do with the same outputs: one candidate per anchor (its best class),
    threshold, top-k, clip to the image, drop empty boxes, class-wise ``batched_nms``, keep the best.
    Per frame: boxes, scores, labels and the anchors they came from."""
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    out = []
    for b, s in zip(torch.from_numpy(boxes.astype(np.float64)), torch.from_numpy(scores.astype(np.float64)),
                    strict=True):
        best, label = s.max(dim=1)
        keep = torch.nonzero(best >= spec.score_threshold).flatten()
        keep = keep[best[keep].topk(min(spec.pre_nms_top_k, len(keep))).indices]
        bb = ops.clip_boxes_to_image(b[keep], (1, 1))
        wide = ops.remove_small_boxes(bb, 1e-12)
        keep, bb = keep[wide], bb[wide]
        kept = ops.batched_nms(bb, best[keep], label[keep], spec.nms_iou)[: spec.max_detections]
        out.append((bb[kept].numpy(), best[keep][kept].numpy(), label[keep][kept].numpy(), keep[kept].numpy()))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_matches_torchvision_postprocessing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, a, k = 3, 400, 4
    centres = rng.uniform(0.1, 0.9, (n, 6, 2))[:, rng.integers(0, 6, a)]  # anchors cluster on six objects
    sizes = rng.uniform(0.05, 0.3, (n, a, 2))
    jitter = rng.normal(0, 0.02, (n, a, 4))
    boxes = (np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=2) + jitter).astype(np.float32)
    boxes[0, :5, 2] = boxes[0, :5, 0] - 0.01  # empty after decoding: dropped
    scores = (rng.uniform(0, 1, (n, a, k)) ** 3).astype(np.float32)
    for spec in (DetectorSpec(), DetectorSpec(score_threshold=0.3, nms_iou=0.3, pre_nms_top_k=50, max_detections=7)):
        got = decode(boxes, scores, spec)
        want = reference_decode(boxes, scores, spec)
        for i, (wb, ws, wl, anchors) in enumerate(want):
            r = got.rows(i)
            assert got.counts[i] == len(wb) > 0
            assert np.allclose(got.boxes[r], wb, atol=1e-6) and np.allclose(got.scores[r], ws, atol=1e-6)
            assert np.array_equal(got.labels[r], wl)
            per_class = scores[i, anchors]  # each kept box's class distribution is its anchor's, normalised
            assert np.allclose(got.probs[r], per_class / per_class.sum(axis=1, keepdims=True), atol=1e-6)


def test_nms_is_class_wise() -> None:
    boxes = np.array([[[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.52, 0.5], [0.14, 0.1, 0.54, 0.5]]], np.float32)
    scores = np.array([[[0.9, 0.1], [0.8, 0.1], [0.1, 0.7]]], np.float32)  # two class-0 boxes, one class-1
    d = decode(boxes, scores, DetectorSpec())
    assert d.labels.tolist() == [0, 1] and np.allclose(d.scores, [0.9, 0.7])
    d = decode(boxes, scores, DetectorSpec(nms_iou=0.95))  # the overlap (IoU 0.9) is under the bar: both kept
    assert d.labels.tolist() == [0, 0, 1]


# -- refusing a model whose outputs do not match its manifest ------------------------------------


def relabel(m: ModelManifest, **changes: Any) -> ModelManifest:
    return dataclasses.replace(m, **changes)


@pytest.mark.parametrize(("change", "message"), [
    ({"class_names": ["a", "b", "c", "d"]},
     r"output 'scores' has shape \['n', 64, 3\], expected \(n, A, 4\) with k = 4 classes in the manifest's"),
    ({"embedding_dim": 8}, r"output 'embedding' has shape \['n', 16\], expected \(n, 8\) with d = the manifest's "
                           r"embedding_dim 8"),
    ({"task": "classify", "outputs": ["logits", "embedding"], "detector": None},
     r"must have outputs 'logits' and 'embedding'; it has \['boxes', 'scores', 'embedding'\] \(those of a "
     r"'detect' model\)"),
])
def test_detector_whose_outputs_do_not_match_its_manifest_is_refused(tmp_path: Path, change: dict[str, Any],
                                                                     message: str) -> None:
    files = make_detector_files(tmp_path, "d1")
    with pytest.raises(ModelError, match=message):
        ModelRuntime(files.onnx_path, relabel(files.manifest, **change))


def test_detector_outputs_named_otherwise_or_a_classifier_graph_are_refused(tmp_path: Path) -> None:
    files = make_detector_files(tmp_path, "d1", outputs=("boxes", "class_scores", "embedding"))
    with pytest.raises(ModelError, match=r"model 'd1' \(task 'detect'\) must have outputs \['boxes', 'scores', "
                                         r"'embedding'\]; it has \['boxes', 'class_scores', 'embedding'\]$"):
        ModelRuntime(files.onnx_path, files.manifest)
    clf = make_model_files(tmp_path, "c1", channels=3, height=H, width=W)
    as_detector = relabel(clf.manifest, task="detect", outputs=["boxes", "scores", "embedding"],
                          detector=DetectorSpec())
    with pytest.raises(ModelError, match=r"it has \['logits', 'embedding'\] \(those of a 'classify' model\)"):
        ModelRuntime(clf.onnx_path, as_detector)


def test_health_check_runs_a_detector(tmp_path: Path) -> None:
    rt = detector(tmp_path)
    health_check(rt, [])
    health_check(rt, [draw_squares(H, W, SCENE)] * 3)
    for poison, message in (("nan", r"health check: scores holds 384 NaN"),
                            ("range", r"health check: scores range over \[0, 2\.\d+\], expected")):
        bad = detector(tmp_path, f"bad-{poison}", poison=poison)
        with pytest.raises(ModelError, match=message):
            health_check(bad, synthetic_frames(bad.manifest.input, 1) + [draw_squares(H, W, SCENE)])
    # boxes and scores over different anchors: refused at load where the graph's shapes say so, else when it runs
    files = make_detector_files(tmp_path, "fixed", poison="anchors")
    with pytest.raises(ModelError, match=r"outputs 'boxes' and 'scores' must cover the same anchors; they have "
                                         r"64 and 63"):
        ModelRuntime(files.onnx_path, files.manifest)
    files = make_detector_files(tmp_path, "symbolic", poison="anchors", dynamic_size=True)
    rt = ModelRuntime(files.onnx_path, files.manifest)
    with pytest.raises(ModelError, match=r"model 'symbolic': scores shape \(4, 63, 3\), expected \(4, 64, 3\)"):
        health_check(rt, [])


# -- over the air -------------------------------------------------------------------------------


def signed_detector(tmp_path: Path, keys: Keys, version: str, **kw: Any) -> ModelFiles:
    return make_detector_files(tmp_path / "published", version, private_key=keys.private, **kw)


def follow(ota: OtaManager) -> None:
    """One OTA turn: fetch the hub's assignment for this device, follow it, report."""
    ota.apply(ota.client.get_assignment())
    ota.flush_reports()


def test_ota_refuses_a_detector_whose_outputs_do_not_match_and_keeps_running(tmp_path: Path, hub: InProcHub,
                                                                              keys: Keys) -> None:
    v1 = signed_detector(tmp_path, keys, "v1")
    publish(hub, v1)
    ota = OtaManager(ModelStore(tmp_path / "device", keys.public_b64), client(hub), device_id=DEVICE)
    ota.startup()
    assign(hub, v1)
    follow(ota)
    running = ota.models.active
    assert running is not None and running.manifest.task == "detect"
    v2 = signed_detector(tmp_path, keys, "v2", class_channels=(0, 1))  # a graph with two classes
    wrong = relabel(v2.manifest, class_names=["red", "green", "blue"])  # ... published as three
    wrong_files = dataclasses.replace(v2, manifest=wrong, signed=sign_manifest(wrong, keys.private))
    publish(hub, wrong_files)  # the hub checks the signature and the bytes, not the graph
    assign(hub, wrong_files)
    follow(ota)
    assert ota.models.active is running and ota.store.get("active").version == "v1"  # type: ignore[union-attr]
    assert not list(ota.store.incoming.iterdir())
    report = hub.ota_reports()[-1]
    assert (report.version, report.outcome, report.previous_version) == ("v2", "refused", "v1")
    assert "output 'scores' has shape ['n', 64, 2], expected (n, A, 3)" in report.reason
    # a detector that installs and then misbehaves in service is rolled back like a classifier
    v3 = signed_detector(tmp_path, keys, "v3", gain=8.0)
    publish(hub, v3)
    assign(hub, v3)
    follow(ota)
    assert ota.models.versions == ("v3", None)
    assert ota.rollback("NaN boxes in 3 consecutive windows")
    ota.flush_reports()
    assert ota.models.versions == ("v1", None)
    assert [(r.version, r.outcome) for r in hub.ota_reports()] == [
        ("v1", "installed"), ("v2", "refused"), ("v3", "installed"), ("v3", "rolled_back")]


# -- the challenger beside a detector ---------------------------------------------------------------


def scenes() -> list[Frame]:
    """Six frames: red and blue squares (where a challenger that swaps red and green flips the class), green
    alone, nothing, and blue alone (where it agrees)."""
    layouts: list[list[Square]] = [
        [(4, 8, 16, 20, RED)], [(4, 8, 16, 20, RED), (22, 20, 30, 30, BLUE)], [(20, 2, 28, 10, GREEN)], [],
        [(22, 20, 30, 30, BLUE)], [(2, 2, 12, 12, BLUE), (20, 18, 30, 28, BLUE)],
    ]
    return [Frame(image=draw_squares(H, W, sq), frame_id=f"f{i}") for i, sq in enumerate(layouts)]


def test_challenger_detections_run_beside_the_active_detector(tmp_path: Path) -> None:
    active = detector(tmp_path, "d1")
    same = detector(tmp_path, "d2", seed=5)  # the same boxes (another embedding)
    swapped = detector(tmp_path, "d3", class_channels=(1, 0, 2))  # calls red green and green red
    frames = scenes()
    inferred = infer(frames[:3], LoadedModels(active, same), now=1.0)
    assert inferred.logits is None and inferred.challenger_logits is None
    assert inferred.boxes is not None and inferred.challenger_boxes is not None  # dense: the window decodes them
    alike = decide([inferred], [], device_id="dev")
    assert alike.detections is not None and alike.challenger_detections is not None
    assert frame_boxes(alike.challenger_detections, 1) == frame_boxes(alike.detections, 1)
    assert alike.challenger_agrees is not None and alike.challenger_agrees.tolist() == [1, 1, 1]
    models = LoadedModels(active, swapped)
    window = [infer(frames[:3], models, now=1.0), infer(frames[3:], models, now=2.0)]
    result = decide(window, [], device_id="dev")
    assert result.captures == [] and result.nonfinite == 0
    assert result.detections is not None and result.challenger_detections is not None
    assert result.detections.counts.tolist() == [1, 2, 1, 0, 1, 2]
    assert result.challenger_agrees is not None and result.challenger_agrees.tolist() == [0, 0, 0, 1, 1, 1]
    assert result.predicted.tolist() == [0, 0, 1, -1, 2, 2] and (result.human == -1).all()
    ch = result.challenger_detections
    assert ch.labels[ch.rows(0)].tolist() == [1]  # the red square, called green
    assert frame_boxes(ch, 1) == frame_boxes(result.detections, 1)


def test_box_set_agreement_needs_the_same_objects_and_classes() -> None:
    def dets(frames: list[list[tuple[float, float, float, float, int, float]]]) -> Detections:
        rows = [r for f in frames for r in f]
        arr = np.array(rows, np.float64).reshape(-1, 6)
        labels = arr[:, 4].astype(np.int64)
        return Detections(arr[:, :4], arr[:, 5], labels, np.cumsum([0] + [len(f) for f in frames]),
                          np.eye(2)[labels], np.ones(len(frames), bool))

    a = dets([[(0.1, 0.1, 0.5, 0.5, 0, 0.9)], [(0.1, 0.1, 0.5, 0.5, 0, 0.9)], [(0.1, 0.1, 0.5, 0.5, 0, 0.9)],
              [], [(0.1, 0.1, 0.5, 0.5, 0, 0.9), (0.6, 0.6, 0.9, 0.9, 1, 0.3)]])
    b = dets([[(0.12, 0.1, 0.52, 0.5, 0, 0.8)],  # IoU 0.9: the same object
              [(0.3, 0.1, 0.7, 0.5, 0, 0.8)],  # IoU 0.33: another
              [(0.1, 0.1, 0.5, 0.5, 1, 0.8)],  # the same box, another class
              [(0.1, 0.1, 0.5, 0.5, 0, 0.8)],  # found where the other found nothing
              [(0.1, 0.1, 0.5, 0.5, 0, 0.9)]])  # the other's extra box is under its operating threshold
    assert box_sets_agree(a, b, a_threshold=0.5, b_threshold=0.5).tolist() == [1, 0, 0, 0, 1]
    assert box_sets_agree(a, b, a_threshold=0.2, b_threshold=0.5).tolist() == [1, 0, 0, 0, 0]
    b_nan = dataclasses.replace(b, known=np.array([True, True, True, True, False]))
    assert box_sets_agree(a, b_nan, a_threshold=0.5, b_threshold=0.5).tolist() == [1, 0, 0, 0, -1]


def test_a_challenger_of_another_task_is_not_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clf = make_model_files(tmp_path, "c1", channels=3, height=H, width=W)
    models = LoadedModels(detector(tmp_path), ModelRuntime(clf.onnx_path, clf.manifest))
    with caplog.at_level(logging.ERROR):
        inferred = infer(scenes(), models)
    assert inferred.boxes is not None and inferred.challenger_boxes is None
    assert "challenger c1 is a 'classify' model beside a 'detect' active model; not run" in caplog.text
    assert decide([inferred], [], device_id="dev").challenger_agrees is None


def test_agent_counts_challenger_agreement_on_boxes_in_the_heartbeat(tmp_path: Path, hub: InProcHub, keys: Keys,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    v1 = signed_detector(tmp_path, keys, "v1")
    v2 = signed_detector(tmp_path, keys, "v2", class_channels=(1, 0, 2))
    publish(hub, v1)
    publish(hub, v2)
    spec = {"id": "ch", "version": 1, "rule": {"trigger": "box_challenger_disagreement"}}
    assign(hub, v2, campaigns=(spec,))
    hub.rollout("v1", [1.0])  # the canary (every device) runs v1 and keeps the incumbent v2 in shadow
    agent = make_agent(tmp_path, hub, keys, scenes() * 5, runtime={"batch_size": 4})
    with caplog.at_level(logging.ERROR):
        summary = agent.run()
    agent.close()
    assert (summary.model_version, summary.challenger_version, summary.frames) == ("v1", "v2", 30)
    hb = hub.heartbeats()[-1]
    assert (hb.challenger_compared, hb.challenger_agreed) == (30, 15)
    assert hb.counters["frames_seen"] == 30 and hb.human_compared == 0 and hb.counters["health_failures"] == 0
    metrics = hub.field_metrics("v1")  # the hub counts the shadow's agreement for the version the device ran
    assert (metrics["challenger_compared"], metrics["challenger_agreed"]) == (30, 15)
    # the frames where the challenger disagrees are the ones the campaign keeps (fewer with the dedup)
    assert 0 < hb.counters["flagged"] <= 15 and "cannot run" not in caplog.text
