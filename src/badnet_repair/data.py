"""Data sets in the CSAW-HackML-2020 format: HDF5 files with `data` and `label`.

`data` is (N, 3, H, W) channels-first (the competition's layout) or (N, H, W, 3)
channels-last, float pixels 0..255; `label` is (N,) float holding integer classes.
"""

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from badnet_repair import UserError
from badnet_repair.files import atomic


@dataclass(frozen=True)
class Dataset:
    """Images as float32 NHWC already scaled for the model, and integer labels."""

    name: str
    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def _layout(shape: tuple[int, ...], image_shape: tuple[int, int, int]) -> str:
    """'channels_first' or 'channels_last', whichever matches the model's (H, W, C)."""
    h, w, c = image_shape
    if shape[1:] == (h, w, c):
        return "channels_last"
    if shape[1:] == (c, h, w):
        return "channels_first"
    raise ValueError(
        f"images of shape {shape[1:]}, expected {(c, h, w)} (channels-first) "
        f"or {(h, w, c)} (channels-last) to match the model's input"
    )


def load_h5(
    path: str | Path, image_shape: tuple[int, int, int], num_classes: int, scale: float, name: str
) -> Dataset:
    """Read one data file read-only, check it against the model, return scaled NHWC float32."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path} ({name}): not found")
    try:
        with h5py.File(path, "r") as f:
            for key in ("data", "label"):
                if key not in f or not isinstance(f[key], h5py.Dataset):
                    raise UserError(f"data file {path}: expected an HDF5 dataset named '{key}'")
            raw, labels = f["data"], f["label"]
            if raw.ndim != 4 or labels.ndim != 1 or raw.shape[0] != labels.shape[0]:
                raise UserError(
                    f"data file {path}: expected data (N, C, H, W) or (N, H, W, C) and label (N,),"
                    f" got data {raw.shape} and label {labels.shape}"
                )
            if raw.shape[0] == 0:
                raise UserError(f"data file {path}: holds no images")
            try:
                layout = _layout(raw.shape, image_shape)
            except ValueError as e:
                raise UserError(f"data file {path}: {e}") from None
            if not (np.issubdtype(raw.dtype, np.number) and np.issubdtype(labels.dtype, np.number)):
                raise UserError(f"data file {path}: expected numeric data and label")
            x = np.empty(raw.shape, dtype=np.float32)
            raw.read_direct(x)
            y_raw = labels[()]
    except OSError as e:
        raise UserError(f"data file {path}: not a readable HDF5 file ({e})") from None
    if layout == "channels_first":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    if not np.isfinite(x).all():
        raise UserError(f"data file {path}: holds NaN or infinite pixels")
    if not np.all(np.equal(np.mod(y_raw, 1), 0)):
        raise UserError(f"data file {path}: labels must be whole numbers")
    y = y_raw.astype(np.int64)
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(
            f"data file {path}: labels span [{y.min()}, {y.max()}], expected [0, {num_classes})"
        )
    x *= np.float32(scale)
    return Dataset(name=name, x=x, y=y)


def save_h5(path: Path, x_channels_first: np.ndarray, labels: np.ndarray) -> None:
    """Write a data file in the competition's format (float pixels, float labels)."""
    with atomic(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("data", data=x_channels_first.astype(np.float32))
        f.create_dataset("label", data=labels.astype(np.float32))


def split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random split: (rest, held-out `fraction`)."""
    order = np.random.default_rng(seed).permutation(len(ds))
    n_held = int(round(fraction * len(ds)))
    held, rest = order[:n_held], order[n_held:]
    return (
        Dataset(ds.name, ds.x[rest], ds.y[rest]),
        Dataset(f"{ds.name}_holdout", ds.x[held], ds.y[held]),
    )
