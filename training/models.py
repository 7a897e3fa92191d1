"""Model builders looked up by name; every model returns ``(logits, embedding)``.

``smallcnn`` is a fast CNN for tiny images (8x8 to ~64x64); ``mobilenet_v3_small`` and ``resnet18``
are the torchvision architectures with their stems adapted to small inputs and any channel count.
Weights start random (no downloads); warm starts come from Flywheel's own checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fleet.errors import InvalidInput

log = logging.getLogger(__name__)


class Classifier(nn.Module):
    """``body`` maps images to the embedding (penultimate features); ``head`` maps it to logits."""

    def __init__(self, body: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.embedding_dim = head.in_features
        self.num_classes = head.out_features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.body(x)
        return self.head(embedding), embedding


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def build_smallcnn(*, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int = 32) -> Classifier:
    """conv-bn-relu blocks widening w -> 2w -> 4w, pooling while the map is at least 8 px (16 px for the first).

    Images of 16 px and more get one more 4w block at the last resolution (28x28 -> 7x7 x 4w), so the
    pooled embedding sees the whole object. Embedding: 4w-d after global average pooling.
    """
    size = min(image_size)
    w = width
    layers: list[nn.Module] = [_conv_bn(in_channels, w), _conv_bn(w, 2 * w)]
    if size >= 16:
        layers.append(nn.MaxPool2d(2))
        size //= 2
    layers.append(_conv_bn(2 * w, 4 * w))
    if size >= 8:
        layers.append(nn.MaxPool2d(2))
        size //= 2
    if min(image_size) >= 16:
        layers.append(_conv_bn(4 * w, 4 * w))
        if size >= 8:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return Classifier(nn.Sequential(*layers), nn.Linear(4 * w, num_classes))


def build_resnet18(*, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int = 64) -> Classifier:
    """torchvision resnet18; below 64 px the 7x7/2 stem and max-pool become a 3x3/1 conv (CIFAR-style)."""
    from torchvision.models import resnet18

    if width != 64:
        raise InvalidInput(f"resnet18 has a fixed width of 64; received --width {width}")
    m = resnet18(weights=None)
    if min(image_size) < 64:
        m.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
    elif in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    m.fc = nn.Identity()
    return Classifier(m, nn.Linear(512, num_classes))


def build_mobilenet_v3_small(
    *, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int = 16
) -> Classifier:
    """torchvision mobilenet_v3_small; below 64 px the stem's stride is 1; embedding = 1024-d pre-logits."""
    from torchvision.models import mobilenet_v3_small

    if width != 16:
        raise InvalidInput(f"mobilenet_v3_small has a fixed stem width of 16; received --width {width}")
    m = mobilenet_v3_small(weights=None)
    stem = m.features[0][0]
    assert isinstance(stem, nn.Conv2d)
    stride = 1 if min(image_size) < 64 else 2
    m.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=stride, padding=1, bias=False)
    last = m.classifier[-1]
    assert isinstance(last, nn.Linear)
    m.classifier[-1] = nn.Identity()
    return Classifier(m, nn.Linear(last.in_features, num_classes))


MODELS: dict[str, tuple[Callable[..., Classifier], int]] = {
    "smallcnn": (build_smallcnn, 32),
    "mobilenet_v3_small": (build_mobilenet_v3_small, 16),
    "resnet18": (build_resnet18, 64),
}


def default_width(name: str) -> int:
    _check_name(name)
    return MODELS[name][1]


def build_model(
    name: str, *, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int | None = None
) -> Classifier:
    """Build a registered model; an unknown name lists the valid ones."""
    _check_name(name)
    if num_classes < 2:
        raise InvalidInput(f"a classifier needs at least 2 classes; received {num_classes}")
    if in_channels not in (1, 3):
        raise InvalidInput(f"input channels must be 1 or 3; received {in_channels}")
    builder, w = MODELS[name]
    return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size, width=width or w)


def load_warm_start(model: nn.Module, state: dict[str, Any], *,
                    grows: Callable[[str], bool] = lambda key: key.startswith("head.")) -> dict[str, Any]:
    """Copy a checkpoint's weights into ``model``; a class layer (``grows(key)``) with more classes keeps the old
    rows, the new ones keep their initialisation.

    Returns what happened: ``{"loaded": n, "grown_head": bool}``. Every other shape must match.
    """
    own = model.state_dict()
    grown = False
    for key, value in state.items():
        if key not in own:
            raise InvalidInput(f"warm-start checkpoint has weight {key!r} that this model does not; same --model?")
        target = own[key]
        if value.shape == target.shape:
            target.copy_(value)
        elif grows(key) and value.shape[1:] == target.shape[1:] and value.shape[0] < target.shape[0]:
            target[: value.shape[0]].copy_(value)
            grown = True
        else:
            raise InvalidInput(
                f"warm-start weight {key!r} has shape {tuple(value.shape)}; this model expects {tuple(target.shape)}"
            )
    missing = sorted(set(own) - set(state))
    if missing:
        raise InvalidInput(f"warm-start checkpoint lacks weights {missing[:5]}; was it made with the same --model?")
    if grown:
        log.info("warm start: the class layer grew to %d classes", getattr(model, "num_classes", -1))
    return {"loaded": len(state), "grown_head": grown}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise InvalidInput(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
