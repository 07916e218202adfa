"""SEAM, Selective Amnesia (Zhu, Tang, Tang, Wang and Tang, IEEE S&P 2023): catastrophic
forgetting wipes the backdoor together with the main task; clean data then brings the
main task back alone, since nothing in it exercises the trigger.

1. forget: a copy of the BadNet is trained by SGD (momentum, weight decay) on the clean
   training images with labels drawn uniformly at random, afresh for every batch, until
   its clean held-out accuracy is at most `seam.forget_until` times chance (asked every
   `seam.check_every` steps), for at most `seam.forget_steps` steps. The gradient's
   global norm is clipped to `seam.clip_norm`: the BadNet is confident, so its first
   random-label gradients are huge, and unclipped they kill a net without BatchNorm
   (every image one class, beyond recovery). The forgotten net is stage `forgotten`.
2. recover: SGD (momentum, weight decay, a cosine schedule to 0) on the clean training
   images with their true labels, `seam.recover_steps` steps from the forgotten net.

The recovery's rate is set per net by the accuracy-budget rule: `seam.recover_lrs` are
tried from the smallest, each a recovery of the same forgotten net, and the largest whose
clean held-out accuracy stays within `seam.max_acc_drop` of the BadNet's is kept (a larger
rate moves the net further from the forgotten one and leaves less of the backdoor; too
large a rate fails to bring the main task back).
"""

from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair.defenses.budget import increasing, rung, shown, strongest_run
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network import training
from badnet_repair.network.predict import accuracy
from badnet_repair.network.pruning import copy_model
from badnet_repair.ranges import ranged


@dataclass
class Seam:
    """seam.*: forgetting (SGD at `forget_lr`, gradients clipped to `clip_norm`, at most
    `forget_steps` steps, until the held-out accuracy is at most `forget_until` times
    chance, asked every `check_every` steps), then recovery (`recover_steps` steps, the
    rates `recover_lrs` tried from the smallest until one falls out of the `max_acc_drop`
    budget), on batches of `batch_size` clean images."""

    batch_size: int = ranged(MISSING, ">= 1")
    forget_lr: float = ranged(MISSING, "> 0")
    forget_steps: int = ranged(MISSING, ">= 1")
    forget_until: float = ranged(MISSING, ">= 0")
    check_every: int = ranged(MISSING, ">= 1")
    clip_norm: float = ranged(MISSING, "> 0")
    recover_steps: int = ranged(MISSING, ">= 1")
    recover_lrs: list[float] = MISSING
    momentum: float = ranged(MISSING, "[0, 1)")
    weight_decay: float = ranged(MISSING, ">= 0")
    max_acc_drop: float = ranged(MISSING, "[0, 1)")
    margin_se: float = ranged(MISSING, ">= 0")

    def check(self) -> None:
        increasing(self.recover_lrs, "seam.recover_lrs")


@dataclass
class Settings(RepairSettings):
    seam: Seam = MISSING


def describe(seam: Seam) -> str:
    return (
        f"forget lr {seam.forget_lr:g} to {seam.forget_until:g}x chance, "
        f"recover lr {shown(seam.recover_lrs)}, {seam.recover_steps} steps"
    )


def sgd_step(
    model: keras.Model,
    seam: Seam,
    lr,
    relabel: tf.random.Generator | None = None,
    clip_norm: float | None = None,
):
    """One SGD step (momentum, weight decay added to the gradient) on `model` in place, as a
    tf.function of a batch; `lr` a rate or a schedule. With `relabel`, the batch's labels
    are replaced by labels it draws uniformly at random; with `clip_norm`, the gradient's
    global norm is clipped to it."""
    weights = model.trainable_variables
    optimizer = training.SGD(weights, lr, seam.momentum)
    score = training.scores(model)
    num_classes = int(model.output_shape[-1])

    @tf.function(input_signature=training.batch_signature(model), autograph=False)
    def step(x, y):
        if relabel is not None:
            y = relabel.uniform(tf.shape(y), 0, num_classes, dtype=tf.int32)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                keras.losses.sparse_categorical_crossentropy(
                    y, score(x, training=True), from_logits=True
                )
            )
        grads = tape.gradient(loss, weights)
        if clip_norm is not None:
            grads, _ = tf.clip_by_global_norm(grads, clip_norm)
        optimizer.apply([g + seam.weight_decay * w for w, g in zip(weights, grads, strict=True)])
        return {"loss": loss}

    return step


def held_out(case: Case, model: keras.Model) -> float:
    return accuracy(model, case.clean.holdout, case.batch_size)


def forget(case: Case, seam: Seam) -> keras.Model:
    """A copy of the BadNet trained on random labels until its clean held-out accuracy is
    at most `seam.forget_until` times chance, or for `seam.forget_steps` steps. Logs the
    steps taken and the held-out accuracy reached."""
    model = copy_model(case.badnet)
    floor = seam.forget_until / int(model.output_shape[-1])
    relabel = tf.random.Generator.from_seed(case.seed)
    step = sgd_step(model, seam, seam.forget_lr, relabel, seam.clip_norm)
    taken = 0

    def forgotten() -> bool:
        nonlocal taken
        taken += 1
        return taken % seam.check_every == 0 and held_out(case, model) <= floor

    steps = case.run_steps(
        "seam/forget",
        model,
        step,
        steps=seam.forget_steps,
        batch_size=seam.batch_size,
        stop=forgotten,
    )
    held = held_out(case, model)
    case.journal.log({"seam/forget_steps": steps, "seam/forgotten_val_acc": held})
    return model


def recover(case: Case, seam: Seam, forgotten: keras.Model, lr: float) -> keras.Model:
    """A copy of the forgotten net trained on the clean images with their true labels."""
    model = copy_model(forgotten)
    step = sgd_step(model, seam, training.cosine(lr, seam.recover_steps))
    case.run_steps(
        f"seam/recover/lr_{rung(lr)}",
        model,
        step,
        steps=seam.recover_steps,
        batch_size=seam.batch_size,
        seed_offset=1,
    )
    return model


def repair(case: Case, seam: Seam):
    forgotten = forget(case, seam)
    case.stage("forgotten", forgotten)
    train = lambda lr: recover(case, seam, forgotten, lr)  # noqa: E731
    return strongest_run(
        case, "seam", "lr", seam.recover_lrs, train, seam.max_acc_drop, seam.margin_se
    )[1]
