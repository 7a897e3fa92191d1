"""The trainer: retrain on hub snapshots, gate, export signed ONNX, publish."""
