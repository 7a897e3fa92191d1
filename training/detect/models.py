"""Detector builders looked up by name, all torchvision detectors behind one wrapper (:class:`Detector`).

* ``fcos_tiny``: torchvision's FCOS (anchor-free head, sigmoid focal loss, GIoU box loss, centerness) on a small
  conv backbone with a torchvision FPN over strides 8, 16 and 32, about 0.4M parameters at width 16; fast
  enough to learn 128x128 scenes on a CPU in minutes. Any input size divisible by 32.
* ``ssdlite320_mobilenet_v3_large``: torchvision's SSDlite (320x320, 3 channels), for real data on a GPU.
* ``fasterrcnn_mobilenet_v3_large_320_fpn``: torchvision's two-stage Faster R-CNN (3 channels, 320 px short side),
  for real data on a GPU. Its region proposals pass through NMS inside the network, which the fleet's dense
  layout rules out, so it trains and is gated but does not export (:data:`DENSE_MODELS`).

Weights start random (``weights=None, weights_backbone=None``: nothing is ever downloaded); a run may start from
a Flywheel checkpoint (``--warm-start``) or from a torchvision state dict the user gives (``--init-weights``).
Inputs reach the network already normalised by the manifest's mean/std and at the manifest's size, so the
torchvision transform inside is the identity (mean 0, std 1, no resize): what the device feeds the ONNX graph is
exactly what the network saw in training.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleet.errors import InvalidInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Postprocess:
    """torchvision's post-processing settings of a detector; the manifest's DetectorSpec carries the same values."""

    score_thresh: float = 0.05
    nms_thresh: float = 0.6
    detections_per_img: int = 100
    topk_candidates: int = 1000


class Detector(nn.Module):
    """A torchvision detector taking normalised batches ``(n, c, h, w)`` at its fixed input size.

    ``forward(x, targets)`` in training mode returns the loss dict; in eval mode, one dict per image with
    ``boxes`` (m, 4) pixel xyxy, ``scores`` (m,) and ``labels`` (m,) class indices from 0 (torchvision's own
    post-processing). ``label_offset`` is 1 for detectors with a background class (SSD, Faster R-CNN).
    ``topk_groups``: how many groups torchvision's ``topk_candidates`` applies to separately (FCOS: per pyramid
    level; SSD: per class), so that ``topk_candidates * topk_groups`` bounds the candidates it keeps in all.
    """

    def __init__(self, net: nn.Module, *, name: str, num_classes: int, image_size: tuple[int, int],
                 label_offset: int, post: Postprocess, topk_groups: int = 1) -> None:
        super().__init__()
        self.net = net
        self.name = name
        self.num_classes = num_classes
        self.image_size = image_size
        self.label_offset = label_offset
        self.post = post
        self.topk_groups = topk_groups

    def forward(self, x: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> Any:
        images = list(x)
        if self.training:
            if targets is None:
                raise InvalidInput("a detector in training mode needs targets")
            shifted = [{"boxes": t["boxes"], "labels": t["labels"] + self.label_offset} for t in targets]
            return self.net(images, shifted)
        out = self.net(images)
        return [{**d, "labels": d["labels"] - self.label_offset} for d in out]

    def backbone_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps the head sees (after the FPN, where there is one), coarsest last."""
        feats = self.net.backbone(x)
        return list(feats.values()) if isinstance(feats, dict) else [feats]


class TinyBackbone(nn.Module):
    """Five stride-2 conv-bn-relu stages (w, 2w, 4w, 6w, 8w channels) and a torchvision FPN over the last three
    (strides 8, 16, 32), each level ``out_channels`` wide."""

    def __init__(self, in_channels: int, width: int = 16, out_channels: int = 64) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork

        w = width
        self.stem = nn.Sequential(_conv_bn(in_channels, w, 2), _conv_bn(w, w, 1), _conv_bn(w, 2 * w, 2))
        self.c3 = _conv_bn(2 * w, 4 * w, 2)
        self.c4 = _conv_bn(4 * w, 6 * w, 2)
        self.c5 = _conv_bn(6 * w, 8 * w, 2)
        self.fpn = FeaturePyramidNetwork([4 * w, 6 * w, 8 * w], out_channels)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c3 = self.c3(self.stem(x))
        c4 = self.c4(c3)
        c5 = self.c5(c4)
        out: OrderedDict[str, torch.Tensor] = self.fpn(OrderedDict([("p3", c3), ("p4", c4), ("p5", c5)]))
        return out


def build_fcos_tiny(*, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int = 16,
                    post: Postprocess | None = None) -> Detector:
    """FCOS with :class:`TinyBackbone`; anchors (one per location) of size 8, 16, 32 = the levels' strides."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSHead

    if image_size[0] % 32 or image_size[1] % 32:
        raise InvalidInput(f"fcos_tiny needs an input size divisible by 32; received {image_size} (use --image-size)")
    # top-k per level that never binds (all of the finest level's pairs), so that the device's global top-k
    # over the same pairs (training.detect.export) keeps what torchvision keeps
    post = post or Postprocess(topk_candidates=(image_size[0] // 8) * (image_size[1] // 8) * num_classes)
    backbone = TinyBackbone(in_channels, width)
    anchors = AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3)
    head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=2)
    net = FCOS(backbone, num_classes, anchor_generator=anchors, head=head, **_fixed_transform(image_size, in_channels),
               score_thresh=post.score_thresh, nms_thresh=post.nms_thresh,
               detections_per_img=post.detections_per_img, topk_candidates=post.topk_candidates)
    return Detector(net, name="fcos_tiny", num_classes=num_classes, image_size=image_size, label_offset=0, post=post,
                    topk_groups=3)


def build_ssdlite(*, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int = 0,
                  post: Postprocess | None = None) -> Detector:
    """torchvision's ssdlite320_mobilenet_v3_large, random weights, ``num_classes`` + background."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    _needs(in_channels, image_size, "ssdlite320_mobilenet_v3_large", exact=True)
    post = post or Postprocess(score_thresh=0.05, nms_thresh=0.55, detections_per_img=100, topk_candidates=3234)
    net = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes + 1,
                                        score_thresh=post.score_thresh, nms_thresh=post.nms_thresh,
                                        detections_per_img=post.detections_per_img,
                                        topk_candidates=post.topk_candidates)
    from torchvision.models.detection.transform import GeneralizedRCNNTransform

    net.transform = GeneralizedRCNNTransform(**_fixed_transform(image_size, in_channels), size_divisible=1,
                                             fixed_size=image_size)
    return Detector(net, name="ssdlite320_mobilenet_v3_large", num_classes=num_classes, image_size=image_size,
                    label_offset=1, post=post, topk_groups=num_classes)


def build_fasterrcnn(*, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int = 0,
                     post: Postprocess | None = None) -> Detector:
    """torchvision's fasterrcnn_mobilenet_v3_large_320_fpn, random weights, ``num_classes`` + background."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

    _needs(in_channels, image_size, "fasterrcnn_mobilenet_v3_large_320_fpn", exact=False)
    post = post or Postprocess(score_thresh=0.05, nms_thresh=0.5, detections_per_img=100, topk_candidates=1000)
    net = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes + 1, box_score_thresh=post.score_thresh,
        box_nms_thresh=post.nms_thresh, box_detections_per_img=post.detections_per_img,
        **_fixed_transform(image_size, in_channels),
    )
    return Detector(net, name="fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=num_classes,
                    image_size=image_size, label_offset=1, post=post)


Builder = Callable[..., Detector]
# name -> (builder, default width, default input size (None: the data's))
MODELS: dict[str, tuple[Builder, int, tuple[int, int] | None]] = {
    "fcos_tiny": (build_fcos_tiny, 16, None),
    "ssdlite320_mobilenet_v3_large": (build_ssdlite, 0, (320, 320)),
    "fasterrcnn_mobilenet_v3_large_320_fpn": (build_fasterrcnn, 0, (320, 320)),
}
DENSE_MODELS = ("fcos_tiny", "ssdlite320_mobilenet_v3_large")
THREE_CHANNEL_MODELS = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")


def check_name(name: str) -> None:
    if name not in MODELS:
        raise InvalidInput(f"unknown detector {name!r}; choose one of {sorted(MODELS)}")


def default_width(name: str) -> int:
    check_name(name)
    return MODELS[name][1]


def default_size(name: str) -> tuple[int, int] | None:
    check_name(name)
    return MODELS[name][2]


def build_detector(name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int],
                   width: int | None = None, post: Postprocess | None = None) -> Detector:
    """Build a registered detector; an unknown name lists the valid ones."""
    check_name(name)
    if num_classes < 1:
        raise InvalidInput(f"a detector needs at least 1 class; received {num_classes}")
    if in_channels not in (1, 3):
        raise InvalidInput(f"input channels must be 1 or 3; received {in_channels}")
    builder, w, _ = MODELS[name]
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=tuple(image_size),
                   width=width or w, post=post)


def load_init_weights(model: Detector, path: Path | str) -> dict[str, Any]:
    """Copy a torchvision state dict (a ``.pth`` of the same architecture, e.g. COCO weights the user fetched) into
    ``model``: every tensor whose name and shape match; the class layers of another class count are left random.

    Refused when under half of the model's tensors match (a different architecture). Returns what was loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"--init-weights {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a foreign or truncated file: say so
        raise InvalidInput(f"--init-weights {path} is not a torch state dict ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint with the state dict inside
    if not isinstance(state, dict):
        raise InvalidInput(f"--init-weights {path} holds a {type(state).__name__}, not a state dict")
    own = model.net.state_dict()
    prefix = "net." if any(k.startswith("net.") for k in state) else ""
    loaded, skipped = 0, []
    for key, target in own.items():
        value = state.get(prefix + key)
        if isinstance(value, torch.Tensor) and value.shape == target.shape:
            target.copy_(value)
            loaded += 1
        elif value is not None:
            skipped.append(f"{key} {tuple(value.shape)} vs {tuple(target.shape)}")
    if loaded < len(own) / 2:
        raise InvalidInput(f"--init-weights {path} matches only {loaded} of the {len(own)} tensors of {model.name}; "
                           f"is it a {model.name} state dict? e.g. {skipped[:3]}")
    log.info("init weights: %d of %d tensors from %s; %d of another shape left random", loaded, len(own), path,
             len(skipped))
    return {"path": str(path), "loaded": loaded, "total": len(own), "skipped": skipped}


def _fixed_transform(image_size: tuple[int, int], channels: int) -> dict[str, Any]:
    """torchvision transform settings that leave an input of ``image_size`` untouched (no resize, no normalising)."""
    h, w = image_size
    return {"min_size": min(h, w), "max_size": max(h, w), "image_mean": [0.0] * channels, "image_std": [1.0] * channels}


def _needs(in_channels: int, image_size: tuple[int, int], name: str, *, exact: bool) -> None:
    if in_channels != 3:
        raise InvalidInput(f"{name} takes 3-channel images; received {in_channels} channel(s) (use --channels 3)")
    if exact and tuple(image_size) != (320, 320):
        raise InvalidInput(f"{name} takes 320x320 images; received {image_size} (leave --image-size unset)")


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))
