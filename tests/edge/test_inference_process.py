"""The models in a process of their own (fleet/edge/inference.py): the same outputs as in the agent's thread, in
order, across model swaps, and no frame lost when the process cannot load a model, is killed, or keeps dying."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fleet.edge.inference as inference
from fleet.edge.inference import Chunk, InferenceProcess, Raw, run_chunk
from fleet.edge.ota import LoadedModels
from fleet.edge.sources import Frame
from fleet.inference.runtime import ModelRuntime
from tests.edge.conftest import Keys, assign, publish
from tests.edge.test_agent import KEEP_ALL, frames, make_agent
from tests.support.detectors import draw_squares, make_detector_files
from tests.support.inproc import InProcHub
from tests.support.models import make_model_files


def runtime(tmp_path: Path, version: str, seed: int = 0) -> ModelRuntime:
    files = make_model_files(tmp_path, version, seed=seed)
    return ModelRuntime(files.onnx_path, files.manifest)


def same(a: list[Raw], b: list[Raw]) -> bool:
    def arrays(r: Raw) -> list[object]:
        return [r.embedding, r.logits, r.boxes, r.scores, r.challenger_logits, r.challenger_boxes,
                r.challenger_scores]

    return len(a) == len(b) and all(
        all((x is None and y is None) or (x is not None and y is not None and np.array_equal(x, y))
            for x, y in zip(arrays(ra), arrays(rb), strict=True))
        for ra, rb in zip(a, b, strict=True))


def collect(proc: InferenceProcess) -> list[tuple[Chunk, list[Raw]]]:
    out = []
    while proc.in_flight:
        out.extend(proc.done(wait=True))
    out.extend(proc.done(wait=False))
    return out


@pytest.fixture
def proc() -> InferenceProcess:
    p = InferenceProcess()
    p.start()
    yield p  # type: ignore[misc]
    p.close()


def test_the_process_gives_the_threads_outputs_in_order_across_a_model_swap(tmp_path: Path,
                                                                          proc: InferenceProcess) -> None:
    v1, v2 = runtime(tmp_path, "v1"), runtime(tmp_path, "v2", seed=3)
    m1, m12 = LoadedModels(v1, None), LoadedModels(v1, v2)  # then v2 runs beside v1 as the challenger
    stream = frames(23)
    chunks = [Chunk(stream[:7], m1, 3), Chunk(stream[7:8], m1, 3), Chunk(stream[8:23], m12, 4)]
    for c in chunks:
        proc.submit(c)
    got = collect(proc)
    assert [c for c, _ in got] == chunks  # in order, each with its own models
    for c, raws in got:
        assert [len(r.embedding) for r in raws] == [len(c.frames[i:i + c.batch_size])
                                                   for i in range(0, len(c.frames), c.batch_size)]
        assert same(raws, run_chunk([f.image for f in c.frames], c.batch_size, c.models.active, c.models.challenger))
    assert got[2][1][0].challenger_logits is not None and got[0][1][0].challenger_logits is None
    assert proc.inline_chunks == 0 and proc.restarts == 0


def test_a_detector_runs_in_the_process_with_dense_outputs(tmp_path: Path, proc: InferenceProcess) -> None:
    files = make_detector_files(tmp_path, "d1")
    det = ModelRuntime(files.onnx_path, files.manifest)
    scene = [Frame(image=draw_squares(32, 32, [(4, 8, 16, 20, (255, 0, 0))]), frame_id=str(i)) for i in range(5)]
    proc.submit(Chunk(scene, LoadedModels(det, det), 2))
    ((_, raws),) = collect(proc)
    assert raws[0].logits is None and raws[0].boxes is not None and raws[0].scores is not None
    assert raws[0].challenger_boxes is not None
    assert same(raws, run_chunk([f.image for f in scene], 2, det, det))


def test_a_model_the_process_cannot_load_runs_in_the_agent(tmp_path: Path, proc: InferenceProcess,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    v1 = runtime(tmp_path, "v1")
    v1.path.unlink()  # loaded here, gone from the disk before the process loads it
    stream = frames(6)
    with caplog.at_level(logging.WARNING):
        proc.submit(Chunk(stream, LoadedModels(v1, None), 2))
        ((chunk, raws),) = collect(proc)
    assert chunk.frames == stream and proc.inline_chunks == 1
    assert same(raws, run_chunk([f.image for f in stream], 2, v1, None))
    assert "could not load the models in the inference process" in caplog.text


def test_a_killed_process_loses_no_frames_and_is_started_again(tmp_path: Path, proc: InferenceProcess,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    v1 = runtime(tmp_path, "v1")
    models = LoadedModels(v1, None)
    stream = frames(40)
    first = proc._proc.pid
    proc.submit(Chunk(stream[:20], models, 1))
    proc.submit(Chunk(stream[20:30], models, 1))
    os.kill(first, signal.SIGKILL)
    with caplog.at_level(logging.ERROR):
        got = collect(proc)
    assert [f for c, _ in got for f in c.frames] == stream[:30]  # every frame back, once, in order
    for c, raws in got:
        assert same(raws, run_chunk([f.image for f in c.frames], 1, v1, None))
    assert proc.restarts == 1 and proc.alive and proc._proc.pid != first
    assert "inference process" in caplog.text and "run in the agent instead" in caplog.text
    proc.submit(Chunk(stream[30:], models, 1))  # the new process takes the next chunk
    ((c, raws),) = collect(proc)
    assert c.frames == stream[30:] and same(raws, run_chunk([f.image for f in c.frames], 1, v1, None))


def test_a_process_that_keeps_dying_leaves_the_agent_running_the_models(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "MAX_RESTARTS", 1)
    v1 = runtime(tmp_path, "v1")
    models = LoadedModels(v1, None)
    stream = frames(12)
    proc = InferenceProcess()
    proc.start()
    try:
        for i in range(3):
            if proc.alive:
                os.kill(proc._proc.pid, signal.SIGKILL)
                time.sleep(0.2)
            proc.submit(Chunk(stream[4 * i:4 * i + 4], models, 2))
            collect_all = collect(proc)
            assert [f for c, _ in collect_all for f in c.frames] == stream[4 * i:4 * i + 4]
        assert proc.restarts == 1 and not proc.alive and proc.inline_chunks == 3
    finally:
        proc.close()


@pytest.mark.parametrize("mode", ["process", "thread"])
def test_the_agent_uploads_the_same_cases_with_the_models_in_either_place(tmp_path: Path, hub: InProcHub,
                                                                         keys: Keys, make_model, mode: str) -> None:
    v1 = make_model("v1", seed=1)
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    agent = make_agent(tmp_path, hub, keys, frames(30), runtime={"batch_size": 4, "inference": mode})
    summary = agent.run()
    agent.close()
    assert summary.frames == 30 and summary.uploaded == 30 and summary.stopped_by == "source-ended"
    assert agent.inference is None  # the process is closed with the run
    stream = frames(30)
    logits = ModelRuntime(v1.onnx_path, v1.manifest).run([f.image for f in stream]).logits
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    cases = hub.cases().values()
    assert sorted(int(c.captured_at - 1_700_000_000.0) for c in cases) == list(range(30))  # each frame once
    for c in cases:
        i = int(c.captured_at - 1_700_000_000.0)
        assert c.prediction.label == int(np.argmax(probs[i]))
        assert np.allclose(c.prediction.probs or [], probs[i], atol=1e-6)
    beat = hub.heartbeats()[-1]
    assert beat.counters["frames_seen"] == 30 and beat.latency_p50_ms > 0


def test_large_frames_and_outputs_in_flight_both_ways_do_not_block_either_side(tmp_path: Path,
                                                                               proc: InferenceProcess) -> None:
    """Chunks of 32 frames of 256x256 (6 MiB a chunk) go out while the results of 4096 anchors a frame (3.7 MiB a
    chunk) come back: far beyond a pipe's buffer both ways, which blocks unless the child reads as it computes."""
    files = make_detector_files(tmp_path, "big", height=256, width=256)
    det = ModelRuntime(files.onnx_path, files.manifest)
    rng = np.random.default_rng(0)
    stream = [Frame(image=rng.integers(0, 256, (256, 256, 3), dtype=np.uint8), frame_id=str(i)) for i in range(96)]
    models = LoadedModels(det, None)
    got: list[tuple[Chunk, list[Raw]]] = []

    def run() -> None:
        for i in range(0, 96, 32):
            proc.submit(Chunk(stream[i:i + 32], models, 8))
        got.extend(collect(proc))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the agent and its inference process blocked each other"
    assert [f for c, _ in got for f in c.frames] == stream and proc.inline_chunks == 0
    assert same(got[1][1], run_chunk([f.image for f in stream[32:64]], 8, det, None))


def test_a_batch_the_challenger_fails_on_gets_nan_rows_and_the_others_keep_theirs(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch
                                                                                  ) -> None:
    v1, v2 = runtime(tmp_path, "v1"), runtime(tmp_path, "v2", seed=3)
    real, calls = v2.infer, []

    def flaky(tensor: np.ndarray, **kw: object) -> object:
        calls.append(len(tensor))
        if len(calls) == 2:
            raise RuntimeError("challenger fault")
        return real(tensor, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(v2, "infer", flaky)
    stream = frames(7)
    raws = run_chunk(np.stack([f.image for f in stream]), 3, v1, v2)
    assert [len(r.embedding) for r in raws] == [3, 3, 1]
    assert raws[1].challenger_logits is not None and np.isnan(raws[1].challenger_logits).all()
    for r in (raws[0], raws[2]):
        assert r.challenger_logits is not None and np.isfinite(r.challenger_logits).all()
    assert np.array_equal(raws[2].challenger_logits, real(v1.preprocess([stream[6].image])).logits)


def test_the_inference_process_ends_when_the_agent_is_killed(tmp_path: Path) -> None:
    """kill -9 of the agent leaves no orphan on the device: the child sees its pipe close and exits."""
    script = tmp_path / "agent.py"
    script.write_text(
        "import sys, time\n"
        "from fleet.edge.inference import InferenceProcess\n"
        "if __name__ == '__main__':\n"
        "    p = InferenceProcess()\n"
        "    p.start()\n"
        "    print(p._proc.pid, flush=True)\n"
        "    time.sleep(600)\n"
    )
    root = Path(__file__).resolve().parents[2]
    agent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(root)})
    try:
        assert agent.stdout is not None
        child = int(agent.stdout.readline())
        os.kill(child, 0)  # running
        agent.kill()
        agent.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.1)
        assert not _alive(child), f"inference process {child} outlived its agent"
    finally:
        agent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited (its parent, init, reaps it)
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("cores", "mode"), [({0}, "thread"), ({0, 1}, "process"), (set(range(8)), "process")])
def test_auto_runs_the_models_in_a_process_only_with_two_cores_or_more(
        tmp_path: Path, hub: InProcHub, keys: Keys, make_model, monkeypatch: pytest.MonkeyPatch,
        cores: set[int], mode: str) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cores)
    assert inference.resolve_mode("auto") == mode
    assert inference.resolve_mode("thread") == "thread" and inference.resolve_mode("process") == "process"
    v1 = make_model("v1", seed=1)
    publish(hub, v1)
    assign(hub, v1, campaigns=(KEEP_ALL,))
    agent = make_agent(tmp_path, hub, keys, frames(6))
    started: list[bool] = []
    real = agent._start_inference

    def spy() -> None:
        real()
        started.append(agent.inference is not None)

    monkeypatch.setattr(agent, "_start_inference", spy)
    summary = agent.run()
    agent.close()
    assert started == [mode == "process"] and summary.frames == 6 and summary.uploaded == 6
