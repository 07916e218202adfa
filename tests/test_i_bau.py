"""I-BAU's mechanism: the implicit hypergradient against a finite difference of the outer
loss at the inner problem's solution, the universal perturbation within its bound, and
the outer step on nets with and without BatchNorm."""

import numpy as np
import pytest
import tensorflow as tf
from test_agnostic import CLASSES, batchnorm_net, branches_net

from badnet_repair.defenses.repairs import i_bau
from badnet_repair.network import training

LAMBDA, STEP = 1.0, 0.1  # a strongly convex inner problem, solved by gradient steps


def toy_problem(seed: int = 0):
    """A linear softmax classifier (the outer variables W, b) and a universal
    perturbation delta of its 6 inputs: inner = -CE(own answers) + LAMBDA ||delta||^2,
    outer = CE(true labels) on the perturbed inputs, all in float64."""
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.normal(size=(12, 6)))
    y = tf.constant(rng.integers(0, 3, 12))
    w = tf.Variable(rng.normal(scale=0.3, size=(6, 3)))
    b = tf.Variable(rng.normal(scale=0.3, size=(3,)))
    answers = tf.argmax(x @ w + b, -1)

    def ce(labels, d):
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels, (x + d) @ w + b)
        )

    def inner(d):
        return -ce(answers, d) + LAMBDA * tf.reduce_sum(d * d)

    return w, b, (lambda d: ce(y, d)), inner


def solve(inner, steps: int = 300) -> tf.Tensor:
    """delta*: the fixed point of delta -> delta - STEP grad inner(delta) (each step
    contracts the error by about 1 - 2 STEP LAMBDA = 0.8: 300 steps reach float64's
    precision), as one TensorFlow graph: 300 eager steps took 2.5 s a solve."""

    @tf.function
    def fixed_point():
        delta = tf.zeros(6, tf.float64)
        for _ in tf.range(steps):
            with tf.GradientTape() as tape:
                tape.watch(delta)
                value = inner(delta)
            delta = delta - STEP * tape.gradient(value, delta)
        return delta

    return fixed_point()


@pytest.mark.slow
def test_hypergradient_matches_a_finite_difference_of_the_outer_loss_at_the_solution():
    w, b, outer, inner = toy_problem()
    delta = solve(inner)
    _, (g_w, g_b) = i_bau.hypergradient(outer, inner, delta, [w, b], STEP, terms=200)
    with tf.GradientTape() as tape:
        direct_w = tape.gradient(outer(delta), w)

    h = 1e-5
    for i, j in [(0, 0), (2, 1), (5, 2)]:
        values = []
        for sign in (1, -1):
            w[i, j].assign(w[i, j] + sign * h)
            values.append(float(outer(solve(inner))))
            w[i, j].assign(w[i, j] - sign * h)
        finite = (values[0] - values[1]) / (2 * h)
        assert g_w[i, j].numpy() == pytest.approx(finite, rel=1e-4, abs=1e-8)
    # the implicit term is not negligible here: the direct gradient alone is off
    assert np.abs(direct_w.numpy() - g_w.numpy()).max() > 1e-3
    assert g_b.shape == b.shape


@pytest.mark.slow
def test_hypergradient_without_neumann_terms_is_the_first_order_approximation():
    """terms = 0: v = d_delta outer, the implicit term STEP * the mixed derivative alone."""
    w, b, outer, inner = toy_problem(1)
    delta = solve(inner)
    _, (g0, _) = i_bau.hypergradient(outer, inner, delta, [w, b], STEP, terms=0)
    _, (g200, _) = i_bau.hypergradient(outer, inner, delta, [w, b], STEP, terms=200)
    with tf.GradientTape() as tape:
        direct = tape.gradient(outer(delta), w)
    assert not np.allclose(g0, g200, atol=1e-6)
    assert not np.allclose(g0, direct, atol=1e-6)


@pytest.mark.parametrize("make", [branches_net, batchnorm_net])
@pytest.mark.parametrize("eps", [0.01, 0.2])
def test_universal_perturbation_stays_within_its_bound_and_raises_the_loss(make, eps):
    net = make()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, *net.input_shape[1:])).astype(np.float32)
    bound = i_bau.radius(eps, x)
    score = training.scores(net)
    find = i_bau.universal_perturbation(score, x.shape[1:], bound, 8, 0.5)
    delta = find(tf.constant(x), rng.choice(64, (8, 16)))
    assert float(tf.norm(delta)) <= bound * (1 + 1e-5)
    answers = tf.argmax(score(x), -1)
    loss = lambda d: float(i_bau._cross_entropy(score(x + d), answers))  # noqa: E731
    assert loss(delta) > loss(tf.zeros_like(delta))


def test_radius_is_a_root_mean_square_share_of_the_value_range():
    x = np.zeros((3, 4, 5, 3), np.float32)
    x[0, 0, 0, 0] = 2.0
    assert i_bau.radius(0.1, x) == pytest.approx(0.1 * np.sqrt(60) * 2.0)


# with 4 implicit images, over 3 s on 2 cores
@pytest.mark.parametrize("implicit_images", [0, pytest.param(4, marks=pytest.mark.slow)])
def test_outer_step_trains_the_net_and_leaves_batchnorm_statistics_alone(implicit_images):
    net = batchnorm_net()
    settings = i_bau.IBau(
        rounds=1,
        steps=1,
        batch_size=16,
        portion=0.5,
        lr=1e-2,
        eps=[0.1],
        uap_steps=1,
        uap_step=0.5,
        fixed_point_terms=1,
        implicit_images=implicit_images,
        inner_lr=0.1,
        l2=0.001,
        max_acc_drop=0.02,
        margin_se=1.0,
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 10, 10, 3)).astype(np.float32)
    y = rng.integers(0, CLASSES, 16)
    statistics = [v.numpy() for v in net.non_trainable_variables]
    weights = [v.numpy() for v in net.trainable_variables]
    delta = tf.constant(rng.normal(scale=0.1, size=(10, 10, 3)).astype(np.float32))
    values = i_bau.unlearning_step(net, settings, settings.lr)(x, y, delta)
    assert np.isfinite(float(values["loss"]))
    after = [v.numpy() for v in net.non_trainable_variables]
    assert all(np.array_equal(a, b) for a, b in zip(statistics, after, strict=True))
    trained = [v.numpy() for v in net.trainable_variables]
    assert any(not np.array_equal(a, b) for a, b in zip(weights, trained, strict=True))
