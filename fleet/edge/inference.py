"""Running the models: in the agent's own thread, or in an inference process of its own.

The agent's back office (trigger decisions, PNG encoding, spooling, uploads, heartbeats) is Python that holds the
GIL. In one process, every millisecond of it is a millisecond the inference thread waits on return from
onnxruntime, so the agent's share of bare onnxruntime speed fell with the host's speed: measured on this project's
2-core host, a 0.27 ms classifier ran at 84% of bare in the agent (``benchmarks/bench_agent_detect.py``). With
``runtime.inference = "process"`` the models run in a child process that does nothing else: it
receives chunks of frames' pixels over a pipe, runs the active model and the challenger on them in batches of
``runtime.batch_size`` and sends back the raw outputs; the parent keeps each frame's metadata and does all the rest.
That pays on two cores or more; on one core the pipe is pure cost (the classifier agent at 75.5% of bare in a
process, 81.9% in the agent's thread, ``bench_agent.py --cores 1``), so ``"auto"``, the default, picks the process
only when the agent may use two cores or more (:func:`resolve_mode`).

The parent sends a chunk at once while fewer than :data:`LOW_WATER` frames are in flight (a slow camera's frame
goes out alone, without waiting for others), else when it holds :data:`MAX_CHUNK` frames, and waits for results
before it holds more than :data:`HIGH_WATER` frames (or :data:`HIGH_WATER_BYTES`) in flight: the child always has
work queued for the moments the parent's Python holds the GIL (a trigger window's decision, a few milliseconds),
and a fast model gets its frames in chunks of 32, stacked in one array (one pickle, one scaling pass), so the
pipe's cost per frame stays small: fed chunks of 32 with nothing else running, the child ran the 0.27 ms
classifier at 0.98 of bare onnxruntime. A thread in the child reads the pipe while the models run, so neither side
can block the other with a large message. Results come back in order.

The child is an accelerator, never a single point of failure: a chunk it cannot run (a model that does not load
there, an error) is run in the parent instead, with the error logged; if the child dies, the chunks in flight are
run in the parent and a new child is started, at most :data:`MAX_RESTARTS` times a run; after that the parent
runs every frame itself. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from fleet.inference.runtime import ModelRuntime

log = logging.getLogger(__name__)

LOW_WATER = 8  # frames in flight below which a chunk goes out at once, however small (the child is nearly idle)
MAX_CHUNK = 32  # ... otherwise frames wait for a chunk of this many
HIGH_WATER = 96  # frames in flight at most (the agent waits for results before sending more)
HIGH_WATER_BYTES = 16 * 1024 * 1024  # ... and bytes of pixels in flight at most
MAX_RESTARTS = 3  # new children started in one run before the parent runs every frame itself
START_TIMEOUT_S = 60.0  # for the child to import numpy and onnxruntime and say it is ready


def resolve_mode(mode: str) -> str:
    """``runtime.inference`` as run: ``"auto"`` is ``"process"`` when this process may use two cores or more."""
    if mode != "auto":
        return mode
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return "process" if cores >= 2 else "thread"


@dataclass
class Raw:
    """One batch's raw outputs: ``embedding (n, d)``; a classifier's ``logits (n, k)``, a detector's dense
    ``boxes (n, A, 4)`` and ``scores (n, A, k)`` (decoded later, over a whole trigger window); the challenger's
    the same way (None without a working challenger); ``latency_ms``: the active model per frame, preprocessing
    included."""

    embedding: NDArray[Any]
    logits: NDArray[Any] | None
    boxes: NDArray[Any] | None
    scores: NDArray[Any] | None
    challenger_logits: NDArray[Any] | None
    challenger_boxes: NDArray[Any] | None
    challenger_scores: NDArray[Any] | None
    latency_ms: float


_logged: set[str] = set()


def log_once(key: str, message: str) -> None:
    if key not in _logged:
        _logged.add(key)
        log.error(message)


def _run_challenger(challenger: ModelRuntime | None, active: ModelRuntime,
                    images: Sequence[NDArray[Any]] | NDArray[Any], tensor: NDArray[Any]) -> Any:
    if challenger is None:
        return None
    task, ch_task = active.manifest.task, challenger.manifest.task
    if ch_task != task:
        log_once(f"task-{challenger.version}", f"challenger {challenger.version} is a {ch_task!r} model beside a "
                 f"{task!r} active model; not run")
        return None
    try:
        same = challenger.preprocess.key() == active.preprocess.key()
        out = challenger.infer(tensor if same else challenger.preprocess(images), decode=False)
    except Exception as exc:  # the challenger may be broken; it must never stop the active model
        log.warning("challenger %s failed on a batch: %s", challenger.version, exc)
        return None
    k = len(active.manifest.class_names)
    ch_k = len(challenger.manifest.class_names)
    if out.logits is None:  # a detector: its outputs were checked against its own manifest as it ran
        if ch_k != k:
            log_once(f"shape-{challenger.version}", f"challenger {challenger.version} has another class list than "
                     f"the active model ({ch_k} vs {k}); not compared")
            return None
        return out
    if out.logits.shape != (len(images), k):
        log_once(f"shape-{challenger.version}", f"challenger {challenger.version} has another class list than "
                 f"the active model ({out.logits.shape[1]} vs {k}); not compared")
        return None
    return out


def run_chunk(images: Sequence[NDArray[Any]] | NDArray[Any], batch_size: int, active: ModelRuntime,
              challenger: ModelRuntime | None) -> list[Raw]:
    """A chunk of frames in batches of ``batch_size`` (the last one may be smaller)."""
    return split(*run_whole(images, batch_size, active, challenger), batch_size)


def run_whole(images: Sequence[NDArray[Any]] | NDArray[Any], batch_size: int, active: ModelRuntime,
              challenger: ModelRuntime | None) -> tuple[Raw, list[float]]:
    """A chunk of frames run in batches of ``batch_size``, its outputs joined into one :class:`Raw` (fewer, larger
    arrays to send back), with each batch's latency per frame. ``images`` stacked in one array are preprocessed in
    one pass. A batch the challenger failed on gets NaN rows, which the triggers read as "no challenger output"."""
    n = len(images)
    t0 = time.perf_counter()
    tensor = active.preprocess(images)
    pre_ms = (time.perf_counter() - t0) * 1000.0 / n
    outs, chs, latencies = [], [], []
    for i in range(0, n, batch_size):
        t = time.perf_counter()
        out = active.infer(tensor[i:i + batch_size], decode=False)
        m = len(out.embedding)
        latencies.append(pre_ms + (time.perf_counter() - t) * 1000.0 / m)
        outs.append(out)
        chs.append(_run_challenger(challenger, active, images[i:i + batch_size], tensor[i:i + batch_size]))

    def join(arrays: list[Any]) -> Any:
        return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

    def join_challenger(name: str) -> Any:
        parts = [None if c is None else getattr(c, name) for c in chs]
        done = next((p for p in parts if p is not None), None)
        if done is None:
            return None
        return join([p if p is not None else np.full((len(o.embedding), *done.shape[1:]), np.nan, done.dtype)
                     for p, o in zip(parts, outs, strict=True)])

    detector = outs[0].logits is None
    whole = Raw(
        embedding=join([o.embedding for o in outs]),
        logits=None if detector else join([o.logits for o in outs]),
        boxes=join([o.boxes for o in outs]) if detector else None,
        scores=join([o.scores for o in outs]) if detector else None,
        challenger_logits=None if detector else join_challenger("logits"),
        challenger_boxes=join_challenger("boxes") if detector else None,
        challenger_scores=join_challenger("scores") if detector else None,
        latency_ms=float(np.mean(latencies)),
    )
    return whole, latencies


def split(whole: Raw, latencies: list[float], batch_size: int) -> list[Raw]:
    """The chunk's outputs back in batches (views, no copies)."""
    def cut(a: Any, i: int) -> Any:
        return None if a is None else a[i:i + batch_size]

    return [Raw(embedding=cut(whole.embedding, i), logits=cut(whole.logits, i), boxes=cut(whole.boxes, i),
                scores=cut(whole.scores, i), challenger_logits=cut(whole.challenger_logits, i),
                challenger_boxes=cut(whole.challenger_boxes, i), challenger_scores=cut(whole.challenger_scores, i),
                latency_ms=lat)
            for i, lat in zip(range(0, len(whole.embedding), batch_size), latencies, strict=True)]


def pixels(frames: Sequence[Any]) -> NDArray[Any] | list[NDArray[Any]]:
    """The frames' images, stacked in one array when they share a shape (one array pickles, travels and scales
    faster than many), else as a list."""
    images = [f.image for f in frames]
    first = images[0]
    if all(im.shape == first.shape and im.dtype == first.dtype for im in images):
        return np.stack(images)
    return images


# -- the child ---------------------------------------------------------------------------------------


def _load(spec: tuple[str, Any, int, str] | None) -> ModelRuntime | None:
    if spec is None:
        return None
    path, manifest, threads, interpolation = spec
    return ModelRuntime(path, manifest, threads=threads, interpolation=interpolation)


def serve(conn: multiprocessing.connection.Connection) -> None:
    """The child's loop. Messages in: ``("load", gen, active_spec, challenger_spec)``, ``("run", gen, images,
    batch_size)``; ``None`` or a closed pipe ends it. Out: ``("ready", pid)`` once, then one answer per run:
    ``("ok", Raw, latencies)`` (:func:`run_whole`) or ``("error", message)``."""
    logging.basicConfig(level=logging.WARNING)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: the agent shuts us down
    models: tuple[int, ModelRuntime | None, ModelRuntime | None] | None = None
    load_error = ""
    inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def read() -> None:  # always draining the pipe: the parent's sends never wait on our own
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the agent is gone
                msg = None
            inbox.put(msg)
            if msg is None:
                return

    threading.Thread(target=read, name="flywheel-inference-reader", daemon=True).start()
    conn.send(("ready", os.getpid()))
    while True:
        msg = inbox.get()
        if msg is None:
            return
        if msg[0] == "load":
            _, gen, active_spec, challenger_spec = msg
            models, load_error = None, ""
            try:
                models = (gen, _load(active_spec), _load(challenger_spec))
            except Exception as exc:  # answered on the next run, which the parent then runs itself
                load_error = f"could not load the models in the inference process: {exc}"
            continue
        _, gen, images, batch_size = msg
        try:
            if models is None or models[0] != gen or models[1] is None:
                raise RuntimeError(load_error or f"models {gen} were not loaded in the inference process")
            answer: tuple[Any, ...] = ("ok", *run_whole(images, batch_size, models[1], models[2]))
        except Exception as exc:
            answer = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return


# -- the parent --------------------------------------------------------------------------------------


@dataclass
class Chunk:
    frames: list[Any]  # fleet.edge.frame.Frame, kept here: only the pixels travel
    models: Any  # fleet.edge.ota.LoadedModels the chunk runs on
    batch_size: int


class InferenceProcess:
    """The parent's side: a child process running the models on chunks of frames, results in order.

    ``submit`` sends a chunk (running it here instead when the child cannot take it); ``done`` yields the
    chunks whose results are back, as ``(chunk, raws)``, waiting for at least one when ``wait`` is set."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._in_flight: deque[Chunk] = deque()
        self._inline: deque[tuple[Chunk, list[Raw]]] = deque()  # run here, handed out in order
        self._gen = 0
        self._sent_models: Any = None
        self.restarts = 0
        self.inline_chunks = 0

    @property
    def in_flight(self) -> int:
        """Chunks in flight."""
        return len(self._in_flight)

    @property
    def frames_in_flight(self) -> int:
        return sum(len(c.frames) for c in self._in_flight)

    def full(self) -> bool:
        """True while the child holds as much as it may (the agent waits for results before sending more)."""
        if not self._in_flight:
            return False
        return (self.frames_in_flight >= HIGH_WATER
                or sum(f.image.nbytes for c in self._in_flight for f in c.frames) >= HIGH_WATER_BYTES)

    def wants(self, pending: int) -> bool:
        """Whether ``pending`` frames should go out now rather than wait for more."""
        return pending >= MAX_CHUNK or self.frames_in_flight < LOW_WATER

    @property
    def alive(self) -> bool:
        return self._conn is not None

    def start(self) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=serve, args=(child,), name="flywheel-inference", daemon=True)
        proc.start()
        child.close()
        try:
            if not parent.poll(START_TIMEOUT_S):
                raise TimeoutError(f"no answer in {START_TIMEOUT_S:.0f} s")
            kind, pid = parent.recv()
            assert kind == "ready", kind
        except Exception as exc:
            proc.kill()
            parent.close()
            raise RuntimeError(f"the inference process did not start: {exc}") from exc
        self._proc, self._conn = proc, parent
        self._sent_models = None
        log.info("inference process %d started", pid)

    def submit(self, chunk: Chunk) -> None:
        if self._conn is None:
            self._run_here(chunk, "no inference process")
            return
        try:
            if chunk.models is not self._sent_models:
                self._gen += 1
                self._conn.send(("load", self._gen, _spec(chunk.models.active), _spec(chunk.models.challenger)))
                self._sent_models = chunk.models
            self._conn.send(("run", self._gen, pixels(chunk.frames), chunk.batch_size))
        except (BrokenPipeError, OSError) as exc:
            self._lost(f"the pipe broke ({exc})")
            self._run_here(chunk, "the inference process is gone")
            return
        self._in_flight.append(chunk)

    def done(self, *, wait: bool) -> Iterator[tuple[Chunk, list[Raw]]]:
        while self._inline:
            yield self._inline.popleft()
        while self._in_flight and self._conn is not None:
            try:
                if not wait and not self._conn.poll():
                    return
                answer = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._lost(f"it exited ({exc or 'end of pipe'})")
                break
            chunk = self._in_flight.popleft()
            wait = False  # one result is enough; take the rest only if they are already there
            if answer[0] == "ok":
                yield chunk, split(answer[1], answer[2], chunk.batch_size)
            else:
                yield chunk, self._compute(chunk, answer[1])
        while self._inline:
            yield self._inline.popleft()

    def close(self) -> None:
        conn, proc, self._conn, self._proc = self._conn, self._proc, None, None
        if conn is not None:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
            conn.close()
        if proc is not None:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)

    # -- faults ----------------------------------------------------------------------------------------

    def _lost(self, why: str) -> None:
        """The child is gone: run what it held here, start another (a few times a run at most)."""
        pid = None if self._proc is None else self._proc.pid
        self.close()
        pending, self._in_flight = list(self._in_flight), deque()
        log.error("inference process %s stopped: %s; %d chunk(s) it held run in the agent instead", pid, why,
                  len(pending))
        for chunk in pending:
            self._run_here(chunk, "the inference process stopped")
        if self.restarts >= MAX_RESTARTS:
            log.error("inference process restarted %d times in this run; the agent runs the models itself from now "
                      "on", self.restarts)
            return
        self.restarts += 1
        try:
            self.start()
        except RuntimeError as exc:
            log.error("%s; the agent runs the models itself", exc)

    def _run_here(self, chunk: Chunk, why: str) -> None:
        self._inline.append((chunk, self._compute(chunk, why)))

    def _compute(self, chunk: Chunk, why: str) -> list[Raw]:
        """Run a chunk in this process (an error raised here is the same the thread mode would raise)."""
        self.inline_chunks += 1
        if self.inline_chunks == 1 or self.inline_chunks % 100 == 0:
            log.warning("ran %d chunk(s) of frames in the agent's own process (%s)", self.inline_chunks, why)
        active = chunk.models.active
        assert active is not None, "a chunk needs an active model"
        return run_chunk(pixels(chunk.frames), chunk.batch_size, active, chunk.models.challenger)


def _spec(runtime: ModelRuntime | None) -> tuple[str, Any, int, str] | None:
    """What the child needs to load the same model: the ONNX file (verified when it was installed), the
    manifest, the threads and the interpolation."""
    if runtime is None:
        return None
    return str(runtime.path), runtime.manifest, runtime.threads, runtime.preprocess.interpolation
