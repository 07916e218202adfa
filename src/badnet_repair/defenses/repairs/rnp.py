"""RNP, Reconstructive Neuron Pruning (Li et al., ICML 2023): unlearn, recover, prune.

1. Unlearn a copy of the BadNet: gradient ascent on clean cross-entropy until its clean
   held-out accuracy falls to `rnp.unlearn_until` (checked after every step; the ascent
   is bounded by a gradient-norm clip and `rnp.unlearn_steps`). Clean features go; the
   backdoor, which clean data never exercises, stays (the `unlearned` stage shows it).
2. Recover: on the unlearned copy, learn a mask in [0, 1] per conv channel (on a BN's
   output where the conv feeds one; see `channels`) that brings clean accuracy back.
   The paper finds that the channels the backdoor lives in do not help with that, so
   their masks stay low.
3. Prune the original BadNet's channels whose mask is at most a threshold: the largest
   threshold of the grid whose clean held-out accuracy stays within `rnp.max_acc_drop`
   of the BadNet's (`mask_pruning`). The pruned channels are exactly zero in the
   returned model.
"""

from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair.defenses.mask_pruning import prune_by_threshold
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network import training
from badnet_repair.network.channels import Masks
from badnet_repair.network.predict import accuracy
from badnet_repair.network.pruning import copy_model
from badnet_repair.ranges import ranged


@dataclass
class Rnp:
    """rnp.*: unlearning (`unlearn_*`), mask recovery (`mask_*`), and the pruning rule."""

    batch_size: int = ranged(MISSING, ">= 1")
    unlearn_lr: float = ranged(MISSING, "> 0")
    unlearn_steps: int = ranged(MISSING, ">= 1")
    unlearn_until: float = ranged(MISSING, "[0, 1]")
    clip_norm: float = ranged(MISSING, "> 0")
    momentum: float = ranged(MISSING, "[0, 1)")
    weight_decay: float = ranged(MISSING, ">= 0")
    mask_lr: float = ranged(MISSING, "> 0")
    mask_steps: int = ranged(MISSING, ">= 1")
    threshold_step: float = ranged(MISSING, "(0, 1)")
    max_acc_drop: float = ranged(MISSING, "[0, 1)")
    margin_se: float = ranged(MISSING, ">= 0")


@dataclass
class Settings(RepairSettings):
    rnp: Rnp = MISSING


def describe(rnp: Rnp) -> str:
    return (
        f"unlearn to {rnp.unlearn_until:g}, {rnp.mask_steps} mask steps, "
        f"max_acc_drop {rnp.max_acc_drop:g}"
    )


def unlearn(case: Case, rnp: Rnp) -> keras.Model:
    """A copy of the BadNet after gradient ascent on clean data, stopped as soon as its
    clean held-out accuracy is at most `rnp.unlearn_until`. BatchNorm stays in inference
    mode: the masks are learnt, and the original pruned, for inference."""
    model = copy_model(case.badnet)
    weights = model.trainable_variables
    score = training.scores(model)
    optimizer = training.SGD(weights, rnp.unlearn_lr, rnp.momentum)

    @tf.function(input_signature=training.batch_signature(model), autograph=False)
    def ascent(x, y):
        with tf.GradientTape() as tape:
            loss = training.cross_entropy(score, x, y)
            decay = 0.5 * rnp.weight_decay * tf.add_n([tf.reduce_sum(w * w) for w in weights])
            objective = -loss + decay
        grads, _ = tf.clip_by_global_norm(tape.gradient(objective, weights), rnp.clip_norm)
        optimizer.apply(grads)
        return {"loss": loss}

    def unlearned() -> bool:
        return accuracy(model, case.clean.holdout, case.batch_size) <= rnp.unlearn_until

    steps = 0
    if not unlearned():
        steps = case.run_steps(
            "rnp/unlearn",
            model,
            ascent,
            steps=rnp.unlearn_steps,
            batch_size=rnp.batch_size,
            stop=unlearned,
        )
    case.journal.log({"rnp/unlearn_steps": steps})
    return model


def recover(case: Case, rnp: Rnp, unlearned: keras.Model) -> Masks:
    """Masks in [0, 1], from 1, that restore the unlearned copy's clean accuracy."""
    masks = Masks(unlearned)
    score = training.scores(unlearned)
    optimizer = training.SGD(masks.values, rnp.mask_lr, rnp.momentum)

    @tf.function(input_signature=training.batch_signature(unlearned), autograph=False)
    def learn(x, y):
        masks.apply()
        with tf.GradientTape() as tape:
            loss = training.cross_entropy(score, x, y)
        grads = masks.gradients(tape.gradient(loss, masks.params))
        optimizer.apply(grads)
        masks.clip()
        return {"loss": loss}

    case.run_steps(
        "rnp/mask", unlearned, learn, steps=rnp.mask_steps, batch_size=rnp.batch_size, seed_offset=1
    )
    masks.apply()
    return masks


def repair(case: Case, rnp: Rnp):
    unlearned = unlearn(case, rnp)
    case.stage("unlearned", unlearned)
    values = recover(case, rnp, unlearned).numpy()
    return prune_by_threshold(
        case, "rnp", "RNP", values, rnp.threshold_step, rnp.max_acc_drop, rnp.margin_se
    )
