"""ANP, Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021): channels that an adversarial
perturbation of the neurons easily turns to the backdoor are the ones to prune.

Every channel of every conv and hidden Dense layer (`channels.units`, BatchNorm or not)
gets a multiplier on its output: a mask m in [0, 1], learnt, from 1, and on the
perturbed pass a perturbation delta in [-eps, eps], so that its output is scaled by
m + delta (perturbed) or m (natural). A multiplier is applied by scaling the conv's
kernel and bias (BN's gamma and beta where a BN follows), which scales the output
before the activation: the same as scaling the output for a ReLU and a multiplier >= 0,
and what the authors' code does to a BN's output otherwise (see `channels.Masks`).

Each step, on a clean batch: delta from uniform noise in [-eps, eps], then
`anp.perturb_steps` signed-gradient ascent steps of eps / perturb_steps on the
cross-entropy, clipped to [-eps, eps]; the loss alpha * L(m) + (1 - alpha) * L(m + delta),
one SGD step (momentum) on m, m clipped to [0, 1]. BatchNorm stays in inference mode.

Then `mask_pruning`: the BadNet's channels whose mask is at most the largest threshold
whose clean held-out accuracy stays within `anp.max_acc_drop` of the BadNet's are zeroed;
the other channels keep their weights (multiplier 1, as the paper prunes). The net with
the learnt masks themselves is handed back as the stage `masked`.
"""

from dataclasses import dataclass

import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair.defenses.mask_pruning import prune_by_threshold
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network import training
from badnet_repair.network.channels import Masks
from badnet_repair.network.pruning import copy_model
from badnet_repair.ranges import ranged


@dataclass
class Anp:
    """anp.*: `steps` mask steps of `batch_size` clean images, the perturbation (`eps`,
    `perturb_steps`), the loss's weight `alpha` on the natural term, and the pruning rule."""

    batch_size: int = ranged(MISSING, ">= 1")
    steps: int = ranged(MISSING, ">= 1")
    mask_lr: float = ranged(MISSING, "> 0")
    momentum: float = ranged(MISSING, "[0, 1)")
    eps: float = ranged(MISSING, ">= 0")
    perturb_steps: int = ranged(MISSING, ">= 1")
    alpha: float = ranged(MISSING, "[0, 1]")
    threshold_step: float = ranged(MISSING, "(0, 1)")
    max_acc_drop: float = ranged(MISSING, "[0, 1)")
    margin_se: float = ranged(MISSING, ">= 0")


@dataclass
class Settings(RepairSettings):
    anp: Anp = MISSING


def describe(anp: Anp) -> str:
    return (
        f"eps {anp.eps:g}, alpha {anp.alpha:g}, {anp.steps} mask steps, "
        f"max_acc_drop {anp.max_acc_drop:g}"
    )


@dataclass
class Learnt:
    """The masks ANP learnt on `model` (a copy of the BadNet, masks applied) and the
    perturbation of its last step."""

    model: keras.Model
    masks: Masks
    deltas: list[tf.Variable]


def learn(case: Case, anp: Anp) -> Learnt:
    """Masks in [0, 1], from 1, learnt against adversarial perturbations of the channels."""
    model = copy_model(case.badnet)
    masks = Masks(model, dense=True)
    score = training.scores(model)
    optimizer = training.SGD(masks.values, anp.mask_lr, anp.momentum)
    deltas = [tf.Variable(tf.zeros_like(m), trainable=False) for m in masks.values]
    noise = tf.random.Generator.from_seed(case.seed)
    eps, alpha, size = anp.eps, anp.alpha, anp.eps / anp.perturb_steps

    def loss_and_gradients(multipliers, x, y):
        """The loss with the channels scaled by `multipliers`, and its gradients in them."""
        masks.scale(multipliers)
        with tf.GradientTape() as tape:
            loss = training.cross_entropy(score, x, y)
        return loss, masks.gradients(tape.gradient(loss, masks.params))

    def perturbed():
        return [m + d for m, d in zip(masks.values, deltas, strict=True)]

    @tf.function(input_signature=training.batch_signature(model), autograph=False)
    def step(x, y):
        for d in deltas:
            d.assign(noise.uniform(d.shape, -eps, eps))
        for _ in range(anp.perturb_steps):
            _, grads = loss_and_gradients(perturbed(), x, y)
            for d, g in zip(deltas, grads, strict=True):
                d.assign(tf.clip_by_value(d + size * tf.sign(g), -eps, eps))
        robust, robust_grads = loss_and_gradients(perturbed(), x, y)
        natural, natural_grads = loss_and_gradients(masks.values, x, y)
        optimizer.apply(
            [
                alpha * n + (1.0 - alpha) * r
                for n, r in zip(natural_grads, robust_grads, strict=True)
            ]
        )
        masks.clip()
        masks.apply()
        loss = alpha * natural + (1.0 - alpha) * robust
        return {"loss": loss, "natural_loss": natural, "robust_loss": robust}

    case.run_steps("anp/mask", model, step, steps=anp.steps, batch_size=anp.batch_size)
    masks.apply()
    return Learnt(model, masks, deltas)


def repair(case: Case, anp: Anp):
    learnt = learn(case, anp)
    case.stage("masked", learnt.model)
    values = learnt.masks.numpy()
    return prune_by_threshold(
        case, "anp", "ANP", values, anp.threshold_step, anp.max_acc_drop, anp.margin_se, dense=True
    )
