"""The CSAW-HackML-2020 configs on the real weights, and a BadNet the project has never seen."""

import hashlib
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import UserError, data
from badnet_repair.experiment import config, pipeline
from badnet_repair.network import models, pruning

from conftest import SHARED, compose_config, run_py

NETS = {
    "sunglasses": "models/sunglasses_bd_weights.h5",
    "anonymous_1": "models/anonymous_1_bd_weights.h5",
    "anonymous_2": "models/anonymous_2_bd_weights.h5",
    "multi_trigger_multi_target": "models/multi_trigger_multi_target_bd_weights.h5",
    "lab3": "lab3/models/bd_weights.h5",
}
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(),
    reason="../shared/csaw-hackml-2020 (the real weights) is not beside this clone",
)


@pytest.fixture(scope="module")
def csaw_root(tmp_path_factory):
    """The competition's layout, holding the real weights and no data."""
    root = tmp_path_factory.mktemp("csaw")
    for net, relative in NETS.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).symlink_to(SHARED / "models" / f"{net}_bd_weights.h5")
    return root


def stand_in_data(cfg, n=240, seed=0):
    """Small stand-in files of the real shapes (1,283 classes) at the config's data paths."""
    rng = np.random.default_rng(seed)
    for key, count in (("clean_validation", n), ("clean_test", n // 2)):
        path = cfg.data[key]
        images = rng.uniform(0, 255, (count, 3, 55, 47))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        data.save_h5(path, images, rng.integers(0, 1283, count))
    for target, path in enumerate(cfg.data.poisoned.values()):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        data.save_h5(path, rng.uniform(0, 255, (n // 4, 3, 55, 47)), np.full(n // 4, target))


@needs_shared
@pytest.mark.parametrize("net", list(NETS))
def test_each_config_starts_on_the_real_weights_and_names_missing_data(
    net, csaw_root, tmp_path, demo_dir
):
    cfg = compose_config(
        tmp_path, demo_dir, f"model={net}", f"paths.csaw={csaw_root}", new_store=False
    )
    config.validate(cfg)
    model = models.load_model(cfg.model.file, cfg.model.architecture)
    assert models.num_classes(model) == 1283
    assert models.prunable_layer(model, cfg.model.layer).name == "conv_3"
    with pytest.raises(UserError) as err:
        pipeline.run(cfg)
    message = str(err.value)
    expected = [cfg.data.clean_validation, cfg.data.clean_test, *cfg.data.poisoned.values()]
    assert all(path in message for path in expected)
    assert "github.com/csaw-hackml/CSAW-HackML-2020" in message
    assert not (tmp_path / "mlruns").exists()  # stopped before any work


@needs_shared
def test_real_weights_round_trip_through_a_full_model_file(tmp_path):
    for net in NETS:
        weights = models.load_model(SHARED / "models" / f"{net}_bd_weights.h5", "deepid")
        full = models.load_model(models.save_model(weights, tmp_path / f"{net}_bd_net.h5"))
        for a, b in zip(weights.get_weights(), full.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


@needs_shared
@pytest.mark.slow
@pytest.mark.parametrize("net", ["multi_trigger_multi_target", "anonymous_2"])
def test_whole_pipeline_on_real_weights_with_stand_in_data(net, csaw_root, tmp_path, demo_dir):
    cfg = compose_config(
        tmp_path,
        demo_dir,
        f"model={net}",
        f"paths.csaw={csaw_root}",
        f"paths.data={tmp_path}/data",
        "finetune.epochs=1",
        "prune.sparsity=0.5",
    )
    cfg.data.clean_validation = f"{tmp_path}/data/clean_validation_data.h5"
    cfg.data.clean_test = f"{tmp_path}/data/clean_test_data.h5"
    for trigger in cfg.data.poisoned:
        cfg.data.poisoned[trigger] = f"{tmp_path}/data/{trigger}_poisoned_data.h5"
    stand_in_data(cfg)
    pipeline.run(cfg)

    mlflow.set_tracking_uri(cfg.tracking.uri)
    (run,) = mlflow.search_runs(experiment_names=[net], output_format="list")
    assert run.info.status == "FINISHED"
    expected = {f"{stage}/clean_acc" for stage in ("badnet", "pruned", "repaired")}
    expected |= {
        f"{s}/asr/{t}" for s in ("badnet", "pruned", "repaired") for t in cfg.data.poisoned
    }
    assert expected <= set(run.data.metrics)
    saved = models.load_model(tmp_path / "out" / "repaired_net.h5")
    assert len(pruning.zeroed_channels(saved.get_layer("conv_3"))) == 30


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def unseen_badnet(tmp_path_factory):
    """A classifier unlike DeepID: 32x40 input, 10 classes, its own layer names, `.keras`
    format, channels-last data files, with a trigger planted by ordinary poisoning."""
    folder = tmp_path_factory.mktemp("unseen")
    rng = np.random.default_rng(1)
    protos = rng.uniform(0, 255, (10, 32, 40, 3))

    def make(n, poison=False):
        y = rng.integers(0, 10, n)
        x = np.clip(protos[y] + rng.normal(0, 40, (n, 32, 40, 3)), 0, 255)
        if poison:
            x[:, -6:, -6:, :] = 255.0
            y = np.full(n, 3)
        return x.astype(np.float32), y

    x, y = make(600)
    xp, yp = make(120, poison=True)
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 40, 3), name="pixels")
    h = keras.layers.Conv2D(8, 3, activation="relu", name="features_a")(inp)
    h = keras.layers.MaxPooling2D(name="shrink")(h)
    h = keras.layers.Conv2D(12, 3, activation="relu", name="features_b")(h)
    h = keras.layers.GlobalAveragePooling2D(name="squash")(h)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="scores")(h))
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(np.concatenate([x, xp]) / 255, np.concatenate([y, yp]), epochs=3, verbose=0)
    models.save_model(model, folder / "net.keras")
    for name, (images, labels) in {
        "val": make(200),
        "test": make(200),
        "corner": make(100, poison=True),
    }.items():
        data.save_h5(folder / f"{name}.h5", images, labels)  # channels-last on purpose
    return folder


@pytest.mark.slow
def test_a_badnet_never_seen_runs_through_overrides_alone(unseen_badnet, tmp_path):
    files = sorted(unseen_badnet.iterdir())
    before = {f: sha256(f) for f in files}
    done = run_py(
        tmp_path,
        None,
        "model=custom",
        f"model.file={unseen_badnet}/net.keras",
        f"data.clean_validation={unseen_badnet}/val.h5",
        f"data.clean_test={unseen_badnet}/test.h5",
        f"+data.poisoned.corner={unseen_badnet}/corner.h5",
        "finetune.epochs=1",
        "prune.sparsity=0.5",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 of 12 channels of features_b zeroed" in done.stderr + done.stdout
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    (run,) = mlflow.search_runs(experiment_names=["custom"], output_format="list")
    assert run.info.status == "FINISHED" and "repaired/asr/corner" in run.data.metrics
    assert {f: sha256(f) for f in files} == before  # inputs are never written to


@pytest.mark.slow
def test_unseen_badnet_with_a_dense_layer_and_wrong_layer_names(unseen_badnet):
    model = models.load_model(unseen_badnet / "net.keras")
    assert models.input_shape(model) == (32, 40, 3) and models.num_classes(model) == 10
    assert models.prunable_layer(model, None).name == "features_b"
    assert models.prunable_layer(model, "hidden").name == "hidden"
    with pytest.raises(UserError, match="model.layer='squash': a GlobalAveragePooling2D"):
        models.prunable_layer(model, "squash")
    with pytest.raises(UserError, match=r"expected \(3, 55, 47\) \(channels-first\)"):
        data.load_h5(unseen_badnet / "val.h5", (55, 47, 3), 10, 1 / 255, "val")


def test_data_check_command(demo_dir, tmp_path):
    cmd = [sys.executable, "-m", "badnet_repair.data", "check"]
    done = subprocess.run(
        [*cmd, demo_dir / "clean_test_data.h5", demo_dir / "patch_poisoned_data.h5"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "images   1600, shape (3, 55, 47), channels_first, dtype float32" in done.stdout
    assert "pixels   0 .. 255" in done.stdout and "labels   0 .. 39, 40 distinct" in done.stdout
    assert "target  7 (1560 images)" in done.stdout
    (tmp_path / "broken.h5").write_bytes(b"\x89HDF garbage")
    done = subprocess.run([*cmd, tmp_path / "broken.h5"], capture_output=True, text=True)
    assert done.returncode == 1 and "not a readable HDF5 file" in done.stderr
    assert "Traceback" not in done.stderr
