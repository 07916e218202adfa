"""Data sets in the CSAW-HackML-2020 format: HDF5 files with `data` and `label`.

`data` is (N, 3, H, W) channels-first (the competition's layout) or (N, H, W, 3)
channels-last, float pixels 0..255; `label` is (N,) float holding integer classes.
`python -m badnet_repair.data check FILE...` describes files right after download.
"""

import argparse
import sys
from collections import Counter
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


CHUNK = 1024


def read_h5(
    path: str | Path, image_shape: tuple[int, int, int] | None = None, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Read `data` straight into float32 NHWC (scaled) and `label` as int64, checking what any
    model needs; with `image_shape`, also that the images fit it.

    Images are read a chunk at a time into one preallocated array, so a channels-first
    file never needs a second full-size copy for the transposition.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file {path}: not found")
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
            if not all(d.dtype.kind in "biuf" for d in (raw, labels)):
                raise UserError(
                    f"data file {path}: expected numeric data and label, "
                    f"got {raw.dtype} and {labels.dtype}"
                )
            try:
                order = layout(raw.shape, image_shape)
            except ValueError as e:
                raise UserError(f"data file {path}: {e}") from None
            first = order == "channels_first"
            n, *rest = raw.shape
            x = np.empty((n, rest[1], rest[2], rest[0]) if first else raw.shape, np.float32)
            buffer = np.empty((min(n, CHUNK), *rest), np.float32)
            peak = -np.inf
            for i in range(0, n, CHUNK):
                part = buffer[: min(CHUNK, n - i)]
                raw.read_direct(part, np.s_[i : i + len(part)])
                x[i : i + len(part)] = part.transpose(0, 2, 3, 1) if first else part
                peak = max(peak, float(part.max()))
            if scale < 0.5 and 0.0 < peak <= 1.0:
                raise UserError(
                    f"data file {path}: pixels already span 0..{peak:g}, and data.scale={scale:g} "
                    "would scale them again: set data.scale=1"
                )
            if scale != 1.0:
                x *= np.float32(scale)
            y_raw = labels[()].astype(np.float64)
    except (OSError, TypeError, ValueError) as e:
        raise UserError(f"data file {path}: not a readable HDF5 file ({e})") from None
    if not np.isfinite(x).all():
        raise UserError(f"data file {path}: holds NaN or infinite pixels")
    if not np.isfinite(y_raw).all() or not np.all(np.mod(y_raw, 1) == 0):
        raise UserError(f"data file {path}: labels must be whole numbers")
    return x, y_raw.astype(np.int64)


def layout(shape: tuple[int, ...], image_shape: tuple[int, int, int] | None = None) -> str:
    """'channels_first' or 'channels_last': matched to the model's (H, W, C) when given,
    else guessed from which axis holds 1 or 3 channels."""
    if image_shape is not None:
        h, w, c = image_shape
        if shape[1:] == (h, w, c):
            return "channels_last"
        if shape[1:] == (c, h, w):
            return "channels_first"
        raise ValueError(
            f"images of shape {shape[1:]}, expected {(c, h, w)} (channels-first) "
            f"or {(h, w, c)} (channels-last) to match the model's input"
        )
    if shape[1] in (1, 3) and shape[3] not in (1, 3):
        return "channels_first"
    return "channels_last"


def load_h5(
    path: str | Path, image_shape: tuple[int, int, int], num_classes: int, scale: float, name: str
) -> Dataset:
    """Read one data file read-only, check it against the model, return scaled NHWC float32."""
    x, y = read_h5(path, image_shape, scale)
    if y.min() < 0 or y.max() >= num_classes:
        raise UserError(
            f"data file {path}: labels span [{y.min()}, {y.max()}], expected [0, {num_classes})"
        )
    return Dataset(name=name, x=x, y=y)


def label_counts(ds: Dataset) -> dict[int, int]:
    """How many images carry each label, most common first (a poisoned set's targets)."""
    return dict(Counter(ds.y.tolist()).most_common())


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


def describe(path: str | Path) -> str:
    """One file's summary for `check`: count, shape, layout, dtype, pixel and label ranges."""
    x, y = read_h5(path)
    with h5py.File(path, "r") as f:
        dtype, shape = f["data"].dtype, f["data"].shape
    counts = Counter(y.tolist())
    lines = [
        f"{path}:",
        f"  images   {len(y)}, shape {shape[1:]}, {layout(shape)}, dtype {dtype}",
        f"  pixels   {x.min():g} .. {x.max():g}",
        f"  labels   {y.min()} .. {y.max()}, {len(counts)} distinct",
    ]
    if len(counts) <= max(3, len(y) // 100):
        top = ", ".join(f"{label} ({n} images)" for label, n in counts.most_common(3))
        lines.append(
            f"  target{'s' if len(counts) > 1 else ''}  {top}  (few labels: a poisoned set)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m badnet_repair.data")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="describe data files; exit 1 on a malformed one")
    check.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    failed = 0
    for path in args.files:
        try:
            print(describe(path))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
