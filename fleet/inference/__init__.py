"""Running a model artifact: an ONNX file under onnxruntime, preprocessed and decoded as its manifest says.

The floor both the device (:mod:`fleet.edge`) and the hub (re-scoring the pool with the active model,
:mod:`fleet.hub.rescore`) stand on; numpy and onnxruntime only, no torch.
"""
