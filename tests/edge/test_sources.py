from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fleet.edge.sources import (
    Frame,
    ImageFolderSource,
    NpzSource,
    ReplaySource,
    encode_png,
    open_source,
    read_image,
)
from fleet.errors import InvalidInput


def test_npz_source_yields_frames_with_human_and_tags(tmp_path: Path) -> None:
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    np.savez(tmp_path / "f.npz", images=images, human=np.array([1, -1, 2]),
             tag_condition=np.array(["day", "night", "fog"]), ts=np.array([1.0, 2.0, 3.0]))
    frames = list(NpzSource(tmp_path / "f.npz"))
    assert [f.human_action for f in frames] == [1, None, 2]
    assert [f.tags for f in frames] == [{"condition": "day"}, {"condition": "night"}, {"condition": "fog"}]
    assert [f.ts for f in frames] == [1.0, 2.0, 3.0]
    assert np.array_equal(frames[1].image, images[1])
    assert frames[0].frame_id == "f.npz:0"


def test_npz_source_loops_and_refuses_bad_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "ok.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    src = iter(NpzSource(tmp_path / "ok.npz", loop=True))
    assert len([next(src) for _ in range(5)]) == 5
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(InvalidInput, match="'images' must be uint8"):
        NpzSource(tmp_path / "float.npz")
    np.savez(tmp_path / "nokey.npz", x=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(InvalidInput, match=r"must hold an 'images' array; found \['x'\]"):
        NpzSource(tmp_path / "nokey.npz")
    np.savez(tmp_path / "human.npz", images=np.zeros((2, 4, 4), np.uint8), human=np.zeros(3, np.int64))
    with pytest.raises(InvalidInput, match="'human' must be"):
        NpzSource(tmp_path / "human.npz")


def test_image_folder_reads_gray_rgb_rgba_in_name_order(tmp_path: Path) -> None:
    Image.fromarray(np.full((6, 7), 9, np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.full((5, 5, 3), 200, np.uint8)).save(tmp_path / "a.jpg")
    Image.fromarray(np.full((4, 4, 4), 50, np.uint8)).save(tmp_path / "c.png")
    (tmp_path / "notes.txt").write_text("ignored")
    frames = list(ImageFolderSource(tmp_path))
    assert [f.frame_id for f in frames] == ["a.jpg", "b.png", "c.png"]
    assert frames[0].image.shape == (5, 5, 3)
    assert frames[1].image.shape == (6, 7) and frames[1].image[0, 0] == 9
    assert frames[2].image.shape == (4, 4, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="holds no"):
        ImageFolderSource(tmp_path / "empty")
    with pytest.raises(InvalidInput, match="does not exist"):
        ImageFolderSource(tmp_path / "nowhere")


def test_replay_stream(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8), i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    lines = [
        {"image": "img/0.png", "human_action": 1, "tags": {"weather": "rain"}, "ts": 10.5},
        {"image": "img/1.png"},
        {"image": "img/2.png", "human_action": None, "tags": {"n": 3}},
    ]
    (tmp_path / "replay.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    frames = list(open_source("replay", tmp_path / "replay.jsonl"))
    assert [f.human_action for f in frames] == [1, None, None]
    assert frames[0].tags == {"weather": "rain"} and frames[0].ts == 10.5
    assert frames[2].tags == {"n": "3"}
    assert frames[2].image[0, 0] == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "replay.jsonl:1: not valid JSON"),
        ('{"image": "img/0.png", "human_action": -2}', "'human_action' must be an integer >= 0 or null; received -2"),
        ('{"image": "img/0.png", "label": 1}', "unknown key(s) ['label']"),
        ('{"image": 3}', "'image' must be a relative path string; received 3"),
        ('{"image": "missing.png"}', "does not exist"),
        ('{"image": "img/0.png", "tags": [1]}', "'tags' must be an object"),
    ],
)
def test_replay_refuses_bad_lines_with_line_numbers(tmp_path: Path, line: str, message: str) -> None:
    (tmp_path / "img").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "img" / "0.png")
    (tmp_path / "replay.jsonl").write_text(line + "\n")
    with pytest.raises(InvalidInput) as err:
        list(ReplaySource(tmp_path / "replay.jsonl"))
    assert message in str(err.value)


def test_png_round_trip_and_undecodable_file(tmp_path: Path) -> None:
    img = np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8)
    (tmp_path / "x.png").write_bytes(encode_png(img))
    assert np.array_equal(read_image(tmp_path / "x.png"), img)
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(InvalidInput, match="cannot be decoded"):
        read_image(tmp_path / "bad.png")


def test_frame_is_a_plain_dataclass() -> None:
    f = Frame(image=np.zeros((2, 2), np.uint8), frame_id="x")
    assert f.human_action is None and f.tags == {} and f.ts is None


def test_npz_source_resumes_at_its_cursor(tmp_path: Path) -> None:
    from fleet.edge.sources import SourceCursor

    path = tmp_path / "f.npz"
    np.savez(path, images=np.zeros((6, 4, 4), np.uint8))
    cursor = SourceCursor(tmp_path / "cursor.json", path)
    assert cursor.load() == 0
    cursor.save(4)
    assert SourceCursor(tmp_path / "cursor.json", path).load() == 4
    src = NpzSource(path, start=4)
    assert [f.position for f in src] == [4, 5]
    assert [f.position for f in itertools.islice(iter(NpzSource(path, loop=True, start=5)), 3)] == [5, 0, 1]
    with pytest.raises(InvalidInput, match=r"start must be a frame index in 0..6; received 7"):
        NpzSource(path, start=7)
    (tmp_path / "cursor.json").write_text("{garbage")
    assert SourceCursor(tmp_path / "cursor.json", path).load() == 0
    cursor.save(4)
    np.savez(path, images=np.ones((6, 4, 4), np.uint8))  # another file at the same path
    assert SourceCursor(tmp_path / "cursor.json", path).load() == 0
