"""Training on the defender's clean data: the fine-tuning most repairs end with."""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair import topology
from badnet_repair.config import ranged
from badnet_repair.data import Dataset
from badnet_repair.evaluate import accuracy
from badnet_repair.pruning import Pruned

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


class Adam:
    """Adam computed exactly as tf_keras computes it, on slot variables of our own, for use
    inside a training step's tf.function. A Keras optimizer applied inside a new traced
    function per net (or `model.fit` on a freshly compiled net) leaves about 15 MB of
    traced graphs behind per net on DeepID, so a long sweep in one process would grow
    without bound; this leaves nothing behind once the net is gone."""

    def __init__(self, variables: list, lr: float, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
        self.variables, self.lr = list(variables), lr
        self.beta_1, self.beta_2, self.epsilon = beta_1, beta_2, epsilon
        self.m = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self.iterations = tf.Variable(0.0, trainable=False)

    def apply(self, gradients: list) -> None:
        step = self.iterations + 1.0
        alpha = self.lr * tf.sqrt(1.0 - self.beta_2**step) / (1.0 - self.beta_1**step)
        for variable, g, m, v in zip(self.variables, gradients, self.m, self.v, strict=True):
            if g is None:
                continue
            m.assign_add((g - m) * (1.0 - self.beta_1))
            v.assign_add((tf.square(g) - v) * (1.0 - self.beta_2))
            variable.assign_sub((m * alpha) / (tf.sqrt(v) + self.epsilon))
        self.iterations.assign(step)


class SGD:
    """SGD with momentum computed as tf_keras computes it (v <- momentum v - lr g, w <- w + v),
    on slot variables of our own, for the same reason as `Adam`. `lr` is a number or a
    function of the number of steps taken (a schedule)."""

    def __init__(self, variables: list, lr: float | Callable, momentum: float = 0.0):
        self.variables, self.lr, self.momentum = list(variables), lr, momentum
        self.v = [tf.Variable(tf.zeros_like(v), trainable=False) for v in self.variables]
        self.iterations = tf.Variable(0.0, trainable=False)

    def apply(self, gradients: list) -> None:
        lr = self.lr(self.iterations) if callable(self.lr) else self.lr
        for variable, g, v in zip(self.variables, gradients, self.v, strict=True):
            if g is None:
                continue
            v.assign(self.momentum * v - lr * g)
            variable.assign_add(v)
        self.iterations.assign_add(1.0)


def cosine(lr: float, steps: int) -> Callable:
    """A cosine schedule from `lr` down to 0 over `steps` steps."""
    return lambda step: lr * 0.5 * (1.0 + tf.cos(np.pi * tf.minimum(step, steps) / steps))


def loss_function(model: keras.Model) -> keras.losses.Loss:
    """Cross-entropy on the model's probabilities, or on its raw scores if it has no softmax."""
    logits = topology.output_kind(model) == "linear"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=logits)


def finetune(
    model: keras.Model,
    train: Dataset,
    holdout: Dataset | None,
    epochs: int,
    lr: float,
    batch_size: int,
    *,
    seed: int = 0,
    pruning: Pruned | None = None,
    on_epoch: Callable[[int, dict], None] = lambda epoch, values: None,
    stop: Callable[[int], bool] | None = None,
    check_every: int = 1,
    name: str = "finetune",
) -> keras.Model:
    """Train `model` in place with Adam on `train` (shuffled with `seed`), reporting each
    epoch's loss and `holdout` accuracy. A `pruning` of this model stays in force: its
    masks are multiplied in after every step, inside the step. The demo BadNets are
    trained by the same function, from scratch.

    `stop(steps)`, asked after every `check_every` steps, ends training as soon as it says
    so (an epoch cut short is reported over the images it saw): for a goal that a whole
    epoch would overshoot, such as BaDExpert's expert forgetting the clean task."""
    if epochs == 0:
        return model
    variables, loss_of = model.trainable_variables, loss_function(model)
    adam = Adam(variables, lr)
    hold = pruning.hold if pruning else []
    held = [(variable, tf.constant(mask, variable.dtype)) for variable, mask in hold]

    @tf.function(reduce_retracing=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_of(y, model(x, training=True)) + sum(model.losses)
        adam.apply(tape.gradient(loss, variables))
        for variable, mask in held:
            variable.assign(variable * mask)
        return loss

    log.info("training %d epochs on %d images", epochs, len(train))
    rng = np.random.default_rng(seed)
    y = train.y.astype(np.int32)
    steps, stopped = 0, False
    for epoch in range(1, epochs + 1):
        order, total, seen = rng.permutation(len(train)), 0.0, 0
        for i in range(0, len(train), batch_size):
            batch = order[i : i + batch_size]
            total += float(step(train.x[batch], y[batch])) * len(batch)
            steps, seen = steps + 1, seen + len(batch)
            if stop is not None and steps % check_every == 0 and stop(steps):
                log.info("stopped after %d steps", steps)
                stopped = True
                break
        if pruning and pruning.after_epoch:
            pruning.after_epoch()
        values = {f"{name}/loss": total / seen}
        if holdout is not None and len(holdout):
            values[f"{name}/val_acc"] = accuracy(model, holdout)
        shown = ", ".join(f"{k.rsplit('/', 1)[1]}={v:.4f}" for k, v in values.items())
        log.info("epoch %d/%d: %s", epoch, epochs, shown)
        on_epoch(epoch, values)
        if stopped:
            break
    return model
