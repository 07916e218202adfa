"""Training: the one loop every repair, detector and demo build trains with (`train_loop`,
on batches drawn epoch after epoch from a seeded order), the fine-tuning most repairs end
with (`finetune`, Adam by epochs) and custom steps counted in optimiser steps
(`run_steps`, for adversarial steps, masks, SAM), with Adam and SGD computed exactly as
tf_keras computes them, and a classifier's scores before its softmax (`scores`)."""

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair import UserError
from badnet_repair.data import Dataset
from badnet_repair.network import topology
from badnet_repair.network.predict import accuracy, any_batch
from badnet_repair.network.pruning import Pruned
from badnet_repair.ranges import ranged

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


def cosine(lr: float, steps: int, warmup: float = 0.0) -> Callable:
    """A cosine schedule from `lr` down to 0 over `steps` steps, after a linear warm-up
    over the first `warmup` share of them (a full-rate first step can kill every ReLU of
    a net without BatchNorm)."""
    ramp = max(1.0, warmup * steps)

    def rate(step):
        decay = lr * 0.5 * (1.0 + tf.cos(np.pi * tf.minimum(step, steps) / steps))
        return decay * tf.minimum(1.0, (step + 1.0) / ramp) if warmup > 0 else decay

    return rate


def loss_function(model: keras.Model) -> keras.losses.Loss:
    """Cross-entropy on the model's probabilities, or on its raw scores if it has no softmax."""
    logits = topology.output_kind(model) == "linear"
    return keras.losses.SparseCategoricalCrossentropy(from_logits=logits)


Scores = Callable[..., tf.Tensor]


def scores(model: keras.Model) -> Scores:
    """`model`'s scores before its final softmax, as `f(x, training=False)`: losses from
    scores keep their gradient where a probability saturates at 0 or 1. The layers and
    weights are `model`'s own, so training through the scores trains `model` (unlike
    `trigger_search.logits_of`, a copy of a frozen net)."""
    if topology.output_kind(model) == "linear":
        return model
    last = model.get_layer(topology.functional_config(model)["output_layers"][0][0])
    body = keras.Model(model.inputs, last.input)
    if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
        return body
    if not isinstance(last, keras.layers.Dense):
        raise UserError(
            f"output layer {last.name} of {model.name}: a {type(last).__name__} with a "
            "softmax; expected a Dense layer or a separate softmax"
        )

    def dense_scores(x, training=False):
        out = tf.matmul(body(x, training=training), last.kernel)
        return out + last.bias if last.use_bias else out

    return dense_scores


def cross_entropy(score: Scores, x, y) -> tf.Tensor:
    """Mean cross-entropy of `score`'s answers to `x` (BatchNorm in inference mode)."""
    return tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(y, score(x, training=False), from_logits=True)
    )


def batch_signature(model: keras.Model) -> list[tf.TensorSpec]:
    """The input signature of a step on (images, labels) batches of any size for `model`
    (`batches` gives int32 labels): traced once for every batch size."""
    return [any_batch(model), tf.TensorSpec((None,), tf.int32)]


def batches(
    ds: Dataset, batch_size: int, rng: np.random.Generator, *, in_order: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of `ds` in seeded random order, one pass after another, without end; the
    images of a batch in file order (`in_order`, the faster gather) or as drawn."""
    y = ds.y.astype(np.int32)
    while True:
        order = rng.permutation(len(ds))
        for i in range(0, len(order), batch_size):
            pick = np.sort(order[i : i + batch_size]) if in_order else order[i : i + batch_size]
            yield ds.x[pick], y[pick]


def train_loop(
    name: str,
    model: keras.Model,
    step: Callable[[np.ndarray, np.ndarray], dict[str, tf.Tensor]],
    source: Iterator[tuple[np.ndarray, np.ndarray]],
    ends: list[int],
    holdout: Dataset | None,
    *,
    unit: str = "round",
    on_round: Callable[[int, dict], None] = lambda r, values: None,
    after_round: Callable[[], None] | None = None,
    stop: Callable[[int], bool] | None = None,
) -> int:
    """Call `step(x, y)` on batches from `source` in rounds, round r ending after
    `ends[r - 1]` steps in all. After each round: `after_round()`, the mean per image of
    each scalar `step` returned and `model`'s accuracy on `holdout`, logged as one
    progress line and handed to `on_round(r, {"name/key": value})`. `stop(steps)`, asked
    after every step, ends training at once (the round cut short is reported over the
    images it saw). Returns the number of steps taken."""
    taken = 0
    for r, end in enumerate(ends, start=1):
        sums: dict[str, float] = {}
        seen, stopped = 0, False
        while taken < end:
            x, y = next(source)
            for key, value in step(x, y).items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(x)
            taken, seen = taken + 1, seen + len(x)
            if stop is not None and stop(taken):
                stopped = True
                break
        if after_round is not None:
            after_round()
        values = {f"{name}/{key}": total / seen for key, total in sums.items()}
        if holdout is not None and len(holdout):
            values[f"{name}/val_acc"] = accuracy(model, holdout)
        shown = ", ".join(f"{k.rsplit('/', 1)[1]}={v:.4f}" for k, v in values.items())
        log.info("%s %s %d/%d (step %d/%d): %s", name, unit, r, len(ends), taken, ends[-1], shown)
        on_round(r, values)
        if stopped:
            log.info("%s: stopped after %d of %d steps", name, taken, ends[-1])
            break
    return taken


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
    so: for a goal that a whole epoch would overshoot, such as BaDExpert's expert
    forgetting the clean task."""
    if epochs == 0:
        return model
    variables, loss_of = model.trainable_variables, loss_function(model)
    adam = Adam(variables, lr)
    hold = pruning.hold if pruning else []
    held = [(variable, tf.constant(mask, variable.dtype)) for variable, mask in hold]

    @tf.function(input_signature=batch_signature(model), autograph=False)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_of(y, model(x, training=True)) + sum(model.losses)
        adam.apply(tape.gradient(loss, variables))
        for variable, mask in held:
            variable.assign(variable * mask)
        return {"loss": loss}

    log.info("training %d epochs on %d images", epochs, len(train))
    per_epoch = -(-len(train) // batch_size)
    source = batches(train, batch_size, np.random.default_rng(seed), in_order=False)
    asked = None if stop is None else (lambda steps: steps % check_every == 0 and stop(steps))
    train_loop(
        name,
        model,
        step,
        source,
        [per_epoch * e for e in range(1, epochs + 1)],
        holdout,
        unit="epoch",
        on_round=on_epoch,
        after_round=pruning.after_epoch if pruning else None,
        stop=asked,
    )
    return model


ROUNDS = 10  # progress lines and held-out measurements per `run_steps`


def run_steps(
    name: str,
    model: keras.Model,
    train: Dataset,
    holdout: Dataset | None,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    step: Callable[[np.ndarray, np.ndarray], dict[str, tf.Tensor]],
    on_round: Callable[[int, dict], None],
    stop: Callable[[], bool] | None = None,
) -> int:
    """`steps` calls of `step` on batches of `train`, in `ROUNDS` rounds (`train_loop`).

    Lengths are counted in optimiser steps, not passes over the data, so a repair costs
    the same on a defender's 1,000 images as on 10,000. Returns the steps taken."""
    rounds = min(ROUNDS, steps)
    source = batches(train, batch_size, np.random.default_rng(seed))
    ends = [steps * r // rounds for r in range(1, rounds + 1)]
    asked = None if stop is None else (lambda taken: stop())
    return train_loop(name, model, step, source, ends, holdout, on_round=on_round, stop=asked)
