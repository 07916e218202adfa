"""Custom training loops for repairs that need more than `fit`: a model's scores before
its softmax, seeded batches, and an epoch loop that prints one progress line per epoch
and hands each epoch's mean loss and held-out clean accuracy to MLflow."""

import logging
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tf_keras as keras

from badnet_repair import UserError, topology
from badnet_repair.data import Dataset
from badnet_repair.evaluate import accuracy

log = logging.getLogger(__name__)

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


def batches(ds: Dataset, batch_size: int, rng: np.random.Generator) -> Iterator[tuple]:
    """Batches of `ds` in seeded random order, one pass after another, without end."""
    while True:
        order = rng.permutation(len(ds))
        for i in range(0, len(order), batch_size):
            pick = np.sort(order[i : i + batch_size])
            yield ds.x[pick], ds.y[pick].astype(np.int32)


ROUNDS = 10  # progress lines and held-out measurements per loop


def run_steps(
    name: str,
    model: keras.Model,
    train: Dataset,
    holdout: Dataset,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    step: Callable[[np.ndarray, np.ndarray], dict[str, tf.Tensor]],
    on_round: Callable[[int, dict], None],
    stop: Callable[[], bool] | None = None,
) -> int:
    """`steps` calls of `step` on batches of `train`, in `ROUNDS` rounds; after each round,
    `model`'s accuracy on `holdout`.

    Lengths are counted in optimiser steps, not passes over the data, so a repair costs
    the same on a defender's 1,000 images as on 10,000. `step(x, y)` returns named
    scalars, averaged per round and logged as `name/...` with `name/val_acc`, the round
    number as MLflow step. `stop()`, asked after every step, ends the loop early.
    Returns the number of steps taken."""
    rng = np.random.default_rng(seed)
    source = batches(train, batch_size, rng)
    rounds = min(ROUNDS, steps)
    taken = 0
    for r in range(1, rounds + 1):
        sums: dict[str, float] = {}
        end = steps * r // rounds
        count = 0
        stopped = False
        while taken < end:
            for key, value in step(*next(source)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            taken += 1
            count += 1
            if stop is not None and stop():
                stopped = True
                break
        values = {f"{name}/{key}": total / count for key, total in sums.items()}
        values[f"{name}/val_acc"] = accuracy(model, holdout)
        shown = ", ".join(f"{k.rsplit('/', 1)[1]}={v:.4f}" for k, v in values.items())
        log.info("%s round %d/%d (step %d/%d): %s", name, r, rounds, taken, steps, shown)
        on_round(r, values)
        if stopped:
            log.info("%s: stopped after %d of %d steps", name, taken, steps)
            break
    return taken
