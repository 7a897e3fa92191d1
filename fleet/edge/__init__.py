"""The edge agent: ONNX shadow-mode runtime, durable spool, uplink, heartbeat, signed OTA."""
