"""Export of detectors to the dense layout: ONNX against torch, the device's decoding (a numpy decoder and NMS
kept here, written from the rule in training.detect.dense) against the boxes the trainer's gate measures, the
signed manifest (task detect, DetectorSpec), int8 only when its mAP holds, and the models that cannot export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from fleet.errors import InvalidInput
from fleet.protocol import DetectorSpec, InputSpec, SignedManifest
from fleet.signing import load_private_key, verify_file_sha256, verify_manifest
from training.checkpoint import load_checkpoint
from training.detect import export as det_export
from training.detect.data import load_box_npz
from training.detect.dense import DenseDetector, Detections, device_decode
from training.detect.evaluate import predict
from training.detect.export import compare_dense, embedding_dim, export_detector
from training.detect.models import Detector, build_detector
from training.detect.report import rebuild_detector
from training.errors import ParityError
from training.export import input_spec, normalize_images


def numpy_decode(boxes: np.ndarray, scores: np.ndarray, *, score_threshold: float, pre_nms_top_k: int,
                 nms_iou: float, max_detections: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The device's decoding as training.detect.dense documents it, in plain numpy loops: per frame, each anchor
    with its best class, those scoring above the threshold, the top k, greedy NMS within each class, the best
    max_detections."""
    out = []
    for b, s in zip(boxes, scores, strict=True):
        cls, sc = s.argmax(axis=1), s.max(axis=1)
        anchor = np.flatnonzero(sc > score_threshold)
        top = anchor[np.argsort(-sc[anchor], kind="stable")][:pre_nms_top_k]
        keep: list[int] = []
        for i in top:  # already best first
            same = [j for j in keep if cls[j] == cls[i]]
            if not same or iou(b[i], b[same]).max() <= nms_iou:
                keep.append(int(i))
        keep = keep[:max_detections]
        out.append((b[keep], sc[keep], cls[keep]))
    return out


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0, None)
    inter = ix * iy
    return inter / ((box[2] - box[0]) * (box[3] - box[1]) + (others[:, 2] - others[:, 0]) *
                    (others[:, 3] - others[:, 1]) - inter)


@pytest.fixture(scope="module")
def exported(trained_detector: Path, signing_key: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Detector, dict, Path, np.ndarray]:
    ckpt = load_checkpoint(trained_detector / "checkpoint.pt")
    meta = ckpt["meta"]
    model = rebuild_detector(meta, ckpt["model"]).eval()
    test = load_box_npz(trained_detector.parent / "scenes96.npz").test
    assert test is not None
    out = tmp_path_factory.mktemp("det-export")
    export_detector(model, out, meta=meta, version="det-2", parent_version="det-parent",
                    images=test.images.images[:16], truth=test, metrics={"test_map": 0.5}, operating_threshold=0.3,
                    key=load_private_key(signing_key[0]), parity_threshold=1e-5)
    x = normalize_images(test.images.images[:16], InputSpec.from_dict(meta["input"])).astype(np.float32)
    return model, meta, out, x


def test_onnx_outputs_match_torch_to_1e5_with_a_dynamic_batch(exported: tuple) -> None:
    model, meta, out, x = exported
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["boxes", "scores", "embedding"]
    dense = DenseDetector(model).eval()
    dense.center_embedding(torch.from_numpy(x))  # as the export did, on the images it was given (no calibration)
    with torch.inference_mode():
        want = [t.numpy() for t in dense(torch.from_numpy(x))]
    got = sess.run(None, {"input": x})
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)) <= 1e-5
    assert np.abs(got[2].mean(axis=0)).max() < 1e-4  # centred on those images
    a = dense.num_anchors
    assert a == 12 * 12 + 6 * 6 + 3 * 3  # one anchor a place on the 96x96 input's strides 8, 16, 32
    for n in (1, 5):
        boxes, scores, emb = sess.run(None, {"input": x[:n]})
        assert boxes.shape == (n, a, 4) and scores.shape == (n, a, 4) and emb.shape == (n, meta["embedding_dim"])
        assert boxes.min() >= 0 and boxes.max() <= 1 and scores.min() >= 0 and scores.max() <= 1
        assert np.all(boxes[..., 2] >= boxes[..., 0]) and np.all(boxes[..., 3] >= boxes[..., 1])


def same_detections(a: tuple, b: tuple, *, atol: float) -> bool:
    """The same detections, each matched once (class equal, score and box within ``atol``): the order of two whose
    scores tie within ``atol`` may differ between onnxruntime's float arithmetic and torch's."""
    (ab, as_, ac), (bb, bs, bc) = a, b
    free = list(range(len(bs)))
    for box, score, cls in zip(ab, as_, ac, strict=True):
        hit = next((j for j in free if bc[j] == cls and abs(bs[j] - score) <= atol
                    and np.allclose(bb[j], box, atol=atol)), None)
        if hit is None:
            return False
        free.remove(hit)
    return not free


def test_the_device_decodes_the_boxes_the_gate_measured(exported: tuple, trained_detector: Path) -> None:
    model, meta, out, x = exported
    signed = SignedManifest.from_json((out / "manifest.json").read_text())
    spec = signed.manifest.detector
    assert spec is not None
    boxes, scores, _ = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": x})
    decoded = numpy_decode(boxes, scores, score_threshold=spec.score_threshold, pre_nms_top_k=spec.pre_nms_top_k,
                           nms_iou=spec.nms_iou, max_detections=spec.max_detections)
    test = load_box_npz(trained_detector.parent / "scenes96.npz").test
    assert test is not None
    gate = predict(model, test.images.images[:16], mean=meta["input"]["mean"], std=meta["input"]["std"])
    found = 0
    for (b, s, c), gb, gs, gc in zip(decoded, gate.boxes, gate.scores, gate.classes, strict=True):
        assert len(s) == len(gs)
        assert same_detections((b, s, c), (gb, gs, gc), atol=1e-5)
        found += int((s >= spec.operating_threshold).sum())
    assert found >= len(x) // 2  # a trained model: real detections, not just the score floor


def test_the_gate_reads_a_mapped_set_without_handing_torch_read_only_memory(
        exported: tuple, trained_detector: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --stream the evaluation images are a read-only mapping; torch warns on (and may not write to) a
    read-only array, so each batch is copied first, and the detections are the same."""
    model, meta, _, _ = exported
    test = load_box_npz(trained_detector.parent / "scenes96.npz").test
    assert test is not None
    images = test.images.images[:16].copy()
    writable = predict(model, images, mean=meta["input"]["mean"], std=meta["input"]["std"], batch_size=8)
    images.setflags(write=False)
    seen: list[bool] = []
    real = torch.from_numpy

    def spy(a: np.ndarray) -> torch.Tensor:
        seen.append(bool(a.flags.writeable))
        return real(a)

    monkeypatch.setattr(torch, "from_numpy", spy)
    mapped = predict(model, images, mean=meta["input"]["mean"], std=meta["input"]["std"], batch_size=8)
    assert seen and all(seen)
    for a, b in zip((writable.boxes, writable.scores, writable.classes), (mapped.boxes, mapped.scores,
                                                                         mapped.classes), strict=True):
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_the_signed_manifest_describes_a_detector(exported: tuple, signing_key: tuple[Path, str]) -> None:
    model, meta, out, _ = exported
    signed = SignedManifest.from_json((out / "manifest.json").read_text())
    manifest = verify_manifest(signed, signing_key[1])
    verify_file_sha256(out / "model.onnx", manifest.onnx_sha256, manifest.onnx_size)
    assert manifest.task == "detect" and manifest.outputs == ["boxes", "scores", "embedding"]
    assert manifest.version == "det-2" and manifest.parent_version == "det-parent"
    assert manifest.class_names == ["0", "1", "2", "3"] and manifest.embedding_dim == meta["embedding_dim"] == 192
    spec = manifest.detector
    assert spec is not None and spec.score_threshold == model.post.score_thresh
    assert spec.nms_iou == model.post.nms_thresh and spec.max_detections == model.post.detections_per_img
    # torchvision's top-k is per level; the device's over all 3 levels' pairs never cuts what it would keep
    assert spec.pre_nms_top_k == 3 * model.post.topk_candidates >= 189 * 4
    assert spec.operating_threshold == 0.3 and manifest.metrics == {"test_map": 0.5}
    assert manifest.input.height == 96 and manifest.input.mean == meta["input"]["mean"]


def test_int8_ships_only_when_its_map_holds(trained_detector: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = load_checkpoint(trained_detector / "checkpoint.pt")
    model = rebuild_detector(ckpt["meta"], ckpt["model"])
    test = load_box_npz(trained_detector.parent / "scenes96.npz").test
    assert test is not None
    kw = dict(meta=ckpt["meta"], version="q", parent_version=None, images=test.images.images[:8],
              calibration=ckpt["meta"]["calibration"].numpy(), int8=True)
    res = export_detector(model, tmp_path / "a", truth=test, **kw)
    assert res.int8_note is not None and res.int8_agreement is not None
    assert (res.shipped == "int8") == res.int8_note.startswith("int8 shipped: mAP")
    assert (tmp_path / "a" / "model.int8.onnx").is_file()
    monkeypatch.setattr(det_export, "INT8_MAX_MAP_DROP", -1.0)  # int8 would have to beat fp32 by a whole point
    strict = export_detector(model, tmp_path / "b", truth=test, **kw)
    assert strict.shipped == "fp32" and "int8 not shipped: mAP" in (strict.int8_note or "")
    blind = export_detector(model, tmp_path / "c", truth=None, **kw)
    assert blind.shipped == "fp32" and blind.int8_note == ("int8 not shipped: no labelled images to measure its mAP "
                                                           "on; shipping fp32")


def test_an_onnx_model_that_decodes_other_boxes_publishes_nothing(trained_detector: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = load_checkpoint(trained_detector / "checkpoint.pt")
    model = rebuild_detector(ckpt["meta"], ckpt["model"])
    real = det_export._run_onnx

    def shifted(onnx_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, scores = real(onnx_path, x)
        return boxes + 0.01, scores

    monkeypatch.setattr(det_export, "_run_onnx", shifted)
    images = load_box_npz(trained_detector.parent / "scenes96.npz").test.images.images[:4]  # type: ignore[union-attr]
    with pytest.raises(ParityError, match="the device's boxes from model.fp32.onnx are not the boxes torch's "
                                          "outputs decode to .*boxes differ by up to 0.01"):
        export_detector(model, tmp_path, meta=ckpt["meta"], version="bad", parent_version=None, images=images)
    assert not list(tmp_path.glob("manifest*.json"))


def test_a_decoder_that_drops_a_box_publishes_nothing(trained_detector: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A box one side drops for no reason its outputs show (a decoder fault, not rounding) fails the export."""
    ckpt = load_checkpoint(trained_detector / "checkpoint.pt")
    model = rebuild_detector(ckpt["meta"], ckpt["model"])
    real = det_export.device_decode
    calls: list[int] = []

    def lossy(boxes: np.ndarray, scores: np.ndarray, spec: DetectorSpec) -> Detections:
        out = real(boxes, scores, spec)
        calls.append(1)
        if len(calls) == 1:  # the ONNX side, decoded first: its last box of image 0 goes missing
            out.boxes[0], out.scores[0], out.classes[0] = out.boxes[0][:-1], out.scores[0][:-1], out.classes[0][:-1]
        return out

    monkeypatch.setattr(det_export, "device_decode", lossy)
    images = load_box_npz(trained_detector.parent / "scenes96.npz").test.images.images[:4]  # type: ignore[union-attr]
    with pytest.raises(ParityError, match=r"image 0: torch keeps a box \(anchor \d+, class \d+, score .*\) that "
                                          r"onnx drops, at no rounding boundary"):
        export_detector(model, tmp_path, meta=ckpt["meta"], version="bad", parent_version=None, images=images)
    assert not list(tmp_path.glob("manifest*.json"))


class _TieBreak(torch.nn.Module):
    """SSD's head with a fixed random offset on its class logits: an untrained SSDlite scores whole regions
    alike, and which of two equal boxes NMS keeps is up to the order of the tie on either side."""

    def __init__(self, head: torch.nn.Module, anchors: int, classes: int) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("offset", torch.randn(1, anchors, classes, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.head(x)
        return {**out, "cls_logits": out["cls_logits"] + 3 * self.offset}


def test_ssdlite_exports_the_dense_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_detector("ssdlite320_mobilenet_v3_large", num_classes=2, in_channels=3, image_size=(320, 320))
    model.eval()
    anchors = DenseDetector(model).num_anchors
    model.net.head = _TieBreak(model.net.head, anchors, 3)
    meta = {"input": input_spec((3, 320, 320), [0.5] * 3, [0.25] * 3).to_dict(), "class_names": ["a", "b"],
            "embedding_dim": embedding_dim(model)}
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 320, 320), dtype=np.uint8)
    res = export_detector(model, tmp_path, meta=meta, version="ssd-1", parent_version=None, images=images,
                          parity_threshold=1e-4)
    manifest = res.manifest
    assert res.parity_max_abs_diff <= 1e-4 and manifest.task == "detect" and manifest.detector is not None
    assert manifest.detector.pre_nms_top_k == 2 * anchors  # torchvision's per-class top-k, for both classes
    sess = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    boxes, scores, emb = sess.run(None, {"input": np.zeros((1, 3, 320, 320), np.float32)})
    assert boxes.shape == (1, anchors, 4) and scores.shape == (1, anchors, 2)
    assert emb.shape == (1, meta["embedding_dim"])
    assert np.all(scores.sum(axis=2) < 1)  # softmax over background + 2 classes, background left out


def test_a_two_stage_detector_does_not_export(tmp_path: Path) -> None:
    model = build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=2, in_channels=3,
                           image_size=(320, 320))
    with pytest.raises(InvalidInput, match="fasterrcnn_mobilenet_v3_large_320_fpn has no dense layout"):
        DenseDetector(model)
    with pytest.raises(InvalidInput, match="takes 3-channel images; received 1"):
        build_detector("ssdlite320_mobilenet_v3_large", num_classes=2, in_channels=1, image_size=(320, 320))
    with pytest.raises(InvalidInput, match="unknown detector 'yolo'; choose one of"):
        build_detector("yolo", num_classes=2, in_channels=1, image_size=(64, 64))


def _strips(offsets: list[float], scores: list[float], width: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Dense outputs of one image: one box per anchor, ``width`` wide and 0.1 high, starting at each offset."""
    boxes = np.array([[[x, 0.1, x + width, 0.2] for x in offsets]], np.float32)
    return boxes, np.array(scores, np.float32).reshape(1, -1, 1)


def test_boxes_that_nms_decides_on_rounding_are_no_parity_failure() -> None:
    """An undertrained detector scores many overlapping anchors; when two of them overlap by nms_iou to within
    rounding, which one NMS keeps, and so which boxes after them survive, is decided by the last bits of the
    outputs (CI saw 91 detections vs 90). The real decoder on two outputs 1e-5 apart: the same anchors but for
    the ones NMS took on rounding."""
    spec = DetectorSpec()
    w = 0.2
    q = w / 3  # a box offset by w / 3 overlaps the first by exactly IoU 0.5
    scores = [0.9, 0.8, 0.7, 0.6]
    left = _strips([0.0, q - 1e-5, q + 0.04, q + 0.08], scores)  # Q overlaps P by > 0.5: gone; R and S follow
    right = _strips([0.0, q + 1e-5, q + 0.04, q + 0.08], scores)  # Q overlaps P by < 0.5: kept, R goes, S stays
    assert [len(s) for s in device_decode(*left, spec).scores] == [2]
    assert [len(s) for s in device_decode(*right, spec).scores] == [3]
    assert compare_dense(left, right, spec, atol=1e-4) is None
    assert compare_dense(right, left, spec, atol=1e-4) is None
    assert compare_dense(left, right, spec, atol=1e-6) == "image 0: boxes differ by up to 2e-05"
    wrong = (right[0], right[1][:, [0, 1, 3, 2]])  # R and S swap scores: not rounding
    assert compare_dense(left, wrong, spec, atol=1e-4) == "image 0: scores differ by up to 0.1"


def test_a_detection_at_the_score_threshold_is_no_parity_failure() -> None:
    """A box scoring within rounding of the decoder's threshold is kept on one side and dropped on the other
    (seen on a fine-tuned fcos_tiny: 40 detections vs 41); anything further from it is a difference."""
    spec = DetectorSpec()
    a = _strips([0.1, 0.5], [0.9, 0.0500004])
    b = _strips([0.1, 0.5], [0.9, 0.0499996])
    assert [len(s) for s in device_decode(*a, spec).scores] == [2]
    assert [len(s) for s in device_decode(*b, spec).scores] == [1]
    assert compare_dense(a, b, spec, atol=1e-4) is None
    assert compare_dense(a, b, spec, atol=1e-7) == "image 0: scores differ by up to 8.01e-07"
    two = np.zeros((1, 2, 2), np.float32)
    two[0, :, 0] = [0.9, 0.2]
    classes, flipped = (a[0], two), (a[0], two[..., ::-1].copy())
    assert compare_dense(classes, flipped, spec, atol=1e-4) == "image 0: anchor 0 is class 0 vs 1"


def test_a_score_at_the_top_k_or_the_cap_is_no_parity_failure() -> None:
    """The pre-NMS top-k and the cap on boxes each cut at a score: a box scoring within rounding of the cut is
    kept on one side only."""
    apart = [0.0, 0.3, 0.6, 0.75]  # no two overlap by more than 0.14
    a = _strips(apart, [0.9, 0.8, 0.7, 0.7000001])
    b = _strips(apart, [0.9, 0.8, 0.7000001, 0.7])
    for spec in (DetectorSpec(pre_nms_top_k=3), DetectorSpec(max_detections=3)):
        kept = [device_decode(*side, spec).scores[0].tolist() for side in (a, b)]
        assert len(kept[0]) == len(kept[1]) == 3
        assert compare_dense(a, b, spec, atol=1e-4) is None
        assert compare_dense(a, b, spec, atol=1e-8) == "image 0: scores differ by up to 1.19e-07"
    far = _strips(apart, [0.9, 0.8, 0.7, 0.6])  # S well under the cut: dropping it is no rounding
    assert compare_dense(a, far, DetectorSpec(pre_nms_top_k=3), atol=1e-4) == "image 0: scores differ by up to 0.1"


def test_an_untrained_detector_within_rounding_of_itself_is_no_parity_failure() -> None:
    """The check that failed CI, on a detector's real outputs: a random-weight fcos_tiny (~100 boxes an image,
    many overlapping and scored alike) against its own outputs plus noise of 1e-6, as onnxruntime's rounding
    would add. The comparison before this one failed every such draw; this one must pass every draw, and still
    refuse noise of 1e-2."""
    from training.detect.dense import detector_spec

    torch.manual_seed(0)
    detector = build_detector("fcos_tiny", num_classes=10, in_channels=1, image_size=(96, 96)).eval()
    dense = DenseDetector(detector).eval()
    spec = detector_spec(detector)
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        boxes, scores, _ = dense(torch.from_numpy(rng.normal(size=(32, 1, 96, 96)).astype(np.float32)))
    b, s = boxes.numpy(), scores.numpy()
    assert np.mean([len(x) for x in device_decode(b, s, spec).scores]) > 50

    def noisy(scale: float) -> tuple[np.ndarray, np.ndarray]:
        return (b + rng.normal(scale=scale, size=b.shape).astype(np.float32),
                np.clip(s + rng.normal(scale=scale, size=s.shape).astype(np.float32), 0, 1))

    for _ in range(10):
        assert compare_dense(noisy(1e-6), (b, s), spec, atol=1e-3) is None
    assert compare_dense(noisy(1e-2), (b, s), spec, atol=1e-3) is not None
