"""Batch augmentation presets that run on the training device (GPU or CPU), looked up by name.

Input and output are float batches on the [0, 1] scale, ``(n, c, h, w)``; normalization by the
manifest's mean/std happens after. Random draws come from a ``torch.Generator`` seeded per epoch,
so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fleet.errors import InvalidInput

Op = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to 1/12 of its size (at least one pixel), filling with zeros."""
    n, _, h, w = x.shape
    pad = max(1, round(min(h, w) / 12))
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None])[:, None, :, None]  # (n, 1, h, 1)
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None])[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return xp[batch, chans, rows, cols]


def hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror half of the images left-right (for classes where that keeps the label)."""
    flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def photometric(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random brightness (x0.5..1.3) and contrast (x0.6..1.4) per image: darkness, glare, haze."""
    n = len(x)
    bright = (0.5 + 0.8 * torch.rand(n, generator=gen)).to(x)[:, None, None, None]
    contrast = (0.6 + 0.8 * torch.rand(n, generator=gen)).to(x)[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean).mul(bright).clamp(0, 1)


def noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Additive Gaussian sensor noise with a random sigma up to 0.08 per image."""
    sigma = (0.08 * torch.rand(len(x), generator=gen)).to(x)[:, None, None, None]
    local = torch.Generator(device=x.device)  # draw the noise where the batch lives, seeded from ``gen``
    local.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    eps = torch.randn(x.shape, generator=local, device=x.device, dtype=x.dtype)
    return (x + sigma * eps).clamp(0, 1)


PRESETS: dict[str, tuple[Op, ...]] = {
    "none": (),
    "light": (shift,),
    "standard": (shift, hflip),
    "robust": (shift, photometric, noise),
}


def get_preset(name: str) -> tuple[Op, ...]:
    """The ops of a preset; an unknown name lists the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInput(f"unknown augmentation preset {name!r}; choose one of {sorted(PRESETS)}") from None


def apply(x: torch.Tensor, ops: tuple[Op, ...], gen: torch.Generator) -> torch.Tensor:
    for op in ops:
        x = op(x, gen)
    return x
