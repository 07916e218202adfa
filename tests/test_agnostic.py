"""Class-agnostic repairs (FT-SAM, RNP, SAU): each one's mechanism on two small nets built
here, a functional one without BatchNorm (two branches meeting in an Add, like DeepID) and
a Sequential one with BatchNorm and another input size; and what FT-SAM leaves of the
demo's backdoor (every repair end to end: test_end_to_end)."""

import mlflow
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from badnet_repair import data
from badnet_repair.defenses.clean import CleanData
from badnet_repair.defenses.repairs import Case, ft_sam, rnp, sau
from badnet_repair.experiment import pipeline, tracking
from badnet_repair.journal import Journal
from badnet_repair.network import models, predict, training
from badnet_repair.network.channels import Masks, units
from badnet_repair.network.predict import accuracy, predict_classes
from badnet_repair.network.pruning import copy_model

from conftest import compose_config

CLASSES = 5


def branches_net() -> keras.Model:
    """DeepID's shape in small: no BatchNorm, two branches added before the classifier."""
    x = inp = keras.Input((14, 12, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_a")(x)
    pool = keras.layers.MaxPooling2D(name="pool")(x)
    fc_1 = keras.layers.Dense(16, name="fc_1")(keras.layers.Flatten()(pool))
    x = keras.layers.Conv2D(8, 2, activation="relu", name="conv_b")(pool)
    fc_2 = keras.layers.Dense(16, name="fc_2")(keras.layers.Flatten()(x))
    x = keras.layers.Activation("relu")(keras.layers.Add()([fc_1, fc_2]))
    return keras.Model(inp, keras.layers.Dense(CLASSES, activation="softmax", name="out")(x))


def batchnorm_net() -> keras.Model:
    """Sequential conv -> BN -> ReLU, another input size, a separate softmax layer."""
    net = keras.Sequential(
        [
            keras.Input((10, 10, 3)),
            keras.layers.Conv2D(6, 3, padding="same", name="conv_a"),
            keras.layers.BatchNormalization(name="bn_a"),
            keras.layers.ReLU(),
            keras.layers.Conv2D(8, 3, name="conv_b"),
            keras.layers.BatchNormalization(name="bn_b"),
            keras.layers.ReLU(),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(CLASSES, name="out"),
            keras.layers.Activation("softmax"),
        ]
    )
    rng = np.random.default_rng(1)
    for layer in net.layers:  # statistics and affine parameters that are not the identity
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n), rng.normal(0, 0.3, n)]
                + [rng.uniform(0.5, 2.0, n)]
            )
    return net


@pytest.fixture(params=[branches_net, batchnorm_net], ids=["branches", "batchnorm"])
def net(request):
    keras.utils.set_random_seed(0)
    return request.param()


def images(model: keras.Model, n: int, seed: int = 0) -> np.ndarray:
    shape = model.input_shape[1:]
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


def labelled(model: keras.Model, n: int, seed: int, name: str) -> data.Dataset:
    """Images the net classifies correctly: the labels are its own answers."""
    x = images(model, n, seed)
    return data.Dataset(name, x, np.argmax(model.predict(x, verbose=0), axis=1))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One real MLflow store for the module (creating one takes seconds), with an
    experiment whose artifacts stay in the temporary folder."""
    root = tmp_path_factory.mktemp("mlruns")
    uri = f"sqlite:///{root}/mlflow.db"
    return uri, tracking.prepare(uri, "agnostic", str(root / "artifacts"))


@pytest.fixture
def case(net, store):
    """A Case over `net` with a real Journal inside a real MLflow run."""
    uri, experiment = store
    mlflow.set_tracking_uri(uri)
    train, holdout = labelled(net, 96, 1, "train"), labelled(net, 48, 2, "holdout")
    everything = data.Dataset("validation", np.concatenate([train.x, holdout.x]), None)
    with mlflow.start_run(experiment_id=experiment):
        yield Case(net, "conv_b", CleanData(everything, train, holdout), Journal(), 0, 64)


def test_scores_are_the_nets_own_before_its_softmax(net):
    x = images(net, 8)
    np.testing.assert_allclose(
        tf.nn.softmax(training.scores(net)(x)).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-6
    )


def test_a_mask_multiplies_its_channels_output_and_gets_the_chain_rule_gradient(net):
    found = units(net)
    assert [u.conv.name for u in found] == ["conv_a", "conv_b"]
    if net.name.startswith("sequential"):
        assert [u.scaled.name for u in found] == ["bn_a", "bn_b"]  # a mask on BN's output
    probe = keras.Model(net.inputs, [u.scaled.output for u in found])
    x = images(net, 16)
    before = [p.numpy() for p in Masks(net).params]
    unmasked = probe(x)
    masks = Masks(net)
    rng = np.random.default_rng(0)
    for i, m in enumerate(masks.values):  # one unit's mask at a time: its own output scales
        m.assign(rng.uniform(0, 1, m.shape).astype(np.float32))
        masks.apply()
        out = probe(x)[i].numpy()
        np.testing.assert_allclose(out, unmasked[i].numpy() * m.numpy(), rtol=1e-4, atol=1e-5)
        m.assign(np.ones(m.shape, np.float32))
    for m in masks.values:
        m.assign(rng.uniform(0, 1, m.shape).astype(np.float32))
    y = np.argmax(net.predict(x, verbose=0), axis=1)

    def loss() -> float:
        masks.apply()
        return float(keras.losses.sparse_categorical_crossentropy(y, net(x)).numpy().mean())

    with tf.GradientTape() as tape:
        masks.apply()
        value = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, net(x)))
    grads = masks.gradients(tape.gradient(value, masks.params))
    for m, g in zip(masks.values, grads, strict=True):
        h, c = 1e-2, 1
        m[c].assign(m[c] + h)
        up = loss()
        m[c].assign(m[c] - 2 * h)
        down = loss()
        m[c].assign(m[c] + h)
        assert float(g[c]) == pytest.approx((up - down) / (2 * h), rel=0.05, abs=1e-3)
    masks.restore()
    for p, b in zip(masks.params, before, strict=True):
        np.testing.assert_array_equal(p.numpy(), b)


@pytest.mark.slow
def test_rnp_masks_lie_in_0_1_and_pruned_channels_are_exactly_zero_when_saved(case, tmp_path):
    settings = rnp.Rnp(
        batch_size=32,
        unlearn_lr=0.01,
        unlearn_steps=30,
        unlearn_until=0.2,
        clip_norm=20.0,
        momentum=0.9,
        weight_decay=5e-4,
        mask_lr=0.5,
        mask_steps=20,
        threshold_step=0.1,
        max_acc_drop=1.0,  # every threshold within: the largest, 0.9, is chosen
        margin_se=1.0,
    )
    repaired = rnp.repair(case, settings)
    masks = case.journal.notes["rnp_masks"]
    values = np.concatenate([np.asarray(m) for m in masks.values()])
    assert values.min() >= 0 and values.max() <= 1 and values.min() < 1
    assert case.journal.metrics["rnp/threshold"] == 0.9
    assert case.journal.metrics["rnp/channels_pruned"] == (values <= 0.9).sum() > 0
    pruned = case.journal.notes["rnp_pruned_channels"]
    saved = models.load_model(models.save_model(repaired, tmp_path / "rnp.h5"))
    found = units(saved)
    probe = keras.Model(saved.inputs, [u.scaled.output for u in found])
    outputs = probe(images(saved, 32, seed=9) * 5 - 2)  # any input, negative pixels too
    for unit, out in zip(found, outputs, strict=True):
        off = pruned[unit.name]
        assert np.all(out.numpy()[..., off] == 0)
        assert np.all(unit.conv.kernel.numpy()[..., off] == 0)
        if unit.scaled is not unit.conv:  # nothing leaks through BN's shift
            assert np.all(unit.scaled.beta.numpy()[off] == 0)
    assert "rnp.png" in artifacts()


@pytest.mark.slow
def test_rnp_unlearning_stops_as_soon_as_clean_accuracy_is_at_most_the_floor(case):
    settings = rnp.Rnp(32, 0.01, 200, 0.2, 20.0, 0.9, 5e-4, 0.2, 1, 0.1, 0.02)
    unlearned = rnp.unlearn(case, settings)
    history = series("rnp/unlearn/val_acc")
    assert history[-1] <= 0.2 < min(history[:-1], default=1.0)
    assert accuracy(unlearned, case.clean.holdout) == history[-1]
    assert accuracy(case.badnet, case.clean.holdout) == 1.0  # the BadNet itself untouched


def series(name: str) -> list[float]:
    run = mlflow.active_run().info.run_id
    return [m.value for m in mlflow.MlflowClient().get_metric_history(run, name)]


def artifacts() -> set[str]:
    run = mlflow.active_run().info.run_id
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run)}


@pytest.mark.parametrize("eps", [0.03, 0.2])
def test_sau_perturbation_stays_within_eps(net, eps):
    other = copy_model(net)
    for w in other.trainable_variables:
        w.assign_add(tf.random.normal(w.shape, stddev=0.05, seed=1))
    x = tf.constant(images(net, 32))
    y = tf.constant(np.argmax(net.predict(x, verbose=0), axis=1))
    h, h0 = training.scores(other), training.scores(net)
    for step in (eps, 3 * eps):
        delta, _ = sau.shared_pgd(h, h0, x, y, eps, step, 5)
        assert delta.shape == x.shape
        assert float(tf.reduce_max(tf.abs(delta))) <= eps * (1 + 1e-6)


def test_sau_shared_loss_keeps_its_gradient_where_the_probability_saturates():
    moderate = tf.constant([[1.0, 0.5, -0.3]])
    p = tf.nn.softmax(moderate)[0, 1]
    value = sau.minus_log_not(moderate, tf.constant([1]))
    assert float(value[0]) == pytest.approx(-np.log(1 - float(p)), rel=1e-5)
    saturated = tf.Variable([[40.0, 0.0, 0.0]])  # p(0) = 1 - 4e-18: a clamp at 0.999 is flat
    with tf.GradientTape() as tape:
        value = sau.minus_log_not(saturated, tf.constant([0]))
    grad = tape.gradient(value, saturated).numpy()
    assert np.isfinite(float(value[0])) and float(value[0]) == pytest.approx(40 - np.log(2))
    np.testing.assert_allclose(grad, [[1.0, -0.5, -0.5]], atol=1e-6)


@pytest.mark.slow
def test_sau_trains_the_copy_with_batchnorm_in_inference_mode(net):
    reference, model = copy_model(net), copy_model(net)
    frozen = [v.numpy() for v in model.non_trainable_variables]
    before = [w.numpy() for w in model.trainable_variables]
    settings = sau.Sau(1, 32, 1e-3, [0.1], 3, 0.02)
    x = images(net, 32)
    y = np.argmax(net.predict(x, verbose=0), axis=1).astype(np.int32)
    values = sau.sau_step(model, reference, settings, 0.1)(x, y)
    assert {"loss", "shared_loss", "shared", "suspect"} <= set(values)
    for v, f in zip(model.non_trainable_variables, frozen, strict=True):
        np.testing.assert_array_equal(v.numpy(), f)  # BatchNorm statistics untouched
    weights = zip(model.trainable_variables, before, strict=True)
    assert any(not np.array_equal(w.numpy(), b) for w, b in weights)
    for a, b in zip(reference.get_weights(), net.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # the frozen BadNet stays as it was


@pytest.mark.slow
def test_ft_sam_step_restores_the_weights_and_differs_from_plain_sgd(net):
    x = images(net, 32)
    y = np.argmax(net.predict(x, verbose=0), axis=1).astype(np.int32)
    settings = ft_sam.FtSam(1, 32, [0.05], 0.5, 0.9, 5e-4, 0.1, 0.0, 0.0, [0.02, 0.4], 0.02)
    plain = ft_sam.FtSam(1, 32, [0.05], 0.0, 0.9, 5e-4, 0.1, 0.0, 0.0, [0.02, 0.4], 0.02)

    def stepped(config, lr):
        model = copy_model(net)
        values = ft_sam.sam_step(model, config, lr, CLASSES)(x, y)
        return model, values

    standing, values = stepped(settings, 0.0)  # no update: only the perturbation, undone
    assert float(values["perturbed_loss"]) > float(values["loss"])
    unmoved, _ = stepped(plain, 0.0)
    for a, b, c in zip(standing.weights, net.weights, unmoved.weights, strict=True):
        if "moving_" in a.name:  # the clean pass updates BN's statistics, the perturbed not
            np.testing.assert_array_equal(a.numpy(), c.numpy())
        else:
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    sam_model, _ = stepped(settings, 0.05)
    sgd_model, _ = stepped(plain, 0.05)
    moved = [
        not np.allclose(a, b)
        for a, b in zip(sam_model.get_weights(), sgd_model.get_weights(), strict=True)
    ]
    assert any(moved)


def test_a_step_and_the_evaluation_are_traced_once_for_every_batch_size():
    """A repair's step and `predict_classes` read batches of any size through one trace
    (`training.batch_signature`, `predict.any_batch`): a trace for the first batch's size
    would be followed by another for the last, smaller one, in every run."""
    model = branches_net()
    x = np.random.default_rng(0).uniform(0, 1, (600, 14, 12, 3)).astype(np.float32)
    y = np.arange(600, dtype=np.int32) % CLASSES
    settings = ft_sam.FtSam(1, 32, [0.05], 0.5, 0.9, 5e-4, 0.1, 0.0, 0.0, [0.02, 0.4], 0.02)
    step = ft_sam.sam_step(model, settings, 0.01, CLASSES)
    step(x[:32], y[:32])
    step(x[:7], y[:7])
    assert step.experimental_get_tracing_count() == 1
    assert len(predict_classes(model, x, batch_size=512)) == 600  # batches of 512 and 88
    assert predict._argmax_fn(model).experimental_get_tracing_count() == 1


@pytest.mark.slow
def test_ft_sam_removes_much_of_the_demos_backdoor(tmp_path, demo_dir):
    """At cheaper settings (60 steps, a 20-point budget, one learning rate the budget keeps
    without halving), FT-SAM leaves at least 20 points less ASR than the BadNet's
    (fine-pruning, at its defaults, 3 points less), for at most 10 points of clean
    accuracy. (RNP and SAU leave the demo's backdoor in: measured on the leaderboard,
    docs/leaderboard.md.) Scored on the whole test file: on the small evaluation set's
    200 clean images its cost read 13 points (2026-12-05)."""
    cheap = ["repair=ft_sam", "ft_sam.lrs=[0.0125]", "ft_sam.steps=60", "ft_sam.max_acc_drop=0.2"]
    metrics = pipeline.run(compose_config(tmp_path, demo_dir, *cheap))
    assert metrics["repaired/asr/patch"] < metrics["badnet/asr/patch"] - 0.2
    assert metrics["repaired/clean_acc"] > metrics["badnet/clean_acc"] - 0.1
