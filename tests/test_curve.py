"""The one-pass pruning curve equals pruning and evaluating at every k."""

import numpy as np
import pytest
import tensorflow as tf

from badnet_repair import curve, files, pruning
from badnet_repair.evaluate import accuracy


@pytest.fixture(scope="module")
def ranked(demo_model, demo_data):
    validation, _, poisoned = demo_data
    order = pruning.rank_channels(demo_model, "conv_3", validation.x)
    curves = curve.pruning_curve(
        demo_model, "conv_3", order, {"val": validation, "asr": poisoned}, batch_size=300
    )
    return order, curves


def test_demo_deepid_takes_the_linear_update_path(demo_model):
    fast = curve._LinearTail.build(demo_model, "conv_3")
    assert fast is not None and fast.firsts == ["conv_4", "fc_1"]
    assert fast.rest == ["flatten_2", "fc_2", "add_1", "activation_1", "output"]
    assert (
        curve._LinearTail.build(demo_model, "conv_4") is None
    )  # conv_4 feeds a Flatten->Dense->Add mix


@pytest.mark.parametrize("k", [0, 1, 30, 44, 52, 60])
def test_curve_equals_real_pruning(demo_model, demo_data, ranked, k):
    validation, _, poisoned = demo_data
    order, curves = ranked
    assert len(curves["val"]) == 61
    pruned = pruning.activation_prune(demo_model, "conv_3", order, k).model
    assert curves["val"][k] == accuracy(pruned, validation)
    assert curves["asr"][k] == accuracy(pruned, poisoned)


def test_tail_rerun_path_agrees_with_linear_path(demo_model, demo_data, ranked):
    validation = demo_data[0]
    order, curves = ranked
    generic = curve._Tail.build(demo_model, "conv_3")
    counts = generic.counts(
        validation.x, tf.constant(validation.y, tf.int32), tf.constant(order, tf.int32)
    )
    counts = counts.numpy()
    np.testing.assert_array_equal(counts / len(validation), curves["val"])


def test_curve_on_a_layer_without_the_linear_pattern(demo_model, demo_data):
    validation = demo_data[0]
    sample = type(validation)("v", validation.x[:200], validation.y[:200])
    order = pruning.rank_channels(demo_model, "conv_2", sample.x)
    got = curve.pruning_curve(demo_model, "conv_2", order, {"v": sample})["v"]
    for k in (0, 20, 40):
        pruned = pruning.activation_prune(demo_model, "conv_2", order, k).model
        assert got[k] == accuracy(pruned, sample)


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


@pytest.mark.parametrize(("layer", "k_values"), [("conv_4", (0, 40, 80)), ("fc_1", (0, 100, 160))])
def test_curve_where_the_rest_of_the_net_reads_the_other_branch(
    demo_model, demo_data, layer, k_values
):
    """DeepID's conv_4 and fc_1 meet the other branch in add_1: the whole net is rerun."""
    validation = demo_data[0]
    sample = type(validation)("v", validation.x[:200], validation.y[:200])
    assert curve._LinearTail.build(demo_model, layer) is None
    assert curve._Tail.build(demo_model, layer) is None
    order = pruning.rank_channels(demo_model, layer, sample.x)
    got = curve.pruning_curve(demo_model, layer, order, {"v": sample})["v"]
    assert len(got) == len(order) + 1
    for k in k_values:
        pruned = pruning.activation_prune(demo_model, layer, order, k).model
        assert got[k] == accuracy(pruned, sample)
