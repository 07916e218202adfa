"""Any Keras classifier a user brings: a Sequential net with BatchNorm, a net with a
separate Softmax layer and a net holding a nested sub-model run through every repair and
the GoodNet's detectors; a channels-first net is refused before any work."""

import json

import mlflow
import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import UserError, data
from badnet_repair.defenses import goodnet, repairs
from badnet_repair.experiment import pipeline
from badnet_repair.network import models, pruning, topology

from conftest import TINY, compose_config

SHAPE, CLASSES = (16, 12, 3), 5
layers = keras.layers


def sequential_batchnorm() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(SHAPE),
            layers.Conv2D(8, 3, padding="same", name="conv_a"),
            layers.BatchNormalization(name="bn_a"),
            layers.ReLU(name="relu_a"),
            layers.MaxPooling2D(2),
            layers.Conv2D(12, 3, padding="same", name="conv_b"),
            layers.BatchNormalization(name="bn_b"),
            layers.ReLU(name="relu_b"),
            layers.Flatten(),
            layers.Dense(16, activation="relu", name="fc"),
            layers.Dense(CLASSES, activation="softmax", name="out"),
        ],
        name="vgg_bn",
    )


def separate_softmax() -> keras.Model:
    x = keras.Input(SHAPE)
    h = layers.Conv2D(8, 3, activation="relu", name="conv")(x)
    h = layers.Flatten()(layers.MaxPooling2D(2)(h))
    scores = layers.Dense(CLASSES, name="scores")(h)
    return keras.Model(x, layers.Softmax(name="probs")(scores), name="softmax_layer")


def nested_backbone() -> keras.Model:
    backbone = keras.Sequential(
        [
            keras.Input(SHAPE),
            layers.Conv2D(8, 3, activation="relu", name="conv"),
            layers.MaxPooling2D(2),
        ],
        name="backbone",
    )
    x = keras.Input(SHAPE)
    h = layers.Flatten()(backbone(x))
    return keras.Model(x, layers.Dense(CLASSES, activation="softmax", name="out")(h), name="nested")


NETS = {"batchnorm": sequential_batchnorm, "softmax_layer": separate_softmax}
NETS["nested"] = nested_backbone


def trained(build) -> keras.Model:
    """A net fitted a little to images whose class is their brightest colour band, so
    that its answers vary (random weights answer one class)."""
    keras.utils.set_random_seed(0)
    model = build()
    x, y = images(300, 1)
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x / 255.0, y, epochs=3, batch_size=32, verbose=0)
    return model


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = rng.uniform(0, 120, (n, *SHAPE))
    x[np.arange(n), :, :, 0] += 25.0 * y[:, None, None]  # a class-dependent tint
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each net saved as a full .h5 model, and data files shared by all (channels-last)."""
    root = tmp_path_factory.mktemp("any_model")
    paths = {
        name: models.save_model(trained(build), root / f"{name}.h5") for name, build in NETS.items()
    }
    for name, n, seed in (("validation", 120, 2), ("test", 60, 3), ("poisoned", 30, 4)):
        x, y = images(n, seed)
        if name == "poisoned":
            x[:, :4, :4, :] = 255.0  # a white corner, labelled with target 0
            y = np.zeros(n)
        data.save_h5(root / f"{name}.h5", x.transpose(0, 3, 1, 2), y)
        paths[name] = root / f"{name}.h5"
    return paths


def overrides(files, net: str) -> list[str]:
    return [
        "model=custom",
        f"model.file={files[net]}",
        f"data.clean_validation={files['validation']}",
        f"data.clean_test={files['test']}",
        f"+data.poisoned.corner={files['poisoned']}",
        "goodnet.detector=both",
        "goodnet.k=4",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("repair", repairs.names())
@pytest.mark.parametrize("net", list(NETS))
def test_every_repair_and_detector_runs_on_the_net(tmp_path, demo_dir, files, net, repair):
    settings = [f"repair={repair}", *TINY.get(repair, [])]
    cfg = compose_config(tmp_path, demo_dir, *overrides(files, net), *settings)
    metrics = pipeline.run(cfg)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    (run,) = mlflow.search_runs(experiment_names=["custom"], output_format="list")
    assert run.info.status == "FINISHED"
    assert {
        "repaired/clean_acc",
        "goodnet/detect/corner",
        "goodnet/strip/entropy_threshold",
    } <= set(metrics)
    repaired = models.load_model(tmp_path / "out" / "repaired_net.h5")
    assert repaired.output_shape == (None, CLASSES)
    good = goodnet.load_goodnet(tmp_path / "out" / "goodnet.h5")
    assert good.output_shape == (None, CLASSES + 1)
    logged = json.loads((tmp_path / "out" / "metrics.json").read_text())
    if net == "batchnorm" and repair == "fine_pruning":  # pruned channels output exactly 0
        channels = pruning.channels_of(repaired, "conv_b")
        assert channels.norm == "bn_b" and channels.output == "relu_b"
        probe = keras.Model(repaired.inputs, repaired.get_layer("relu_b").output)
        out = probe(images(20, 5)[0] / 255.0).numpy()
        assert logged["pruned_channels"] and np.all(out[..., logged["pruned_channels"]] == 0)


def test_models_are_rebuilt_flat_with_the_same_answers(files):
    x = images(40, 6)[0] / 255.0
    for net in NETS:
        loaded = models.load_model(files[net])
        flat = topology.normalize(loaded)
        assert not isinstance(flat, keras.Sequential)
        assert not any(isinstance(layer, keras.Model) for layer in flat.layers)
        np.testing.assert_allclose(
            flat.predict(x, verbose=0), loaded.predict(x, verbose=0), atol=1e-6
        )
    nested = topology.normalize(models.load_model(files["nested"]))
    assert models.prunable_layer(nested, None).name == "backbone_conv"


def test_a_channels_first_net_is_refused_before_any_work(tmp_path, demo_dir, files):
    x = keras.Input((3, 16, 12))
    h = layers.Conv2D(4, 3, data_format="channels_first", activation="relu", name="conv")(x)
    out = layers.Dense(CLASSES, activation="softmax")(layers.Flatten()(h))
    path = models.save_model(keras.Model(x, out), tmp_path / "first.h5")
    cfg = compose_config(tmp_path, demo_dir, *overrides(files, "batchnorm"), f"model.file={path}")
    with pytest.raises(UserError, match="layer conv is channels-first") as err:
        pipeline.run(cfg)
    assert "\n" not in str(err.value)
