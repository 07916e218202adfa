"""BTI-DBF(U)'s mechanism on the two small nets of test_agnostic (functional without
BatchNorm, two branches meeting in an Add; Sequential with BatchNorm): the features and
scores it reads are the net's own, its mask lies in [0, 1] and decoupling raises the
masked features' agreement with the whole net, the generated images stay within their
L2 bound and the images' range, and the whole repair is seeded (end to end on the demo:
test_end_to_end; on any model: test_any_model)."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

# the fixtures net, store and case are test_agnostic's: test parameters named after them
# are those fixtures, not redefinitions
# ruff: noqa: F811
from test_agnostic import batchnorm_net, case, images, net, store  # noqa: F401

from badnet_repair.defenses.repairs import bti_dbf
from badnet_repair.network import training
from badnet_repair.network.pruning import copy_model

SETTINGS = bti_dbf.BtiDbf(
    rounds=2,
    batch_size=32,
    mask_steps=40,
    mask_lr=0.1,
    mask_l1=0.0,
    gen_steps=10,
    gen_lr=0.01,
    gen_filters=4,
    eps=0.05,
    benign_weight=0.01,
    unlearn_steps=5,
    lrs=[0.0001, 0.001],
    portion=0.5,
    feature_weight=1.0,
    max_acc_drop=1.0,  # every rate within: the largest is kept
    margin_se=1.0,
)


def test_the_split_net_gives_the_layers_features_and_the_nets_own_scores(net):
    x = tf.constant(images(net, 8))
    features, scores = bti_dbf.split(net, "conv_b")(x)
    np.testing.assert_allclose(scores.numpy(), training.scores(net)(x).numpy(), atol=1e-5)
    probe = tf.keras.Model(net.inputs, net.get_layer("conv_b").output)
    np.testing.assert_allclose(features.numpy(), probe(x).numpy(), atol=1e-5)
    ones = tf.ones(features.shape[1:])
    masked = bti_dbf.split(net, "conv_b")(x, ones)[1]
    np.testing.assert_allclose(masked.numpy(), scores.numpy(), atol=1e-5)
    zeroed = bti_dbf.split(net, "conv_b")(x, 0.0 * ones)[1]
    assert not np.allclose(zeroed.numpy(), scores.numpy())  # the mask reaches the scores


@pytest.mark.slow
def test_the_mask_lies_in_0_1(case):
    extreme = tf.Variable(tf.constant([-60.0, -3.0, 0.0, 3.0, 60.0]))
    values = bti_dbf.mask_of(extreme).numpy()
    assert values.min() >= 0 and values.max() <= 1 and np.all(np.diff(values) >= 0)
    inversion = bti_dbf.Inversion(case, copy_model(case.badnet), SETTINGS, "test")
    mask = inversion.decoupled(1).numpy()
    assert mask.min() >= 0 and mask.max() <= 1 and 0 < mask.mean() < 1


@pytest.mark.slow
@pytest.mark.parametrize("net", [batchnorm_net], indirect=True)
@pytest.mark.parametrize("layer", ["conv_a", "conv_b"])
def test_decoupling_raises_the_masked_features_agreement(case, layer):
    """The net whose every answer flows through the masked layer (on the branches net
    conv_b feeds one branch of two, and the untrained net's answers are near ties that
    the masked features' cross-entropy does not settle)."""
    case = dataclasses.replace(case, layer=layer)
    inversion = bti_dbf.Inversion(case, copy_model(case.badnet), SETTINGS, "test")
    inversion.decoupled(1)
    logged = case.journal.metrics
    before, after = logged["test/round_1/agreement_before"], logged["test/round_1/agreement"]
    assert after > before
    assert logged["test/round_1/complement_agreement"] < after / 2


@pytest.mark.slow
@pytest.mark.parametrize("eps", [0.02, 0.2])
def test_generated_images_stay_within_their_l2_bound_and_the_images_range(case, eps):
    settings = dataclasses.replace(SETTINGS, eps=eps, gen_lr=0.05)
    inversion = bti_dbf.Inversion(case, copy_model(case.badnet), settings, "test")
    bound, low, high = inversion.box
    x = case.clean.train.x
    assert bound == pytest.approx(eps * np.sqrt(np.prod(x.shape[1:])) * (x.max() - x.min()))
    mask = inversion.decoupled(1)
    for trained in (False, True):  # the random start, and after training against the mask
        if trained:
            inversion.invert(mask, 1)
        made = bti_dbf.generate(inversion.gen, tf.constant(x), *inversion.box).numpy()
        norms = np.sqrt(np.sum(np.square(made - x), axis=(1, 2, 3)))
        assert norms.max() <= bound * (1 + 1e-5)
        assert norms.min() > 0.05 * bound  # G is not the identity (the clip shrinks it)
        assert made.min() >= low and made.max() <= high


@pytest.mark.slow
def test_the_repair_is_seeded_and_leaves_the_badnet_untouched(case):
    settings = dataclasses.replace(SETTINGS, rounds=1, mask_steps=5, gen_steps=3)
    before = [w.copy() for w in case.badnet.get_weights()]
    one, two = bti_dbf.repair(case, settings), bti_dbf.repair(case, settings)
    for a, b in zip(one.get_weights(), two.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert case.journal.metrics["bti_dbf/lr"] == max(settings.lrs)
    three = bti_dbf.repair(dataclasses.replace(case, seed=1), settings)
    pairs = zip(one.get_weights(), three.get_weights(), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)
    for w, b in zip(case.badnet.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)
