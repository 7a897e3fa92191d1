"""Full checkpoints (torchvision-reference style) and the process group for multi-GPU runs.

A checkpoint holds ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (the last finished,
0-based), ``epochs``, ``args``, ``rng`` and ``meta`` (everything export needs: model name, width,
input spec, class names, version). Only tensors and plain Python values are stored, so every load
uses ``weights_only=True``. Writes are atomic (temp file, then rename): a kill mid-write leaves the
previous checkpoint whole.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleet.errors import InvalidInput

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise InvalidInput(f"checkpoint {path} does not exist")
    try:
        ckpt: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file: say so
        raise InvalidInput(f"{path} is not a Flywheel checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt or "meta" not in ckpt:
        raise InvalidInput(f"{path} is not a Flywheel checkpoint (expected keys 'model' and 'meta')")
    return ckpt


def rng_state() -> dict[str, Any]:
    """Torch (CPU and CUDA), numpy and Python RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], [int(v) for v in np_state[1]], int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a ``torchrun`` job (world size 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise InvalidInput(f"--device {device} asked for CUDA, but torch sees no GPU")
    if world <= 1:
        return Dist(), torch.device(device if device.startswith("cuda") else ("cuda" if want_cuda else "cpu"))
    dist = Dist(
        rank=int(os.environ["RANK"]), world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )
    if want_cuda:
        torch.cuda.set_device(dist.local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if want_cuda else "gloo")
    return dist, torch.device(f"cuda:{dist.local_rank}" if want_cuda else "cpu")


def barrier(dist: Dist) -> None:
    if dist.enabled:
        torch.distributed.barrier()


def broadcast(dist: Dist, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not dist.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def shutdown(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
