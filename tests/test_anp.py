"""ANP's mechanism on the two small nets of test_agnostic (functional without BatchNorm,
with hidden Dense layers; Sequential with BatchNorm): masks in [0, 1], perturbations
within eps that raise the loss, and pruned channels (conv channels and Dense units)
exactly silent in the saved model, the others as in the BadNet (end to end on the demo:
test_end_to_end; on any model: test_any_model)."""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

# the fixtures net, store and case are test_agnostic's: test parameters named after them
# are those fixtures, not redefinitions
# ruff: noqa: F811
from test_agnostic import case, images, net, series, store  # noqa: F401

from badnet_repair.defenses.repairs import anp
from badnet_repair.network import models
from badnet_repair.network.channels import units


def settings(**changes) -> anp.Anp:
    base = dict(
        batch_size=32,
        steps=20,
        mask_lr=0.5,
        momentum=0.9,
        eps=0.3,
        perturb_steps=1,
        alpha=0.2,
        threshold_step=0.05,
        max_acc_drop=1.0,  # every threshold within: the largest, 0.95, is chosen
        margin_se=1.0,
    )
    return anp.Anp(**{**base, **changes})


def test_anp_masks_every_conv_and_hidden_dense_layer(net):
    found = [u.conv.name for u in units(net, dense=True)]
    hidden = ["fc_1", "fc_2"] if "fc_1" in [layer.name for layer in net.layers] else []
    assert found == ["conv_a", "conv_b", *hidden]  # never the classifier `out`


@pytest.mark.slow
def test_anp_masks_lie_in_0_1_and_the_perturbation_within_eps_raises_the_loss(case):
    eps = 0.3
    learnt = anp.learn(case, settings(eps=eps))
    values = np.concatenate([m.numpy() for m in learnt.masks.values])
    assert values.min() >= 0 and values.max() <= 1 and values.min() < 1  # moved, clipped
    deltas = np.concatenate([d.numpy() for d in learnt.deltas])
    assert np.all(np.abs(deltas) <= eps + 1e-7)
    assert np.any(deltas == eps) and np.any(deltas == -eps)  # the ascent step, clipped
    assert np.any(np.abs(deltas) < eps)  # from uniform noise, not always at the bound
    natural, robust = series("anp/mask/natural_loss"), series("anp/mask/robust_loss")
    assert len(natural) == len(robust) == 10
    assert all(r > n for n, r in zip(natural, robust, strict=True))  # an ascent, each round


@pytest.mark.slow
def test_anp_natural_pass_is_the_net_with_its_masks_applied(case):
    learnt = anp.learn(case, settings(steps=5))
    x = images(case.badnet, 16, seed=5)
    found = {u.name: u for u in units(learnt.model, dense=True)}
    for unit, m in zip(learnt.masks.units, learnt.masks.values, strict=True):
        original = case.badnet.get_layer(unit.scaled.name).get_weights()[0]
        scaled = found[unit.name].scaled.get_weights()[0]
        np.testing.assert_allclose(scaled, original * m.numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(learnt.model(x).numpy(), case.badnet(x).numpy())


@pytest.mark.slow
def test_anp_pruned_channels_are_silent_and_the_others_untouched_when_saved(case, tmp_path):
    repaired = anp.repair(case, settings())
    masks = case.journal.notes["anp_masks"]
    values = np.concatenate([np.asarray(m) for m in masks.values()])
    assert values.min() >= 0 and values.max() <= 1
    assert case.journal.metrics["anp/threshold"] == 0.95
    assert case.journal.metrics["anp/channels_pruned"] == (values <= 0.95).sum() > 0
    assert [stage.name for stage in case.handed] == ["masked"]
    pruned = case.journal.notes["anp_pruned_channels"]
    saved = models.load_model(models.save_model(repaired, tmp_path / "anp.h5"))
    found = units(saved, dense=True)
    assert set(pruned) == {u.name for u in found}
    probe = keras.Model(saved.inputs, [saved.get_layer(u.channels.output).output for u in found])
    outputs = probe(images(saved, 32, seed=9) * 5 - 2)  # any input, negative pixels too
    for unit, out in zip(found, outputs, strict=True):
        off = pruned[unit.name]
        kept = np.setdiff1d(np.arange(unit.size), off)
        assert np.all(out.numpy()[..., off] == 0)
        badnet = case.badnet.get_layer(unit.conv.name).kernel.numpy()
        np.testing.assert_array_equal(unit.conv.kernel.numpy()[..., kept], badnet[..., kept])
        if unit.scaled is not unit.conv:  # nothing leaks through BN's shift
            assert np.all(unit.scaled.beta.numpy()[off] == 0)
    if any(u.conv.name == "fc_1" for u in found):
        assert pruned["fc_1"] or pruned["fc_2"]  # Dense units are pruned too
    assert tf.reduce_all(tf.math.is_finite(repaired(images(saved, 4))))
