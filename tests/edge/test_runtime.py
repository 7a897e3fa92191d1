from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fleet.inference.runtime import ModelError, ModelRuntime, Preprocessor, health_check, synthetic_frames
from fleet.protocol import InputSpec
from tests.support.models import make_model_files


def spec(**kw: object) -> InputSpec:
    base: dict[str, object] = dict(height=8, width=8, channels=1, mean=[0.5], std=[0.25])
    base.update(kw)
    return InputSpec(**base)  # type: ignore[arg-type]


def test_normalisation_and_layouts() -> None:
    img = np.full((8, 8), 128, np.uint8)
    out = Preprocessor(spec())([img, img])
    assert out.shape == (2, 1, 8, 8) and out.dtype == np.float32
    assert np.allclose(out, (128 / 255 - 0.5) / 0.25, atol=1e-6)
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 1] = 255
    s3 = spec(channels=3, mean=[0.0, 0.5, 1.0], std=[1.0, 0.5, 2.0], layout="NHWC")
    out = Preprocessor(s3)([rgb])
    assert out.shape == (1, 8, 8, 3)
    assert np.allclose(out[0, 0, 0], [0.0, 1.0, -0.5])


@pytest.mark.parametrize(("shape", "kw"), [
    ((5, 8, 8), {}),  # gray frames for a 1-channel model
    ((5, 8, 8, 3), {"channels": 3, "mean": [0.0, 0.5, 1.0], "std": [1.0, 0.5, 2.0]}),
    ((5, 8, 8, 3), {"channels": 3, "mean": [0.1] * 3, "std": [0.3] * 3, "layout": "NHWC"}),
    ((5, 8, 8, 4), {"channels": 3, "mean": [0.1] * 3, "std": [0.3] * 3}),  # RGBA: the per-frame path
    ((5, 6, 10), {}),  # another size: resized frame by frame
])
def test_frames_stacked_in_one_array_give_the_tensor_of_the_frames_one_by_one(shape: tuple[int, ...],
                                                                            kw: dict[str, object]) -> None:
    stacked = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    pre = Preprocessor(spec(**kw))
    one_by_one = np.concatenate([pre([img]) for img in stacked])
    assert np.array_equal(pre(stacked), one_by_one) and pre(stacked).flags["C_CONTIGUOUS"]


def test_any_size_and_channel_count_reaches_the_spec() -> None:
    pre = Preprocessor(spec(height=6, width=10, channels=3, mean=[0.5] * 3, std=[0.25] * 3))
    frames = [np.zeros((3, 4), np.uint8), np.zeros((31, 17, 3), np.uint8), np.zeros((5, 5, 4), np.uint8),
              np.zeros((7, 7, 1), np.uint8)[..., 0]]
    assert pre(frames).shape == (4, 3, 6, 10)
    gray = Preprocessor(spec())
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 100
    rgb[..., 1] = 200
    out = gray([rgb])
    assert np.allclose(out, ((0.299 * 100 + 0.587 * 200) / 255 - 0.5) / 0.25, atol=1e-5)


def test_gray_to_rgb_repeats_the_channel() -> None:
    pre = Preprocessor(spec(channels=3, mean=[0.0] * 3, std=[1.0] * 3, scale=1.0))
    img = np.arange(64, dtype=np.uint8).reshape(8, 8)
    out = pre([img])[0]
    for c in range(3):
        assert np.array_equal(out[c], img.astype(np.float32))


def test_bilinear_upsampling_matches_pillow() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    pre = Preprocessor(spec(height=13, width=11, mean=[0.0], std=[1.0], scale=1.0))
    ours = pre([img])[0, 0]
    pil = np.asarray(Image.fromarray(img).resize((11, 13), Image.BILINEAR), np.float32)
    assert np.abs(ours - pil).max() <= 1.0


def test_nearest_downsampling_picks_pixels() -> None:
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)
    pre = Preprocessor(spec(height=2, width=2, mean=[0.0], std=[1.0], scale=1.0), interpolation="nearest")
    out = pre([img])[0, 0]
    assert set(out.ravel().tolist()) <= set(img.ravel().tolist())
    with pytest.raises(ModelError, match="unknown interpolation 'cubic'"):
        Preprocessor(spec(), interpolation="cubic")


def test_model_runtime_runs_with_the_configured_threads(tmp_path: Path) -> None:
    files = make_model_files(tmp_path, "v1", channels=3, height=12, width=10, num_classes=4, embedding_dim=6)
    rt = ModelRuntime(files.onnx_path, files.manifest, threads=1)
    assert rt.session.get_session_options().intra_op_num_threads == 1
    out = rt.run([np.zeros((40, 30), np.uint8), np.full((12, 10, 3), 255, np.uint8)])
    assert out.logits.shape == (2, 4) and out.embedding.shape == (2, 6)
    health_check(rt, synthetic_frames(files.manifest.input, 3))
    health_check(rt, [])  # synthetic frames when none are stored


@pytest.mark.parametrize(
    ("poison", "message"),
    [("nan", "logits holds 4 NaN"), ("shape", r"embedding shape \(2, \d+\), expected \(2, 16\)")],
)
def test_health_check_refuses_poisoned_models(tmp_path: Path, poison: str, message: str) -> None:
    files = make_model_files(tmp_path, "bad", poison=poison, num_classes=2 if poison == "nan" else 3)
    rt = ModelRuntime(files.onnx_path, files.manifest)
    with pytest.raises(ModelError, match=message):
        health_check(rt, synthetic_frames(files.manifest.input, 2))


def test_unloadable_and_mismatched_models_are_refused(tmp_path: Path) -> None:
    files = make_model_files(tmp_path, "v1")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="does not load in onnxruntime"):
        ModelRuntime(garbage, files.manifest)
    wrong = dataclasses.replace(files.manifest, input=spec(height=16, width=16))
    expected = r"does not match its manifest's input spec \(NCHW, expected \[n, 1, 16, 16\]\)"
    with pytest.raises(ModelError, match=expected):
        ModelRuntime(files.onnx_path, wrong)
