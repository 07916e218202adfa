"""SAU, Shared Adversarial Unlearning (Wei et al., NeurIPS 2023).

A trainable copy h of the BadNet is taught to resist the adversarial perturbations it
shares with the frozen BadNet h0: a trigger is such a perturbation, and one that fools
both models the same way is the kind a backdoor provides. Per batch of clean images:

- inner PGD: an L-infinity perturbation delta within eps, started at +eps, moved
  `sau.pgd_steps` times by -eps * sign(grad) and clipped (each pixel's delta is -eps, 0
  or +eps, as the reference's step equals its bound), minimising
  0.01 * L_adv + L_JS: L_adv is minus the cross-entropy of the samples that do not yet
  fool each model, L_JS the Jensen-Shannon divergence of h's and h0's answers on the
  samples not yet shared (both fooled, into the same class). It stops early once all are
  shared. eps is in the model's input units, i.e. after `data.scale`: with the default
  1/255 that is 0..1 pixel units, BackdoorBench's (x + delta is not clipped either);
- outer step on h: cross-entropy on the clean batch, plus, for the samples whose
  perturbation moves h0 off both the label and its clean answer (y0), -log(1 - p_h(y0))
  on the perturbed image, summed and divided by the batch size. It is computed from the
  scores as log-sum-exp over all classes minus over the classes but y0, so it keeps its
  gradient where p_h(y0) is near 1 (a clamp of p to [0.001, 0.999] goes flat there).

BatchNorm stays in inference mode in both models. eps comes from the accuracy budget:
the bounds `sau.eps` are tried from the smallest, each as a whole run from the BadNet,
and the largest whose clean held-out accuracy stays within `sau.max_acc_drop` is kept
(the reference's 0.2 finds adversarial examples for nearly every clean image of a small
net without BatchNorm, not only trigger-like ones, and costs it many points).
"""

from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair.defenses.budget import increasing, rung, shown, strongest_run
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network import training
from badnet_repair.network.pruning import copy_model
from badnet_repair.ranges import ranged

ADV_WEIGHT = 0.01  # beta1 of L_adv against L_JS in the inner objective, as the reference


@dataclass
class Sau:
    """sau.*: `steps` outer steps (Adam at `lr`) per run over batches of `batch_size` clean
    images; the inner PGD's bounds `eps`, tried from the smallest until one falls out of
    the `max_acc_drop` budget, and its `pgd_steps`."""

    steps: int = ranged(MISSING, ">= 1")
    batch_size: int = ranged(MISSING, ">= 1")
    lr: float = ranged(MISSING, "> 0")
    eps: list[float] = MISSING
    pgd_steps: int = ranged(MISSING, ">= 1")
    max_acc_drop: float = ranged(MISSING, "[0, 1)")
    margin_se: float = ranged(MISSING, ">= 0")

    def check(self) -> None:
        increasing(self.eps, "sau.eps")


@dataclass
class Settings(RepairSettings):
    sau: Sau = MISSING


def describe(sau: Sau) -> str:
    return f"eps {shown(sau.eps)}, lr {sau.lr:g}, {sau.steps} steps"


def _cross_entropy(scores, y):
    return keras.losses.sparse_categorical_crossentropy(y, scores, from_logits=True)


def _js(scores, scores0):
    """Jensen-Shannon divergence of two softmaxes, per sample."""
    p, q = tf.nn.softmax(scores), tf.nn.softmax(scores0)
    m = tf.maximum(0.5 * (p + q), 1e-8)
    p, q = tf.maximum(p, 1e-8), tf.maximum(q, 1e-8)
    kl = lambda a: tf.reduce_sum(a * (tf.math.log(a) - tf.math.log(m)), axis=-1)  # noqa: E731
    return 0.5 * kl(p) + 0.5 * kl(q)


def _unless(flags):
    return 1.0 - tf.cast(flags, tf.float32)


def shared_pgd(h, h0, x, y, eps: float, step: float, steps: int):
    """The perturbation (within [-eps, eps]) that fools `h` and `h0` alike, per sample;
    `h`, `h0` give scores. Also returns the share of the batch shared at the last check.
    The steps are unrolled (a traced while loop holding a gradient tape ran 1.6 times
    slower); once every sample is shared, delta no longer moves."""
    clean, clean0 = tf.argmax(h(x), -1), tf.argmax(h0(x), -1)
    delta = tf.fill(tf.shape(x), tf.cast(eps, x.dtype))
    n = tf.cast(tf.shape(x)[0], tf.float32)
    done = tf.constant(False)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(delta)
            s, s0 = h(x + delta), h0(x + delta)
            pred, pred0 = tf.argmax(s, -1), tf.argmax(s0, -1)
            fooled, fooled0 = pred != clean, pred0 != clean0
            shared = fooled & fooled0 & (pred == pred0)
            adv = -(
                tf.reduce_sum(_unless(fooled) * _cross_entropy(s, y))
                + tf.reduce_sum(_unless(fooled0) * _cross_entropy(s0, y))
            ) / (2 * n)
            objective = ADV_WEIGHT * adv + tf.reduce_sum(_unless(shared) * _js(s, s0)) / n
        done = done | tf.reduce_all(shared)
        moved = tf.clip_by_value(delta - step * tf.sign(tape.gradient(objective, delta)), -eps, eps)
        delta = tf.where(done, delta, moved)
    return tf.stop_gradient(delta), tf.reduce_mean(tf.cast(shared, tf.float32))


def minus_log_not(scores, label):
    """-log(1 - softmax(scores)[label]) from the scores: log-sum-exp over every class
    minus log-sum-exp over every class but `label`."""
    others = tf.where(tf.one_hot(label, tf.shape(scores)[-1]) > 0, -float("inf"), scores)
    return tf.reduce_logsumexp(scores, -1) - tf.reduce_logsumexp(others, -1)


def sau_step(h_model: keras.Model, h0_model: keras.Model, sau: Sau, eps: float):
    """One SAU step on `h_model` in place, as a tf.function of a batch."""
    h, h0 = training.scores(h_model), training.scores(h0_model)
    weights = h_model.trainable_variables
    optimizer = training.Adam(weights, sau.lr)

    @tf.function(input_signature=training.batch_signature(h_model), autograph=False)
    def step(x, y):
        y = tf.cast(y, tf.int64)
        delta, shared = shared_pgd(h, h0, x, y, eps, eps, sau.pgd_steps)
        perturbed = x + delta
        y0 = tf.argmax(h0(perturbed), -1)
        suspect = (y0 != y) & (y0 != tf.argmax(h0(x), -1))
        with tf.GradientTape() as tape:
            clean_loss = tf.reduce_mean(_cross_entropy(h(x), y))
            shared_loss = tf.reduce_sum(
                tf.cast(suspect, tf.float32) * minus_log_not(h(perturbed), y0)
            ) / tf.cast(tf.shape(y)[0], tf.float32)
            loss = clean_loss + shared_loss
        grads = tape.gradient(loss, weights)
        optimizer.apply(grads)
        return {
            "loss": loss,
            "shared_loss": shared_loss,
            "shared": shared,
            "suspect": tf.reduce_mean(tf.cast(suspect, tf.float32)),
        }

    return step


def repair(case: Case, sau: Sau):
    reference = copy_model(case.badnet)

    def train(eps: float) -> keras.Model:
        model = copy_model(case.badnet)
        step = sau_step(model, reference, sau, eps)
        case.run_steps(
            f"sau/eps_{rung(eps)}", model, step, steps=sau.steps, batch_size=sau.batch_size
        )
        return model

    return strongest_run(case, "sau", "eps", sau.eps, train, sau.max_acc_drop, sau.margin_se)[1]
