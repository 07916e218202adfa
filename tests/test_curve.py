"""The one-pass pruning curve equals pruning and evaluating at every k."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from badnet_repair import files
from badnet_repair.data import Dataset
from badnet_repair.network import curve, pruning, topology
from badnet_repair.network.predict import accuracy


@pytest.fixture(scope="module")
def ranked(demo_model, demo_data):
    validation, _, poisoned = demo_data
    order = pruning.rank_channels(demo_model, "conv_3", validation.x)
    curves = curve.pruning_curve(
        demo_model, "conv_3", order, {"val": validation, "asr": poisoned}, batch_size=300
    )
    return order, curves


def test_demo_deepid_takes_the_linear_update_path(demo_model):
    fast = curve.evaluator_for(demo_model, "conv_3")
    assert isinstance(fast, curve._LinearTail) and fast.firsts == ["conv_4", "fc_1"]
    assert fast.rest == ["flatten_2", "fc_2", "add_1", "activation_1", "output"]
    channels = pruning.channels_of(demo_model, "conv_4")
    assert curve._LinearTail.build(demo_model, channels) is None  # a Flatten->Dense->Add mix


@pytest.mark.slow
@pytest.mark.parametrize("k", [0, 1, 30, 44, 52, 60])
def test_curve_equals_real_pruning(demo_model, demo_data, ranked, k):
    validation, _, poisoned = demo_data
    order, curves = ranked
    assert len(curves["val"]) == 61
    pruned = pruning.activation_prune(demo_model, "conv_3", order, k).model
    assert curves["val"][k] == accuracy(pruned, validation)
    assert curves["asr"][k] == accuracy(pruned, poisoned)


@pytest.mark.slow
def test_tail_rerun_path_agrees_with_linear_path(demo_model, demo_data, ranked):
    validation = demo_data[0]
    order, curves = ranked
    generic = curve._Tail.build(demo_model, pruning.channels_of(demo_model, "conv_3"))
    counts = generic.counts(
        validation.x, tf.constant(validation.y, tf.int32), tf.constant(order, tf.int32)
    )
    counts = counts.numpy()
    np.testing.assert_array_equal(counts / len(validation), curves["val"])


def small_net(kind: str) -> keras.Model:
    """A small random classifier whose `target` layer has no linear pattern after it:
    a sigmoid conv (a removed channel outputs 0.5), a conv -> BatchNorm -> ReLU block
    (Sequential), a transposed conv (its kernel's last axis is input channels)."""
    keras.utils.set_random_seed(1)
    layers = keras.layers
    if kind == "sigmoid":
        body = [layers.Conv2D(6, 3, activation="sigmoid", name="target"), layers.Conv2D(4, 3)]
    elif kind == "batchnorm":
        body = [layers.Conv2D(6, 3, name="target"), layers.BatchNormalization(name="bn")]
        body += [layers.ReLU(name="relu"), layers.Dropout(0.1), layers.Conv2D(4, 3)]
    else:
        body = [layers.Conv2DTranspose(6, 3, activation="relu", name="target")]
        body += [layers.Dropout(0.1), layers.Conv2D(4, 3)]
    model = keras.Sequential(
        [keras.Input((10, 9, 3)), *body, layers.Flatten(), layers.Dense(5, activation="softmax")]
    )
    if kind == "batchnorm":  # statistics far from identity, so a live shift would show
        bn = model.get_layer("bn")
        bn.set_weights(
            [w + np.random.default_rng(2).uniform(0.5, 1.5, w.shape) for w in bn.get_weights()]
        )
    return topology.normalize(model)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "path"),
    [("sigmoid", curve._Tail), ("batchnorm", curve._Tail), ("transpose", curve._Tail)],
)
def test_curve_off_the_linear_path_equals_real_pruning(kind, path):
    model = small_net(kind)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (300, 10, 9, 3)).astype(np.float32)
    sample = Dataset("v", x, np.argmax(model.predict(x, verbose=0), axis=1))
    order = pruning.rank_channels(model, "target", sample.x)
    assert isinstance(curve.evaluator_for(model, "target"), path)
    got = curve.pruning_curve(model, "target", order, {"v": sample})["v"]
    assert got[0] == 1.0 and got.min() < 0.9  # removing channels changes the answers
    for k in range(7):
        pruned = pruning.activation_prune(model, "target", order, k).model
        assert got[k] == accuracy(pruned, sample)


@pytest.mark.slow
def test_whole_net_path_masks_a_batchnorm_and_a_transposed_kernel():
    for kind in ("batchnorm", "transpose"):
        model = small_net(kind)
        x = np.random.default_rng(3).uniform(0, 1, (200, 10, 9, 3)).astype(np.float32)
        sample = Dataset("v", x, np.argmax(model.predict(x, verbose=0), axis=1))
        order = pruning.rank_channels(model, "target", sample.x)
        whole = curve._Whole(model, pruning.channels_of(model, "target"))
        counts = whole.counts(x, tf.constant(sample.y, tf.int32), tf.constant(order, tf.int32))
        expected = [
            accuracy(pruning.activation_prune(model, "target", order, k).model, sample)
            for k in range(7)
        ]
        np.testing.assert_array_equal(counts.numpy() / len(x), expected)


def test_stopping_rule_stops_at_the_first_violation():
    val = np.array([0.98, 0.98, 0.97, 0.95, 0.93, 0.96, 0.5])
    assert curve.channels_within(val, 0.04) == 3  # 0.93 is the first point below 0.94
    assert curve.channels_within(val, 0.0) == 1
    assert curve.channels_within(val, 0.9) == 6


def test_content_hash_follows_the_bytes_not_the_path(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    a.write_bytes(b"same")
    b.write_bytes(b"same")
    assert files.content_hash(a) == files.content_hash(b)
    before = files.content_hash(a)
    a.write_bytes(b"changed!")
    assert files.content_hash(a) != before


@pytest.mark.slow
@pytest.mark.parametrize(("layer", "k_values"), [("conv_4", (0, 40, 80)), ("fc_1", (0, 100, 160))])
def test_curve_where_the_rest_of_the_net_reads_the_other_branch(
    demo_model, demo_data, layer, k_values
):
    """DeepID's conv_4 and fc_1 meet the other branch in add_1: the whole net is rerun."""
    validation = demo_data[0]  # 60 images of every class: the net is run 81 or 161 times
    sample = type(validation)("v", validation.x[::20], validation.y[::20])
    channels = pruning.channels_of(demo_model, layer)
    assert curve._LinearTail.build(demo_model, channels) is None
    assert curve._Tail.build(demo_model, channels) is None
    order = pruning.rank_channels(demo_model, layer, sample.x)
    got = curve.pruning_curve(demo_model, layer, order, {"v": sample})["v"]
    assert len(got) == len(order) + 1
    for k in k_values:
        pruned = pruning.activation_prune(demo_model, layer, order, k).model
        assert got[k] == accuracy(pruned, sample)
