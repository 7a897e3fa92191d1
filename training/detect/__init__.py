"""Object detection in the trainer: boxes in, a gated detector in the fleet's dense ONNX layout out.

One turn (``flywheel train --task detect``, :func:`training.detect.train.main`) has the classifier turn's shape
and reuses its machinery (:mod:`training.loop`: optimizer, one-cycle schedule, AMP, DDP, checkpoints, resume;
:mod:`training.gate`; :mod:`training.publish`): :mod:`~training.detect.data` loads boxes from a hub snapshot, a
COCO-format folder or an npz and mixes them with a replayed base set; :mod:`~training.detect.models` builds a
torchvision detector (a small FCOS for the CPU and the demo, or torchvision's mobile detectors);
:mod:`~training.detect.evaluate` measures COCO mAP overall and per slice with pycocotools on the boxes the
device decodes (:mod:`~training.detect.dense`: the dense layout and the device's rule);
:mod:`~training.detect.export` writes the dense layout (boxes, scores, embedding; no NMS in the graph) and
proves that the device decodes the boxes the gate measured.
"""
