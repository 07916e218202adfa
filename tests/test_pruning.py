import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import data
from badnet_repair.network import pruning
from badnet_repair.network.training import finetune


@pytest.mark.slow
def test_activation_pruning_zeroes_the_least_active_channels(demo_model, demo_data):
    validation = demo_data[0]
    before = [w.copy() for w in demo_model.get_weights()]
    order = pruning.rank_channels(demo_model, "conv_3", validation.x)
    result = pruning.activation_prune(demo_model, "conv_3", order, 30)

    probe = keras.Model(demo_model.inputs, demo_model.get_layer("conv_3").output)
    means = probe.predict(validation.x, verbose=0).mean(axis=(0, 1, 2))
    expected = sorted(np.argsort(means, kind="stable")[:30].tolist())
    assert result.channels_pruned == expected
    assert result.sparsity == 0.5 and result.layer == "conv_3"
    assert max(means[expected]) <= min(np.delete(means, expected))
    assert pruning.zeroed_channels(result.model.get_layer("conv_3")) == expected
    for a, b in zip(demo_model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)  # the BadNet itself is untouched


@pytest.mark.parametrize(("sparsity", "count"), [(0.0, 0), (0.1, 6), (0.8, 48), (0.99, 59)])
def test_channel_count_follows_sparsity(demo_model, demo_data, sparsity, count):
    order = pruning.rank_channels(demo_model, "conv_3", demo_data[0].x[:64])
    k = pruning.channel_count(sparsity, len(order))
    result = pruning.activation_prune(demo_model, "conv_3", order, k)
    assert len(result.channels_pruned) == count == k


def test_dense_layer_units_can_be_pruned(demo_model, demo_data):
    order = pruning.rank_channels(demo_model, "fc_1", demo_data[0].x[:64])
    result = pruning.activation_prune(demo_model, "fc_1", order, pruning.channel_count(0.25, 160))
    assert len(result.channels_pruned) == 40
    assert pruning.zeroed_channels(result.model.get_layer("fc_1")) == result.channels_pruned


@pytest.mark.slow
def test_pruned_channels_stay_zero_through_finetuning(demo_model, demo_data):
    validation = demo_data[0]
    order = pruning.rank_channels(demo_model, "conv_3", validation.x)
    result = pruning.activation_prune(demo_model, "conv_3", order, 30)
    train, holdout = data.split(validation, 0.1, seed=0)
    seen = []
    finetune(
        result.model,
        train,
        holdout,
        epochs=2,
        lr=1e-2,
        batch_size=64,
        pruning=result,
        on_epoch=lambda epoch, values: seen.append((epoch, values)),
    )
    assert [e for e, _ in seen] == [1, 2]
    assert set(seen[0][1]) == {"finetune/loss", "finetune/val_acc"}
    kernel, bias = result.model.get_layer("conv_3").get_weights()
    assert np.all(kernel[..., result.channels_pruned] == 0)
    assert np.all(bias[result.channels_pruned] == 0)
    alive = np.setdiff1d(np.arange(60), result.channels_pruned)
    before = demo_model.get_layer("conv_3").get_weights()[0]
    assert not np.allclose(kernel[..., alive], before[..., alive])  # the rest did train


@pytest.mark.slow
def test_magnitude_pruning_reaches_its_sparsity_and_keeps_it(demo_model, demo_data):
    validation = demo_data[0]
    result = pruning.magnitude_prune(demo_model, "conv_3", 0.8)
    assert result.sparsity == pytest.approx(0.8, abs=0.01)
    third = data.Dataset("validation_third", validation.x[::3], validation.y[::3])
    train, holdout = data.split(third, 0.1, seed=0)  # 6 steps: any regrowth would show
    finetune(result.model, train, holdout, 1, 1e-3, 64, pruning=result)
    plain = result.export()
    assert not any(hasattr(layer, "pruning_obj") for layer in plain.layers)
    kernel = plain.get_layer("conv_3").get_weights()[0]
    assert np.mean(kernel == 0) == pytest.approx(0.8, abs=0.01)
