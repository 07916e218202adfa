"""FT-SAM (Zhu et al., ICCV 2023): fine-tune on clean data with adaptive sharpness-aware
minimisation. Backdoor neurons tend to have large weights that plain fine-tuning barely
moves; a step taken at the worst nearby weights, w + rho * w^2 g / || |w| g ||, shrinks
them.

Each step: g = grad L(w) on a clean batch; e as above (one norm over all weights); the
gradient at w + e (BatchNorm's moving statistics left as they were); w restored; one
SGD step (momentum, weight decay, cosine schedule) with that gradient. The loss is
cross-entropy with label smoothing, from the scores before the softmax.

The learning rate is set per net by the accuracy-budget rule: `ft_sam.lrs` are tried
from the smallest, each as a whole run from the BadNet, and the largest whose clean
held-out accuracy stays within `ft_sam.max_acc_drop` of the BadNet's is kept (rates
tuned on BatchNorm ResNets wreck small nets without BatchNorm; a small rate leaves the
backdoor in).

Two additions of ours, both standard training practice: the clean batches go through
Random Erasing (`augment.random_erasing`; the reference fine-tunes with its training
augmentation too), and the rate warms up linearly over the first `warmup` share of
the steps. On the DeepID demos the erasing is what removes a patch trigger (ASR 0.49 ->
0.00 on `demo`), and the warm-up is what keeps a large rate from killing every ReLU.
"""

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair import UserError
from badnet_repair.augment import random_erasing
from badnet_repair.defenses.budget import increasing, rung, shown, strongest_run
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network import training
from badnet_repair.network.pruning import copy_model
from badnet_repair.ranges import ranged


@dataclass
class FtSam:
    """ft_sam.*: `steps` SAM steps of `batch_size` clean images per run, for each rate of
    the ladder `lrs` until one falls out of the `max_acc_drop` budget; the rate warms up
    over the first `warmup` share of the steps; each image is erased (Random Erasing)
    with probability `erasing`, a rectangle of a share of its area within `erase_area`."""

    steps: int = ranged(MISSING, ">= 1")
    batch_size: int = ranged(MISSING, ">= 1")
    lrs: list[float] = MISSING
    rho: float = ranged(MISSING, ">= 0")
    momentum: float = ranged(MISSING, "[0, 1)")
    weight_decay: float = ranged(MISSING, ">= 0")
    label_smoothing: float = ranged(MISSING, "[0, 1)")
    warmup: float = ranged(MISSING, "[0, 1]")
    erasing: float = ranged(MISSING, "[0, 1]")
    erase_area: list[float] = MISSING
    max_acc_drop: float = ranged(MISSING, "[0, 1)")
    margin_se: float = ranged(MISSING, ">= 0")

    def check(self) -> None:
        increasing(self.lrs, "ft_sam.lrs")
        low, high = (self.erase_area + [0.0, 0.0])[:2]
        if len(self.erase_area) != 2 or not 0 < low <= high <= 1:
            raise UserError(
                f"config key ft_sam.erase_area={list(self.erase_area)}: expected [low, high] "
                "with 0 < low <= high <= 1 (shares of the image's area)"
            )


@dataclass
class Settings(RepairSettings):
    ft_sam: FtSam = MISSING


def describe(ft_sam: FtSam) -> str:
    erasing = f", erasing {ft_sam.erasing:g}" if ft_sam.erasing else ""
    return f"rho {ft_sam.rho:g}, lr {shown(ft_sam.lrs)}, {ft_sam.steps} steps{erasing}"


def sam_step(model: keras.Model, settings: FtSam, lr, num_classes: int):
    """One adaptive-SAM step on `model` in place, as a tf.function of a batch; `lr` is a
    rate or a schedule (`training.SGD`)."""
    weights = model.trainable_variables
    frozen = [v for v in model.non_trainable_variables if "moving_" in v.name]
    optimizer = training.SGD(weights, lr, settings.momentum)
    score = training.scores(model)

    def loss_of(x, y):
        targets = tf.one_hot(y, num_classes)
        out = score(x, training=True)
        losses = keras.losses.categorical_crossentropy(
            targets, out, from_logits=True, label_smoothing=settings.label_smoothing
        )
        return tf.reduce_mean(losses)

    @tf.function(input_signature=training.batch_signature(model), autograph=False)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_of(x, y)
        grads = tape.gradient(loss, weights)
        values = {"loss": loss}
        if settings.rho > 0:
            scaled = [tf.abs(w) * g for w, g in zip(weights, grads, strict=True)]
            norm = tf.linalg.global_norm(scaled)
            kept = [v.read_value() for v in weights + frozen]
            for w, g in zip(weights, grads, strict=True):
                w.assign_add(settings.rho * tf.square(w) * g / (norm + 1e-12))
            with tf.GradientTape() as tape:
                values["perturbed_loss"] = loss_of(x, y)
            grads = tape.gradient(values["perturbed_loss"], weights)
            for v, value in zip(weights + frozen, kept, strict=True):
                v.assign(value)  # exactly w again, and BatchNorm's statistics as they were
        grads = [g + settings.weight_decay * w for w, g in zip(weights, grads, strict=True)]
        optimizer.apply(grads)
        return values

    return step


def repair(case: Case, ft_sam: FtSam):
    num_classes = int(case.badnet.output_shape[-1])
    images = case.clean.train.x
    value_range = (float(images.min()), float(images.max()))

    def train(lr: float) -> keras.Model:
        model = copy_model(case.badnet)
        schedule = training.cosine(lr, ft_sam.steps, ft_sam.warmup)
        sam = sam_step(model, ft_sam, schedule, num_classes)
        rng = np.random.default_rng(case.seed + 1)  # every rung erases the same rectangles

        def step(x, y):
            x = random_erasing(x, rng, ft_sam.erasing, ft_sam.erase_area, value_range)
            return sam(x, y)

        case.run_steps(
            f"ft_sam/lr_{rung(lr)}", model, step, steps=ft_sam.steps, batch_size=ft_sam.batch_size
        )
        return model

    return strongest_run(
        case, "ft_sam", "lr", ft_sam.lrs, train, ft_sam.max_acc_drop, ft_sam.margin_se
    )[1]
