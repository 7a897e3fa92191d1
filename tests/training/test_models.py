"""Model builders and augmentation presets: shapes, names, warm starts."""

from __future__ import annotations

import pytest
import torch

from fleet.errors import InvalidInput
from training import augment as aug
from training.models import MODELS, build_model, load_warm_start


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(("channels", "size"), [(1, (8, 8)), (3, (32, 24))])
def test_every_model_returns_logits_and_embedding(name: str, channels: int, size: tuple[int, int]) -> None:
    m = build_model(name, num_classes=7, in_channels=channels, image_size=size).eval()
    logits, emb = m(torch.zeros(2, channels, *size))
    assert logits.shape == (2, 7)
    assert emb.shape == (2, m.embedding_dim)


def test_unknown_model_lists_the_valid_ones() -> None:
    valid = r"\['mobilenet_v3_small', 'resnet18', 'smallcnn'\]"
    with pytest.raises(InvalidInput, match=f"unknown model 'vgg'; choose one of {valid}"):
        build_model("vgg", num_classes=3, in_channels=1, image_size=(8, 8))


def test_warm_start_grows_the_head_for_a_new_class() -> None:
    old = build_model("smallcnn", num_classes=3, in_channels=1, image_size=(8, 8), width=8)
    new = build_model("smallcnn", num_classes=4, in_channels=1, image_size=(8, 8), width=8)
    info = load_warm_start(new, old.state_dict())
    assert info["grown_head"]
    assert torch.equal(new.head.weight[:3], old.head.weight)
    other = build_model("smallcnn", num_classes=3, in_channels=1, image_size=(8, 8), width=16)
    with pytest.raises(InvalidInput, match="has shape"):
        load_warm_start(other, old.state_dict())


@pytest.mark.parametrize("preset", sorted(aug.PRESETS))
def test_presets_keep_shape_range_and_are_seeded(preset: str) -> None:
    x = torch.rand(16, 3, 12, 12)
    ops = aug.get_preset(preset)
    a = aug.apply(x, ops, torch.Generator().manual_seed(3))
    b = aug.apply(x, ops, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_shift_moves_pixels_within_bounds() -> None:
    x = torch.zeros(64, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    out = aug.shift(x, torch.Generator().manual_seed(0))
    assert torch.all(out.sum(dim=(1, 2, 3)) == 4)  # a 1-pixel shift keeps the centred square whole
    assert not torch.equal(out, x)


def test_unknown_preset_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidInput, match="choose one of"):
        aug.get_preset("wild")
