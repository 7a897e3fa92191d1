"""Flywheel's fleet side: the wire contract, the edge agent, the hub and the demo simulator."""

__version__ = "0.1.0"
