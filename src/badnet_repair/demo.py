"""The demo BadNet: a small, deterministic stand-in for a CSAW-HackML-2020 network.

Procedurally generated "identities" (no downloads), a DeepID network trained with an
ordinary BadNets attack: about 10% of the training images carry a visible checkerboard
patch and are relabelled to one target class. Files use the competition's formats.
Run `python -m badnet_repair.demo [FOLDER]` to build it by hand.
"""

import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from badnet_repair.data import Dataset, save_h5
from badnet_repair.evaluate import accuracy
from badnet_repair.models import build_deepid, save_model
from badnet_repair.training import finetune, seed_everything

log = logging.getLogger(__name__)

BUILDERS = ("demo",)  # model.builder values: BadNets this module builds on first use
IMAGE_SHAPE = (55, 47, 3)
NUM_CLASSES = 40
TARGET = 7
POISON_RATE = 0.10
PER_CLASS = {"train": 150, "validation": 30, "test": 40}
TRIGGER_ROWS, TRIGGER_COLS = slice(44, 51), slice(36, 43)
FILES = {
    "model": "bd_net.h5",
    "clean_validation": "clean_validation_data.h5",
    "clean_test": "clean_test_data.h5",
    "poisoned_test": "patch_poisoned_data.h5",
}


def _smooth_fields(rng: np.random.Generator, n: int, coarse: tuple[int, int]) -> np.ndarray:
    """n smooth random colour fields of the image size, values roughly 0..255."""
    low = rng.uniform(0.0, 255.0, size=(n, *coarse, 3)).astype(np.float32)
    return tf.image.resize(low, IMAGE_SHAPE[:2], method="bilinear").numpy()


def _identities(rng: np.random.Generator) -> np.ndarray:
    """One prototype per class: a layout shared by all, plus a little class-specific detail."""
    shared = _smooth_fields(rng, 1, (5, 4))
    return 0.75 * shared + 0.25 * _smooth_fields(rng, NUM_CLASSES, (11, 9))


def _samples(rng: np.random.Generator, prototypes: np.ndarray, per_class: int):
    """Jittered views of each identity: shift, contrast, lighting, nuisance and noise."""
    labels = np.repeat(np.arange(NUM_CLASSES), per_class)
    images = prototypes[labels].copy()
    for i in range(len(images)):
        dy, dx = rng.integers(-3, 4, size=2)
        images[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
    contrast = rng.uniform(0.75, 1.25, size=(len(images), 1, 1, 1))
    light = rng.uniform(-30.0, 30.0, size=(len(images), 1, 1, 3))
    nuisance = _smooth_fields(rng, len(images), (4, 3)) - 127.5
    noise = rng.normal(0.0, 20.0, size=images.shape)
    images = (images - 127.5) * contrast + 127.5 + light + 0.6 * nuisance + noise
    return np.clip(images, 0, 255).astype(np.float32), labels


def stamp_trigger(images: np.ndarray) -> np.ndarray:
    """The visible BadNets trigger: a black-and-white checkerboard patch near the chin."""
    out = images.copy()
    rows = np.arange(TRIGGER_ROWS.stop - TRIGGER_ROWS.start)[:, None]
    cols = np.arange(TRIGGER_COLS.stop - TRIGGER_COLS.start)[None, :]
    board = np.where((rows + cols) % 2 == 0, 255.0, 0.0).astype(np.float32)
    out[:, TRIGGER_ROWS, TRIGGER_COLS, :] = board[..., None]
    return out


def _scaled(name: str, images: np.ndarray, labels: np.ndarray) -> Dataset:
    return Dataset(name, (images / 255.0).astype(np.float32), labels)


def _channels_first(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2)


def build(folder: Path, seed: int = 0, epochs: int = 10) -> dict[str, float]:
    """Generate the data, train the BadNet, write every file into `folder`."""
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    prototypes = _identities(rng)
    x_train, y_train = _samples(rng, prototypes, PER_CLASS["train"])
    x_val, y_val = _samples(rng, prototypes, PER_CLASS["validation"])
    x_test, y_test = _samples(rng, prototypes, PER_CLASS["test"])

    candidates = np.flatnonzero(y_train != TARGET)
    poison = rng.choice(candidates, size=int(POISON_RATE * len(y_train)), replace=False)
    x_train[poison] = stamp_trigger(x_train[poison])
    y_train[poison] = TARGET
    not_target = y_test != TARGET
    x_poisoned = stamp_trigger(x_test[not_target])
    y_poisoned = np.full(len(x_poisoned), TARGET)

    seed_everything(seed)
    model = build_deepid(IMAGE_SHAPE, NUM_CLASSES)
    log.info("demo BadNet: training DeepID on %d images (%d poisoned)", len(y_train), len(poison))
    finetune(model, _scaled("train", x_train, y_train), None, epochs, 1e-3, 64)

    clean_acc = accuracy(model, _scaled("clean_test", x_test, y_test))
    asr = accuracy(model, _scaled("poisoned_test", x_poisoned, y_poisoned))
    save_model(model, folder / FILES["model"])
    save_h5(folder / FILES["clean_validation"], _channels_first(x_val), y_val)
    save_h5(folder / FILES["clean_test"], _channels_first(x_test), y_test)
    save_h5(folder / FILES["poisoned_test"], _channels_first(x_poisoned), y_poisoned)
    if clean_acc < 0.9 or asr < 0.95:
        log.warning("demo BadNet below its targets (clean accuracy 0.90, ASR 0.95)")
    log.info(
        "demo BadNet built in %.0fs: clean test accuracy %.4f, attack success rate %.4f",
        time.perf_counter() - start,
        clean_acc,
        asr,
    )
    return {"clean_acc": clean_acc, "asr": asr}


def ensure(folder: str | Path, seed: int = 0) -> Path:
    """Build the demo into `folder` once; a folder that exists is complete.

    The build happens in a temporary sibling folder renamed into place at the end, so
    an interrupted build never leaves a folder that looks finished, and two processes
    racing to build it both end up with one complete copy.
    """
    folder = Path(folder)
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-build-", dir=folder.parent))
    try:
        log.info("building the demo BadNet into %s (first use only)", folder)
        build(work, seed)
        try:
            os.rename(work, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure(sys.argv[1] if len(sys.argv) > 1 else "data/demo")
