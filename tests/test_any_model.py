"""Any Keras classifier a user brings: a Sequential channels-last net with BatchNorm and a
functional net holding a nested sub-model and a separate Softmax layer are rebuilt flat
with the same answers, and each repair runs on each once: what the run logs of the
repaired net is what its saved file gives, a channel it pruned is zero in that file, and
the GoodNet's file answers as logged. On the net without BatchNorm (the competition's
kind) each runs again with other clean test and poisoned files, and so does the GoodNet
of every detector: none reads the evaluation data, so each saves bit-identical nets. A
channels-first net is refused before any work."""

import json

import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import UserError, data
from badnet_repair.defenses import detectors, repairs
from badnet_repair.experiment import pipeline
from badnet_repair.network import models, pruning, topology
from badnet_repair.network.channels import units

from conftest import EVERY_DETECTOR, TINY, assert_same_weights, compose_config, plain, run_afresh

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


def functional() -> keras.Model:
    """A nested Sequential backbone, raw scores, and the softmax as a layer of its own."""
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
    scores = layers.Dense(CLASSES, name="scores")(h)
    return keras.Model(x, layers.Softmax(name="probs")(scores), name="functional")


NETS = {"batchnorm": sequential_batchnorm, "functional": functional}
SWAPPED = "functional"  # the net whose runs are repeated on other evaluation files
# Tiny settings, except that the pruning repairs are made to prune: half the channels, and
# RNP's and ANP's masks trained long enough to fall below their thresholds, any held-out
# cost allowed.
SETTINGS = {
    **TINY,
    "fine_pruning": [*TINY["fine_pruning"], "prune.sparsity=0.5"],
    "magnitude": [*TINY["magnitude"], "prune.sparsity=0.5"],
    "rnp": [
        *("rnp.unlearn_lr=0.01", "rnp.unlearn_steps=30", "rnp.mask_lr=0.5", "rnp.mask_steps=20"),
        "rnp.max_acc_drop=0.99",
    ],
    "anp": ["anp.steps=20", "anp.mask_lr=0.5", "anp.max_acc_drop=0.99"],
}


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
    sets = [("validation", 120, 2), ("test", 60, 3), ("poisoned", 30, 4)]
    for name, n, seed in [*sets, ("other_test", 40, 7), ("other_poisoned", 20, 8)]:
        x, y = images(n, seed)
        if name.endswith("poisoned"):
            x[:, :4, :4, :] = 255.0  # a white corner, labelled with target 0
            y = np.zeros(n)
        if name == "other_test":  # other labels: a score of it is told from the test file's
            y = (y + 1) % CLASSES
        data.save_h5(root / f"{name}.h5", x.transpose(0, 3, 1, 2), y)
        paths[name] = root / f"{name}.h5"
    return paths


def overrides(files, net: str, test: str = "test", poisoned: str = "poisoned") -> list[str]:
    """The run of `net`, scored on the files named `test` and `poisoned`."""
    return [
        "model=custom",
        f"model.file={files[net]}",
        f"data.clean_validation={files['validation']}",
        f"data.clean_test={files[test]}",
        f"+data.poisoned.corner={files[poisoned]}",
        "goodnet.detector=both",
        "goodnet.k=4",
    ]


def load(path, name: str, shape=SHAPE) -> data.Dataset:
    return data.load_h5(path, shape, CLASSES, 1 / 255, name)


def accuracy(model: keras.Model, ds: data.Dataset) -> float:
    return float(np.mean(np.argmax(model.predict(ds.x, verbose=0), axis=1) == ds.y))


def assert_pruned_channels_are_zero(repair: str, saved: keras.Model, notes: dict, metrics):
    """Whatever the input, a channel the repair pruned outputs exactly 0 from the saved
    file (a magnitude-pruned layer holds its share of zero weights)."""
    x = np.random.default_rng(9).uniform(-2, 3, (16, *SHAPE)).astype(np.float32)
    if repair == "fine_pruning":
        off = {pruning.channels_of(saved, notes["layer"]).output: notes["pruned_channels"]}
    elif repair in ("rnp", "anp"):
        found = {unit.name: unit for unit in units(saved, dense=repair == "anp")}
        chosen = notes[f"{repair}_pruned_channels"].items()
        off = {found[name].scaled.name: ch for name, ch in chosen}
        assert metrics[f"{repair}/channels_pruned"] == sum(map(len, off.values())) > 0
    else:
        kernel = saved.get_layer(notes["layer"]).get_weights()[0]
        assert np.mean(kernel == 0) == pytest.approx(metrics["prune/sparsity"], abs=0.01)
        assert metrics["prune/sparsity"] == pytest.approx(0.5, abs=0.05)
        return
    assert any(off.values())
    for layer, channels in off.items():
        probe = keras.Model(saved.inputs, saved.get_layer(layer).output)
        assert np.all(probe(x).numpy()[..., channels] == 0), layer


@pytest.mark.slow
@pytest.mark.parametrize("repair", repairs.names())
@pytest.mark.parametrize("net", list(NETS))
def test_each_repair_on_the_net_logs_what_its_saved_file_gives(
    tmp_path, demo_dir, files, net, repair
):
    """What the run logs is what its saved files give; on the SWAPPED net, the run made
    again on other evaluation files saves the same nets (no repair reads them)."""
    settings = [f"repair={repair}", *SETTINGS.get(repair, [])]
    cfg = compose_config(tmp_path, demo_dir, *overrides(files, net), *settings)
    metrics = pipeline.run(cfg)
    notes = json.loads((tmp_path / "out" / "metrics.json").read_text())
    saved = models.load_model(tmp_path / "out" / "repaired_net.h5")
    test, corner = load(files["test"], "test"), load(files["poisoned"], "corner")
    _, holdout = data.split(load(files["validation"], "validation"), cfg.data.holdout, cfg.seed)
    assert accuracy(saved, test) == metrics["repaired/clean_acc"]
    assert accuracy(saved, corner) == metrics["repaired/asr/corner"]
    assert accuracy(saved, holdout) == metrics["repaired/holdout_acc"]
    if repair in ("fine_pruning", "magnitude", "rnp", "anp"):
        assert_pruned_channels_are_zero(repair, saved, notes, metrics)

    good = keras.models.load_model(tmp_path / "out" / "goodnet.h5", compile=False)
    answers = np.argmax(good.predict(test.x, verbose=0), axis=1)
    assert np.mean(answers == CLASSES) == pytest.approx(
        metrics["goodnet/flag_rate_clean"],
        abs=1.01 / len(test),  # a float near-tie at most
    )
    if net == SWAPPED:
        assert_unread_evaluation_files(tmp_path, demo_dir, files, metrics, *settings)


def assert_unread_evaluation_files(tmp_path, demo_dir, files, metrics, *settings: str) -> None:
    """The run in tmp_path, made again on other clean test and poisoned files (which it
    scores), saves the same repaired net, GoodNet and detectors' calibration scores, bit
    for bit; and the repaired net is not the BadNet."""
    other = overrides(files, SWAPPED, "other_test", "other_poisoned")
    _, swapped = run_afresh(tmp_path / "swapped", demo_dir, *other, *settings)
    assert swapped["badnet/clean_acc"] != metrics["badnet/clean_acc"]  # the other test file
    own, theirs = (np.load(tmp_path / run / "goodnet_scores.npz") for run in ("out", "swapped/out"))
    assert own.files == theirs.files
    detectors_of = {
        suffix: {k.split(".")[0] for k in own.files if k.endswith(suffix)}
        for suffix in (".calibration", ".poisoned.corner")
    }
    assert detectors_of[".calibration"] == detectors_of[".poisoned.corner"] != set()
    for key in own.files:
        if key.endswith(".poisoned.corner"):  # the other poisoned file, scored
            assert (len(own[key]), len(theirs[key])) == (30, 20), key
        elif key.endswith(".calibration"):
            np.testing.assert_array_equal(own[key], theirs[key], err_msg=key)
    for file in ("repaired_net.h5", "goodnet.h5"):
        assert_same_weights(tmp_path / "out" / file, tmp_path / "swapped/out" / file)
    badnet = models.load_model(files[SWAPPED]).get_weights()
    repaired = plain(tmp_path / "out" / "repaired_net.h5").get_weights()
    assert len(badnet) == len(repaired)
    assert not all(map(np.array_equal, badnet, repaired))  # a repair, not the BadNet


@pytest.mark.slow
def test_no_detector_reads_the_evaluation_data(tmp_path, demo_dir, files):
    """The GoodNet of every detector, calibrated together, saves the same nets when run
    on other evaluation files (as every repair does, above). A quarter of the validation
    file is held out: BaDExpert's threshold needs 20 held-out images."""
    settings = [*EVERY_DETECTOR, "data.holdout=0.25"]
    metrics = pipeline.run(
        compose_config(tmp_path, demo_dir, *overrides(files, SWAPPED), *settings)
    )
    scored = {key.split("/")[1] for key in metrics if key.endswith("/calibration_images")}
    assert scored == set(detectors.names())
    assert metrics["goodnet/badexpert/auxiliary_is_repaired"] == 0.0  # B repaired by FT-SAM
    assert_unread_evaluation_files(tmp_path, demo_dir, files, metrics, *settings)


@pytest.mark.slow
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
    nested = topology.normalize(models.load_model(files["functional"]))
    assert models.prunable_layer(nested, None).name == "backbone_conv"
    assert topology.output_kind(nested) == "softmax"


@pytest.mark.slow
def test_a_channels_first_net_is_refused_before_any_work(tmp_path, demo_dir, files):
    x = keras.Input((3, 16, 12))
    h = layers.Conv2D(4, 3, data_format="channels_first", activation="relu", name="conv")(x)
    out = layers.Dense(CLASSES, activation="softmax")(layers.Flatten()(h))
    path = models.save_model(keras.Model(x, out), tmp_path / "first.h5")
    cfg = compose_config(tmp_path, demo_dir, *overrides(files, "batchnorm"), f"model.file={path}")
    with pytest.raises(UserError, match="layer conv is channels-first") as err:
        pipeline.run(cfg)
    assert "\n" not in str(err.value)
