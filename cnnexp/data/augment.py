"""Training-image augmentation on the device: whole tensors of uint8 images at once.

Random horizontal flip, random crop of the image padded by `translate` pixels
(reflected border) and cutout (one zeroed square), as a few tensor operations
per epoch: no per-image PIL work. With alternate_flip, each training image is
mirrored in every other epoch, starting from a coin toss per image (Jordan
2024): every image is seen both ways in any two epochs in a row. Every random
draw comes from a generator seeded by (trainer.seed, epoch), so an epoch's
augmentation is the same in a run and in its resume, whichever step the resume
starts at. Validation and test images are never augmented; `tta_views` gives
the views test-time augmentation averages over.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    flip: bool = False
    translate: int = 0  # padding of the random crop, in pixels
    cutout: int = 0  # side of the zeroed square, in pixels
    alternate_flip: bool = False  # with flip: mirrored in every other epoch, not at random

    @classmethod
    def from_config(cls, cfg) -> Augment:
        if cfg is None:
            return cls()
        return cls(bool(cfg.get("flip", False)), int(cfg.get("translate", 0)), int(cfg.get("cutout", 0)),
                   bool(cfg.get("alternate_flip", False)))

    @property
    def active(self) -> bool:
        return self.flip or self.translate > 0 or self.cutout > 0

    def describe(self) -> str:
        flip = "alternating flip" if self.alternate_flip else "flip"
        parts = ([flip] if self.flip else []) + ([f"translate {self.translate}"] if self.translate else []) \
            + ([f"cutout {self.cutout}"] if self.cutout else [])
        return ", ".join(parts) or "none"

    def __call__(self, images: torch.Tensor, seed: int, epoch: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """A new tensor: every image of `images` (N, C, H, W) augmented, drawn from (seed, epoch).
        `index`: each image's place in the training set (alternate_flip follows an image across epochs)."""
        if not self.active:
            return images
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % 2**63)
        n = images.shape[0]
        out = images
        if self.flip:
            flipped = torch.rand(n, generator=g) < 0.5  # drawn either way: the later draws stay as they were
            if self.alternate_flip:
                flipped = alternating_flips(n if index is None else index.cpu(), seed, epoch)
            out = torch.where(flipped.to(images.device).view(-1, 1, 1, 1), out.flip(3), out)
        if self.translate:
            shifts = torch.randint(-self.translate, self.translate + 1, (n, 2), generator=g)
            out = translate(out, shifts.to(images.device), self.translate)
        if self.cutout:
            out = cutout(out, self.cutout, g)
        return out if out is not images else images.clone()


def alternating_flips(index: torch.Tensor | int, seed: int, epoch: int) -> torch.Tensor:
    """Which images to mirror in `epoch` (1-based): a coin toss per training image,
    the same in every epoch of a run, inverted in every even epoch. `index`: the
    images' places in the training set (a permutation of it), or their count."""
    index = torch.arange(index) if isinstance(index, int) else index
    start = torch.rand(int(index.max()) + 1, generator=torch.Generator().manual_seed(int(seed) % 2**63)) < 0.5
    return start[index] ^ (int(epoch) % 2 == 0)


def translate(images: torch.Tensor, shifts: torch.Tensor, pad: int) -> torch.Tensor:
    """Each image shifted by its (dy, dx) in [-pad, pad], the border reflected:
    one reflect-pad of the whole tensor, then one crop per distinct shift."""
    h, w = images.shape[2:]
    # Reflect by indexing, which works on uint8 and never makes a float copy of the epoch.
    rows, cols = reflected(h, pad, images.device), reflected(w, pad, images.device)
    padded = images.index_select(2, rows).index_select(3, cols)
    out = torch.empty_like(images)
    keys = (shifts[:, 0] + pad) * (2 * pad + 1) + (shifts[:, 1] + pad)
    for key in torch.unique(keys).tolist():
        dy, dx = divmod(key, 2 * pad + 1)
        chosen = (keys == key).nonzero().flatten()
        out[chosen] = padded[chosen, :, dy : dy + h, dx : dx + w]
    return out


def reflected(size: int, pad: int, device) -> torch.Tensor:
    """Indices of a line of `size` pixels padded by `pad` reflected pixels on each side."""
    index = torch.arange(-pad, size + pad, device=device).abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def cutout(images: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One size x size square per image set to zero (centred anywhere, clipped at the border)."""
    n, _, h, w = images.shape
    cy = torch.randint(0, h, (n, 1, 1), generator=g).to(images.device)
    cx = torch.randint(0, w, (n, 1, 1), generator=g).to(images.device)
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = ((rows - cy).abs() <= size // 2) & ((cols - cx).abs() <= size // 2)
    if size % 2 == 0:  # an even square: one row and column fewer on the far side
        inside &= (rows - cy < size // 2) & (cols - cx < size // 2)
    return images.masked_fill(inside.unsqueeze(1), 0)


def tta_views(batch: torch.Tensor, mode: str) -> list[tuple[torch.Tensor, float]]:
    """The views of a (normalised) batch test-time augmentation averages, with weights:
    none: the batch; flip: it and its mirror image; flip_translate: those two
    (weight 1/4 each), and both shifted by one pixel down-right and up-left (the
    border reflected; 1/8 each), as Jordan 2024's multi-crop evaluation."""
    if mode == "none":
        return [(batch, 1.0)]
    mirrored = batch.flip(3)
    if mode == "flip":
        return [(batch, 0.5), (mirrored, 0.5)]
    padded = F.pad(batch, (1, 1, 1, 1), mode="reflect")
    h, w = batch.shape[2:]
    shifted = [padded[:, :, :h, :w], padded[:, :, 2 : 2 + h, 2 : 2 + w]]
    return [(batch, 0.25), (mirrored, 0.25), *[(view, 0.125) for s in shifted for view in (s, s.flip(3))]]
