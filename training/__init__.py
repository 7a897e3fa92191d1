"""The trainer: retrain on hub snapshots, gate, export signed ONNX, publish.

One turn (``flywheel train``, :func:`training.train.main`): :mod:`~training.prepare` pulls a snapshot
(:mod:`~training.snapshot` over :mod:`~training.hub_client`, or from the hub's object store through
:mod:`~training.objstore`) or loads an npz / image folder (:mod:`~training.data`) and mixes it with the replayed
base set, in memory or (``--stream``) in memory-mapped files read a batch at a time; :mod:`~training.train`
trains a model from :mod:`~training.models` with :mod:`~training.augment` presets, checkpointing every epoch
(:mod:`~training.checkpoint`); :mod:`~training.report` evaluates (:mod:`~training.evaluate`), gates
(:mod:`~training.gate`), exports (:mod:`~training.export`) and publishes (:mod:`~training.publish`), and
writes ``report.json``. Detectors (``--task detect``) take the same path through :mod:`training.detect`, on
the machinery the two tasks share (:mod:`training.loop`). Only this package imports torch, and only
:mod:`training.cli` is imported from outside it (lazily, by ``flywheel``).
"""
