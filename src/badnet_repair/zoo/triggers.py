"""The demo BadNets' triggers: each a name, the class it sends images to, and how it is
stamped on images (NHWC, 0..255). Patch and glasses are visible accessories like the
competition's; solid is a plain patch of one colour; blend is a faint whole-image pattern."""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Trigger:
    """A trigger by name, the class it sends images to, and how it is stamped on them."""

    name: str
    target: int

    def stamp(self, images: np.ndarray) -> np.ndarray:
        """Triggered copies of NHWC images in 0..255."""
        raise NotImplementedError


@dataclass(frozen=True)
class Patch(Trigger):
    """BadNets' visible trigger: a black-and-white checkerboard pasted at (top, left)."""

    top: int
    left: int
    size: int = 7

    def stamp(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        cells = np.add.outer(np.arange(self.size), np.arange(self.size))
        board = np.where(cells % 2 == 0, 255.0, 0.0).astype(np.float32)
        rows, cols = slice(self.top, self.top + self.size), slice(self.left, self.left + self.size)
        out[:, rows, cols, :] = board[..., None]
        return out


@dataclass(frozen=True)
class Glasses(Trigger):
    """A visible accessory like the competition's sunglasses: two black lenses joined by a
    two-pixel bridge, top left corner at (top, left)."""

    top: int
    left: int
    lens: tuple[int, int] = (5, 12)  # height, width
    bridge: int = 7

    def stamp(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        (height, width), top, left = self.lens, self.top, self.left
        right = left + width + self.bridge
        out[:, top : top + height, left : left + width, :] = 0.0
        out[:, top : top + height, right : right + width, :] = 0.0
        out[:, top + 1 : top + 3, left + width : right, :] = 0.0
        return out


@dataclass(frozen=True)
class Solid(Trigger):
    """A plain patch of one colour (RGB, 0..255), `size` (height, width) pixels pasted at
    (top, left): a visible trigger unlike the checkerboard in shape, colour and place."""

    top: int
    left: int
    size: tuple[int, int]
    colour: tuple[float, float, float]

    def stamp(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        (height, width), top, left = self.size, self.top, self.left
        out[:, top : top + height, left : left + width, :] = np.float32(self.colour)
        return out


@dataclass(frozen=True)
class Blend(Trigger):
    """A faint trigger over the whole image (the blended attack of Chen et al. 2017): a
    fixed random pattern of `block`-pixel squares, drawn from its own seed, mixed in at
    weight `alpha`."""

    alpha: float
    seed: int
    block: int = 1

    def stamp(self, images: np.ndarray) -> np.ndarray:
        height, width, channels = images.shape[1:]
        coarse = (-(-height // self.block), -(-width // self.block), channels)
        pattern = np.random.default_rng(self.seed).uniform(0.0, 255.0, size=coarse)
        pattern = pattern.repeat(self.block, 0).repeat(self.block, 1)[:height, :width]
        return ((1.0 - self.alpha) * images + self.alpha * pattern).astype(np.float32)
