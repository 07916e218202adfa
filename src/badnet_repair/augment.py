"""Random Erasing (Zhong et al., AAAI 2020): a rectangle of each chosen image replaced by
random values. A standard augmentation for training on few images; for a repair it also
teaches the net that no small region decides the class alone, which is what a patch
trigger relies on (no trigger is known or assumed beyond "somewhere, some size")."""

import numpy as np

ASPECT = 0.3  # the paper's r1: aspect ratios drawn log-uniformly from [r1, 1 / r1]


def random_erasing(
    x: np.ndarray,
    rng: np.random.Generator,
    probability: float,
    area: tuple[float, float],
    value_range: tuple[float, float],
) -> np.ndarray:
    """A copy of the NHWC batch `x` in which each image, with `probability`, has one
    rectangle covering a share of its area drawn uniformly from `area` (clipped to the
    image) filled with values drawn uniformly from `value_range`; the rest untouched."""
    n, height, width, _ = x.shape
    chosen = rng.random(n) < probability
    share = rng.uniform(area[0], area[1], n) * height * width
    ratio = np.exp(rng.uniform(np.log(ASPECT), -np.log(ASPECT), n))
    h = np.clip(np.rint(np.sqrt(share * ratio)), 1, height).astype(int)
    w = np.clip(np.rint(np.sqrt(share / ratio)), 1, width).astype(int)
    top = (rng.random(n) * (height - h + 1)).astype(int)
    left = (rng.random(n) * (width - w + 1)).astype(int)
    rows, cols = np.arange(height)[None, :], np.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None])[..., None]
    noise = rng.uniform(value_range[0], value_range[1], x.shape).astype(x.dtype)
    return np.where(box, noise, x)
