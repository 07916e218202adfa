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
   of the BadNet's. The pruned channels are exactly zero in the returned model.
"""

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair import plots
from badnet_repair.defenses.budget import strongest_within
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network import training
from badnet_repair.network.channels import Masks, prune
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


@dataclass
class Settings(RepairSettings):
    rnp: Rnp = MISSING


def describe(rnp: Rnp) -> str:
    return (
        f"unlearn to {rnp.unlearn_until:g}, {rnp.mask_steps} mask steps, "
        f"max_acc_drop {rnp.max_acc_drop:g}"
    )


def _cross_entropy(score, x, y):
    return tf.reduce_mean(
        keras.losses.sparse_categorical_crossentropy(y, score(x, training=False), from_logits=True)
    )


def unlearn(case: Case, rnp: Rnp) -> keras.Model:
    """A copy of the BadNet after gradient ascent on clean data, stopped as soon as its
    clean held-out accuracy is at most `rnp.unlearn_until`. BatchNorm stays in inference
    mode: the masks are learnt, and the original pruned, for inference."""
    model = copy_model(case.badnet)
    weights = model.trainable_variables
    score = training.scores(model)
    optimizer = training.SGD(weights, rnp.unlearn_lr, rnp.momentum)

    @tf.function(reduce_retracing=True)
    def ascent(x, y):
        with tf.GradientTape() as tape:
            loss = _cross_entropy(score, x, y)
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

    @tf.function(reduce_retracing=True)
    def learn(x, y):
        masks.apply()
        with tf.GradientTape() as tape:
            loss = _cross_entropy(score, x, y)
        grads = masks.gradients(tape.gradient(loss, masks.params))
        optimizer.apply(grads)
        masks.clip()
        return {"loss": loss}

    case.run_steps(
        "rnp/mask", unlearned, learn, steps=rnp.mask_steps, batch_size=rnp.batch_size, seed_offset=1
    )
    masks.apply()
    return masks


def threshold_curve(case: Case, values: dict[str, np.ndarray], thresholds: np.ndarray):
    """Clean held-out accuracy of the BadNet with every channel whose mask is at most t
    zeroed, for each t."""
    probe = copy_model(case.badnet)
    binary = Masks(probe)
    curve = []
    for t in thresholds:
        for unit, m in zip(binary.units, binary.values, strict=True):
            m.assign((values[unit.name] > t).astype(np.float32))
        binary.apply()
        curve.append(accuracy(probe, case.clean.holdout, case.batch_size))
    return np.array(curve)


def repair(case: Case, rnp: Rnp):
    unlearned = unlearn(case, rnp)
    case.stage("unlearned", unlearned)
    values = recover(case, rnp, unlearned).numpy()
    everything = np.concatenate(list(values.values()))
    thresholds = np.round(np.arange(0.0, 1.0, rnp.threshold_step), 6)
    curve = threshold_curve(case, values, thresholds)
    pruned_at = np.array([(everything <= t).sum() for t in thresholds])
    held = {None: case.badnet_holdout_accuracy(), **dict(zip(thresholds, curve, strict=True))}
    # None, pruning nothing, comes first: it stays when even threshold 0 costs too much
    chosen = strongest_within(case, list(held), held.get, rnp.max_acc_drop, "rnp threshold")
    off = {name: m <= (chosen if chosen is not None else -1) for name, m in values.items()}
    pruned = copy_model(case.badnet)
    count = prune(pruned, off)
    case.journal.curves({"rnp/threshold_val_acc": curve, "rnp/threshold_pruned": pruned_at})
    case.journal.log({"rnp/channels_pruned": count, "rnp/channels": everything.size})
    if chosen is not None:
        case.journal.log({"rnp/threshold": float(chosen)})
    case.journal.note(
        rnp_threshold=None if chosen is None else float(chosen),
        rnp_masks={name: np.round(m, 4).tolist() for name, m in values.items()},
        rnp_thresholds=thresholds.tolist(),
        rnp_pruned_channels={name: np.flatnonzero(o).tolist() for name, o in off.items()},
    )
    title = f"RNP: {count} of {everything.size} channels pruned (mask <= {chosen})"
    figure = _figure(thresholds, curve, pruned_at, everything, chosen, title)
    case.journal.figure(figure, "rnp.png")
    return pruned


def _figure(thresholds, curve, pruned_at, masks, chosen: float | None, title: str):
    """The threshold curve (held-out accuracy and channels pruned against the mask
    threshold, the chosen one marked) beside the masks' histogram."""
    fig, (ax, hx) = plots.plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(thresholds, curve, "o-", label="clean held-out accuracy")
    if chosen is not None:
        ax.axvline(chosen, color="grey", ls=":", lw=1)
    ax.set_xlabel("mask threshold (channels with mask <= t zeroed)")
    ax.set_ylabel("clean held-out accuracy")
    ax.set_ylim(-0.02, 1.05)
    twin = ax.twinx()
    twin.plot(thresholds, pruned_at, "s--", color="tab:orange", label="channels pruned")
    twin.set_ylabel("channels pruned")
    ax.legend(loc="lower left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    hx.hist(masks, bins=40, range=(0, 1))
    hx.set_yscale("log")
    hx.set_xlabel("mask value")
    hx.set_ylabel("channels")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
