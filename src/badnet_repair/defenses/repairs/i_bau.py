"""I-BAU, Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

Unlearning as a minimax game on clean data: the inner player finds the universal
adversarial perturbation (UAP) delta, one L2-bounded perturbation added to every image,
that most changes the net's answers (a backdoor's trigger is such a perturbation, and
on a BadNet the easiest); the outer player trains the net to answer the true label on
images carrying it. No target class and no BatchNorm are needed.

Per round (`i_bau.rounds`): delta from zero by `uap_steps` normalised gradient-ascent
steps on the cross-entropy against the net's own clean answers, projected onto the L2
ball of radius eps * sqrt(pixels) * (the clean images' value range) (eps is a
root-mean-square share of the range: the paper's bound 10 on CIFAR-10 is 0.18); then
`steps` outer Adam steps on batches whose first `portion` carry delta, the gradient
being the implicit hypergradient (`hypergradient`): the direct gradient plus the
response of delta to the weights, through `fixed_point_terms` terms of the Neumann
series of the inner problem's fixed-point map, computed on the batch's first
`implicit_images` images. As in the authors' code, that inner problem is the
unconstrained regularised one (minus the cross-entropy plus `l2` ||delta||^2, gradient
steps of `inner_lr`): the projection is left out of the hypergradient.

The bound is set per net by the accuracy-budget rule (`i_bau.eps`, tried from the
smallest): a universal perturbation as large as the paper's fools every image of a small
net without BatchNorm, and unlearning it wrecks the net.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair.defenses.budget import increasing, rung, shown, strongest_run
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network import training
from badnet_repair.network.pruning import copy_model
from badnet_repair.ranges import ranged


@dataclass
class IBau:
    """i_bau.*: `rounds` of (a UAP, then `steps` outer steps), per bound of the ladder `eps`
    (each key is described in conf/repair/i_bau.yaml)."""

    rounds: int = ranged(MISSING, ">= 1")
    steps: int = ranged(MISSING, ">= 1")
    batch_size: int = ranged(MISSING, ">= 1")
    portion: float = ranged(MISSING, "(0, 1]")
    lr: float = ranged(MISSING, "> 0")
    eps: list[float] = MISSING
    uap_steps: int = ranged(MISSING, ">= 1")
    uap_step: float = ranged(MISSING, "> 0")
    fixed_point_terms: int = ranged(MISSING, ">= 0")
    implicit_images: int = ranged(MISSING, ">= 0")
    inner_lr: float = ranged(MISSING, "> 0")
    l2: float = ranged(MISSING, ">= 0")
    max_acc_drop: float = ranged(MISSING, "[0, 1)")
    margin_se: float = ranged(MISSING, ">= 0")

    def check(self) -> None:
        increasing(self.eps, "i_bau.eps")


@dataclass
class Settings(RepairSettings):
    i_bau: IBau = MISSING


def describe(i_bau: IBau) -> str:
    return f"eps {shown(i_bau.eps)}, lr {i_bau.lr:g}, {i_bau.rounds}x{i_bau.steps} steps"


def hypergradient(
    outer: Callable[[tf.Tensor], tf.Tensor],
    inner: Callable[[tf.Tensor], tf.Tensor],
    delta: tf.Tensor,
    weights: list[tf.Variable],
    inner_lr: float,
    terms: int,
) -> tuple[tf.Tensor, list[tf.Tensor]]:
    """The total derivative of outer(delta*(w), w) in the weights w, where delta* is a
    fixed point of delta -> delta - inner_lr * grad_delta inner(delta, w) (the implicit
    function theorem): d_w outer - inner_lr * d_w [grad_delta inner . v], with
    v = sum_{k=0..terms} (I - inner_lr * hess_delta inner)^k d_delta outer, the Neumann
    series of inner_lr * hess^-1 cut after `terms` Hessian-vector products. `outer` and
    `inner` are functions of delta that read the weights. Returns (outer, gradients)."""
    with tf.GradientTape() as tape:
        tape.watch(delta)
        value = outer(delta)
    direct = tape.gradient(value, [delta, *weights], unconnected_gradients="zero")
    g_delta, g_weights = direct[0], direct[1:]

    def grad_inner_dot(vector, wrt):
        with tf.GradientTape() as second:
            second.watch(delta)
            with tf.GradientTape() as first:
                first.watch(delta)
                loss = inner(delta)
            dot = tf.reduce_sum(first.gradient(loss, delta) * tf.stop_gradient(vector))
        return second.gradient(dot, wrt, unconnected_gradients="zero")

    v = term = g_delta
    for _ in range(terms):
        term = term - inner_lr * grad_inner_dot(term, delta)
        v = v + term
    mixed = grad_inner_dot(v, weights)
    return value, [g - inner_lr * m for g, m in zip(g_weights, mixed, strict=True)]


def universal_perturbation(score, shape, radius: float, steps: int, step: float):
    """A tf.function of (images, `steps` rows of batch indices): the perturbation of
    L2 norm <= `radius` that most raises the cross-entropy of `score` against its own clean
    answers, by normalised gradient ascent from zero, projected after every step."""

    @tf.function(reduce_retracing=True, autograph=False)
    def find(images, picks):
        def ascend(i, delta):
            x = tf.gather(images, picks[i])
            answers = tf.argmax(score(x), -1)
            with tf.GradientTape() as tape:
                tape.watch(delta)
                loss = _cross_entropy(score(x + delta), answers)
            g = tape.gradient(loss, delta)
            delta = delta + step * radius * g / (tf.norm(g) + 1e-12)
            return i + 1, delta * tf.minimum(1.0, radius / (tf.norm(delta) + 1e-12))

        start = (tf.constant(0), tf.zeros(shape, images.dtype))
        return tf.while_loop(lambda i, _: i < steps, ascend, start)[1]

    return find


def _cross_entropy(scores, y) -> tf.Tensor:
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, scores, from_logits=True))


def unlearning_step(model: keras.Model, i_bau: IBau, lr: float):
    """One outer step on `model` in place, as a tf.function of (batch, labels, delta)."""
    score, weights = training.scores(model), model.trainable_variables
    optimizer = training.Adam(weights, lr)
    perturbation = tf.TensorSpec(model.input_shape[1:], tf.float32)

    @tf.function(input_signature=[*training.batch_signature(model), perturbation], autograph=False)
    def step(x, y, delta):
        y = tf.cast(y, tf.int64)
        carried = tf.cast(tf.range(tf.shape(x)[0]), tf.float32) < i_bau.portion * tf.cast(
            tf.shape(x)[0], tf.float32
        )
        where = tf.reshape(tf.cast(carried, x.dtype), [-1, 1, 1, 1])
        few = x[: i_bau.implicit_images]
        answers = tf.argmax(score(few), -1)

        def outer(d):
            return _cross_entropy(score(x + where * d), y)

        def inner(d):
            return -_cross_entropy(score(few + d), answers) + i_bau.l2 * tf.reduce_sum(d * d)

        if i_bau.implicit_images == 0:  # the direct gradient: adversarial training on delta
            with tf.GradientTape() as tape:
                loss = outer(delta)
            grads = tape.gradient(loss, weights)
        else:
            loss, grads = hypergradient(
                outer, inner, delta, weights, i_bau.inner_lr, i_bau.fixed_point_terms
            )
        optimizer.apply(grads)
        return {"loss": loss}

    return step


def radius(eps: float, x: np.ndarray) -> float:
    """The L2 bound on delta: `eps` as a root-mean-square share of the images' value range."""
    return float(eps * np.sqrt(np.prod(x.shape[1:])) * (x.max() - x.min()))


def repair(case: Case, i_bau: IBau):
    train_x = case.clean.train.x
    images = tf.constant(train_x)
    rng = np.random.default_rng(case.seed)
    draws = [
        rng.choice(len(train_x), (i_bau.uap_steps, min(i_bau.batch_size, len(train_x))))
        for _ in range(i_bau.rounds)
    ]

    def train(eps: float) -> keras.Model:
        model = copy_model(case.badnet)
        score = training.scores(model)
        bound = radius(eps, train_x)
        find = universal_perturbation(
            score, train_x.shape[1:], bound, i_bau.uap_steps, i_bau.uap_step
        )
        outer = unlearning_step(model, i_bau, i_bau.lr)
        state = {"taken": 0, "delta": None}

        def step(x, y):
            if state["taken"] % i_bau.steps == 0:  # a new round: a new UAP
                state["delta"] = find(images, draws[state["taken"] // i_bau.steps])
            state["taken"] += 1
            values = outer(x, y, state["delta"])
            values["uap_norm"] = tf.norm(state["delta"])
            return values

        case.run_steps(
            f"i_bau/eps_{rung(eps)}",
            model,
            step,
            steps=i_bau.rounds * i_bau.steps,
            batch_size=i_bau.batch_size,
        )
        return model

    return strongest_run(
        case, "i_bau", "eps", i_bau.eps, train, i_bau.max_acc_drop, i_bau.margin_se
    )[1]
