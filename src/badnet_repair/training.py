"""Training on the defender's clean data: the fine-tuning most repairs end with."""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair.config import ranged
from badnet_repair.data import Dataset
from badnet_repair.evaluate import accuracy

log = logging.getLogger(__name__)


@dataclass
class Finetune:
    """finetune.*: Adam on the clean training split, `epochs` passes over it."""

    epochs: int = ranged(MISSING, ">= 0")
    lr: float = ranged(MISSING, "> 0")
    batch_size: int = ranged(MISSING, ">= 1")


def seed_everything(seed: int) -> None:
    """Same config and seed, same numbers: seeded RNGs and deterministic TensorFlow ops."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


class EpochReport(keras.callbacks.Callback):
    """Per-epoch progress line, and the epoch's loss and held-out accuracy to `on_epoch`."""

    def __init__(self, holdout: Dataset | None, epochs: int, on_epoch: Callable[[int, dict], None]):
        super().__init__()
        self.holdout, self.epochs, self.on_epoch = holdout, epochs, on_epoch

    def on_epoch_end(self, epoch, logs=None):
        values = {"finetune/loss": float(logs["loss"])}
        if self.holdout is not None and len(self.holdout):
            values["finetune/val_acc"] = accuracy(self.model, self.holdout)
        shown = ", ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in values.items())
        log.info("epoch %d/%d: %s", epoch + 1, self.epochs, shown)
        self.on_epoch(epoch + 1, values)


def finetune(
    model: keras.Model,
    train: Dataset,
    holdout: Dataset | None,
    epochs: int,
    lr: float,
    batch_size: int,
    callbacks: list | None = None,
    on_epoch: Callable[[int, dict], None] = lambda epoch, values: None,
) -> keras.Model:
    """Train `model` in place with Adam on `train`; `callbacks` keep a pruning in force.
    `holdout` accuracy is reported per epoch. The demo BadNets are trained by the same
    function, from scratch."""
    if epochs == 0:
        return model
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss="sparse_categorical_crossentropy",
    )
    log.info("training %d epochs on %d images", epochs, len(train))
    model.fit(
        train.x,
        train.y.astype(np.int32),
        epochs=epochs,
        batch_size=batch_size,
        shuffle=True,
        verbose=0,
        callbacks=[*(callbacks or []), EpochReport(holdout, epochs, on_epoch)],
    )
    return model
