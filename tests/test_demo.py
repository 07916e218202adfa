"""The zoo of demo BadNets. Every recipe is built tiny (scale TINY_SCALE: a few images per class,
one epoch) twice, in this process and by the command in another; the full-scale demo is
the session's `demo_dir`."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import UserError, data
from badnet_repair.experiment import config, inputs
from badnet_repair.network import models
from badnet_repair.network.predict import accuracy
from badnet_repair.zoo import builds as demo
from badnet_repair.zoo import recipes as zoo

from conftest import compose_config

TINY_SCALE = 0.02


def command(data_dir: Path, scale: float, *names: str) -> list[str]:
    data_args = ["--data", str(data_dir), "--scale", str(scale)]
    return [sys.executable, "-m", "badnet_repair.zoo.builds", *data_args, *names]


def arrays(folder: Path) -> dict[str, np.ndarray]:
    """Every array in every HDF5 file of a build: images, labels, weights."""
    found = {}
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path, "r") as f:
            f.visititems(
                lambda name, obj, file=path.name: (
                    found.update({f"{file}:{name}": obj[()]})
                    if isinstance(obj, h5py.Dataset)
                    else None
                )
            )
    return found


def data_files(recipe: zoo.Recipe) -> list[str]:
    return [*demo.CLEAN_FILES.values(), *(demo.poisoned_file(t.name) for t in recipe.triggers)]


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path]]:
    """Two tiny builds of every recipe: here, and by `python -m badnet_repair.zoo.builds`."""
    root = tmp_path_factory.mktemp("zoo")
    other = subprocess.Popen(
        command(root / "b", TINY_SCALE, *zoo.BUILDERS), stderr=subprocess.PIPE, text=True
    )
    here = {name: demo.ensure(root / "a" / name, name, TINY_SCALE) for name in zoo.BUILDERS}
    _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err
    return here, {name: root / "b" / name for name in zoo.BUILDERS}


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.BUILDERS)
def test_every_recipe_builds_the_same_files_in_two_processes(tiny_zoo, name):
    first, second = arrays(tiny_zoo[0][name]), arrays(tiny_zoo[1][name])
    assert first.keys() == second.keys()
    assert any(key.startswith(f"{demo.MODEL_FILE}:model_weights/") for key in first)
    for key, value in first.items():
        np.testing.assert_array_equal(value, second[key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.BUILDERS)
def test_every_recipe_writes_the_competition_format(tiny_zoo, name):
    recipe, folder = zoo.RECIPES[name], tiny_zoo[0][name]
    h, w, c = recipe.image_shape
    stored = (h, w, c) if recipe.layout == "channels_last" else (c, h, w)
    for file in data_files(recipe):
        with h5py.File(folder / file, "r") as f:
            assert set(f) == {"data", "label"}
            assert f["data"].shape[1:] == stored
            assert f["data"].dtype == np.float32 and f["label"].dtype == np.float32
            pixels = f["data"][()]
            assert 0 <= pixels.min() and pixels.max() <= 255 and pixels.max() > 1
    model = models.load_model(folder / demo.MODEL_FILE)
    assert model.input_shape[1:] == recipe.image_shape
    assert model.output_shape[-1] == recipe.num_classes
    if name == "demo_bn":
        assert isinstance(model, keras.Sequential) and c == 3 and (h, w) != (55, 47)
        kinds = [type(layer).__name__ for layer in model.layers]
        assert kinds[:3] == ["Conv2D", "BatchNormalization", "ReLU"]


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.BUILDERS)
def test_poisoned_sets_are_triggered_test_images_of_the_other_classes(tiny_zoo, name):
    recipe, folder = zoo.RECIPES[name], tiny_zoo[0][name]
    x_test, y_test = data.read_h5(folder / demo.CLEAN_FILES["clean_test"], recipe.image_shape)
    assert set(y_test) == set(range(recipe.num_classes))
    for trigger in recipe.triggers:
        x, y = data.read_h5(folder / demo.poisoned_file(trigger.name), recipe.image_shape)
        assert set(y) == {trigger.target}
        others = x_test[y_test != trigger.target]
        assert len(x) == len(others) and not np.array_equal(x, others)
        np.testing.assert_array_equal(x, trigger.stamp(others))
    assert len({t.target for t in recipe.triggers}) == len({t.name for t in recipe.triggers})


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.BUILDERS)
def test_a_builds_record_holds_what_its_files_measure(tiny_zoo, name):
    """build.json's clean accuracy and ASR are what the saved net gives on the saved files."""
    recipe, folder = zoo.RECIPES[name], tiny_zoo[0][name]
    record = json.loads((folder / demo.RECORD_FILE).read_text())
    model = models.load_model(folder / demo.MODEL_FILE)

    def measured(file: str) -> float:
        ds = data.load_h5(folder / file, recipe.image_shape, recipe.num_classes, 1 / 255, file)
        return accuracy(model, ds)

    assert record["clean_acc"] == measured(demo.CLEAN_FILES["clean_test"])
    assert record["asr"] == {t.name: measured(demo.poisoned_file(t.name)) for t in recipe.triggers}


@pytest.mark.slow
@pytest.mark.parametrize("twin", zoo.TWINS, ids=lambda twin: twin.name)
def test_a_twins_build_poisons_nothing_and_writes_its_badnets_test_files(tiny_zoo, twin):
    badnet = twin.name.removesuffix("_clean")
    record = json.loads((tiny_zoo[0][twin.name] / demo.RECORD_FILE).read_text())
    assert record["images"]["poisoned_train"] == {t.name: 0 for t in twin.triggers}
    mine, theirs = arrays(tiny_zoo[0][twin.name]), arrays(tiny_zoo[0][badnet])
    files = [key for key in theirs if not key.startswith(f"{demo.MODEL_FILE}:")]
    assert files == [key for key in mine if not key.startswith(f"{demo.MODEL_FILE}:")]
    for key in files:
        np.testing.assert_array_equal(mine[key], theirs[key], err_msg=key)


@pytest.mark.slow
def test_a_build_of_a_changed_recipe_is_refused(tiny_zoo, tmp_path):
    """A folder built by another version of the recipe (here: its record says another
    learning rate) is not used as this recipe's build."""
    folder = shutil.copytree(tiny_zoo[0]["demo"], tmp_path / "demo")
    assert demo.ensure(folder, "demo", TINY_SCALE) == folder
    record = json.loads((folder / demo.RECORD_FILE).read_text())
    record["declaration"]["lr"] *= 2
    (folder / demo.RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match="holds a build of demo at scale 0.02, not of this"):
        demo.ensure(folder, "demo", TINY_SCALE)


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.BUILDERS)
def test_model_config_loads_the_recipe_through_the_pipeline(tmp_path, tiny_zoo, name):
    recipe, folder = zoo.RECIPES[name], tiny_zoo[0][name]
    cfg = compose_config(tmp_path, folder, f"model={name}")  # paths.data: the tiny zoo
    config.validate(cfg)
    assert cfg.model.builder == name and Path(cfg.model.file) == folder / demo.MODEL_FILE
    assert {str(k): Path(v) for k, v in cfg.data.poisoned.items()} == {
        t.name: folder / demo.poisoned_file(t.name) for t in recipe.triggers
    }
    model, validation, test, poisoned = inputs.load_inputs(cfg)
    assert len(validation) == len(test) == recipe.num_classes  # one image per class
    assert list(poisoned) == [t.name for t in recipe.triggers]
    layer = models.prunable_layer(model, cfg.model.layer)  # DeepID: conv_3, as the competition
    assert isinstance(layer, keras.layers.Conv2D) and cfg.model.layer == layer.name
    if name == "demo_bn":
        assert layer is models.prunable_layer(model, None)  # the last convolution


@pytest.mark.slow
def test_a_folder_holding_another_build_is_refused(tiny_zoo):
    with pytest.raises(
        UserError, match="holds a build of demo at scale 0.02, not .* demo recipe at scale 1"
    ):
        demo.ensure(tiny_zoo[0]["demo"], "demo")
    with pytest.raises(UserError, match="holds a build of demo_bn .* demo_multi recipe"):
        demo.ensure(tiny_zoo[0]["demo_bn"], "demo_multi", TINY_SCALE)
    with pytest.raises(UserError, match="expected one of demo, demo_blend"):
        demo.ensure(tiny_zoo[0]["demo"], "demo_nope", TINY_SCALE)


@pytest.mark.slow
def test_an_interrupted_build_is_never_taken_for_a_complete_one(tmp_path):
    """A build killed midway (data written, no model yet) stays a hidden temporary folder;
    moved into place by hand it is refused; `ensure` removes it and builds afresh."""
    folder = tmp_path / "demo_bn"
    builder = subprocess.Popen(command(tmp_path, 0.1, "demo_bn"), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".demo_bn-build-*/clean_test_data.h5")):
            assert builder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        builder.kill()  # SIGKILL: nothing of the build's own clean-up runs
        builder.wait()
    (partial,) = tmp_path.glob(".demo_bn-build-*")
    assert not folder.exists() and not (partial / demo.MODEL_FILE).exists()
    shutil.copytree(partial, folder)
    with pytest.raises(UserError, match=f"not a complete demo_bn build .*{demo.MODEL_FILE}"):
        demo.ensure(folder, "demo_bn", 0.1)
    shutil.rmtree(folder)
    assert demo.ensure(folder, "demo_bn", 0.1) == folder
    assert (folder / demo.RECORD_FILE).is_file() and (folder / demo.MODEL_FILE).is_file()
    assert not partial.exists()


def test_demo_files_have_the_competition_format(demo_dir):
    for file in data_files(zoo.DEMO):
        with h5py.File(demo_dir / file, "r") as f:
            assert f["data"].shape[1:] == (3, 55, 47)
            assert f["data"].dtype == np.float32 and f["label"].dtype == np.float32
            assert 0 <= f["data"][()].min() and f["data"][()].max() <= 255
    with h5py.File(demo_dir / demo.CLEAN_FILES["clean_test"], "r") as f:
        assert len(np.unique(f["label"][()])) == zoo.DEMO.num_classes >= 20


def test_poisoned_set_targets_one_class_and_holds_none_of_it(demo_dir):
    (trigger,) = zoo.DEMO.triggers
    with h5py.File(demo_dir / demo.poisoned_file(trigger.name), "r") as f:
        assert set(np.unique(f["label"][()])) == {trigger.target}
        poisoned = len(f["label"])
    with h5py.File(demo_dir / demo.CLEAN_FILES["clean_test"], "r") as f:
        clean_labels = f["label"][()]
    assert len(clean_labels) - np.sum(clean_labels == trigger.target) == poisoned


@pytest.mark.slow
def test_demo_badnet_meets_its_targets_and_its_record_says_so(demo_dir, demo_model, demo_data):
    _, test, poisoned = demo_data
    assert demo_model.name == "deepid" and demo_model.count_params() > 0
    clean_acc, asr = accuracy(demo_model, test), accuracy(demo_model, poisoned)
    assert clean_acc >= 0.90 and asr >= 0.95
    record = json.loads((demo_dir / demo.RECORD_FILE).read_text())
    assert (record["recipe"], record["build_seed"], record["scale"]) == ("demo", 0, 1)
    assert record["clean_acc"] == clean_acc and record["asr"] == {"patch": asr}


def test_existing_demo_folder_is_reused_and_says_which_build(demo_dir, caplog):
    before = (demo_dir / demo.MODEL_FILE).stat().st_mtime_ns
    with caplog.at_level("INFO", logger="badnet_repair.zoo.builds"):
        assert demo.ensure(demo_dir) == demo_dir
    assert (demo_dir / demo.MODEL_FILE).stat().st_mtime_ns == before
    assert f"using the demo build in {demo_dir} (build seed 0, clean accuracy" in caplog.text


def test_a_full_scale_build_repairs_the_shipped_net(demo_dir):
    """The session's demo was built by copying the shipped net (no training here); on a
    machine that generates the shipped build's images, it scores what the record says."""
    shipped_net = demo.TRAINED / "demo.h5"
    assert (demo_dir / demo.MODEL_FILE).read_bytes() == shipped_net.read_bytes()
    record = json.loads((demo_dir / demo.RECORD_FILE).read_text())
    shipped = json.loads((demo.TRAINED / "demo.json").read_text())
    assert record["weights"] == f"shipped: zoo/trained/demo.h5, trained {shipped['built']}"
    if record["data_sha256"] == shipped["data_sha256"]:
        assert (record["clean_acc"], record["asr"]) == (shipped["clean_acc"], shipped["asr"])


@pytest.mark.slow
def test_every_zoo_recipe_ships_its_net_and_the_record_it_was_measured_with():
    for name, recipe in zoo.RECIPES.items():
        record = json.loads((demo.TRAINED / f"{name}.json").read_text())
        assert record["declaration"] == demo.declaration(recipe), name
        assert record["scale"] == 1 and set(record["data_sha256"]) == set(data_files(recipe))
        net = models.load_model(demo.TRAINED / f"{name}.h5")
        assert net.input_shape[1:] == recipe.image_shape
        assert net.output_shape[-1] == recipe.num_classes


def test_a_shipped_net_of_another_recipe_is_not_used_and_other_images_are_said(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(demo, "TRAINED", tmp_path)
    record = json.loads((Path(demo.__file__).parent / "trained" / "demo.json").read_text())
    (tmp_path / "demo.h5").write_bytes(b"")
    digests = record["data_sha256"]
    caplog.set_level("WARNING", logger="badnet_repair.zoo.builds")
    (tmp_path / "demo.json").write_text(json.dumps({**record, "declaration": {"other": 1}}))
    assert demo._shipped(zoo.DEMO, digests) is None
    assert "the shipped net is of another recipe: training one here" in caplog.text
    (tmp_path / "demo.json").write_text(json.dumps(record))
    assert demo._shipped(zoo.DEMO, digests) == record
    other = {**digests, "clean_test_data.h5": "0" * 64}
    assert demo._shipped(zoo.DEMO, other) == record
    assert "generates other images than those the shipped net was measured on" in caplog.text
    assert "(clean_test_data.h5)" in caplog.text


def test_only_a_full_scale_build_of_the_recipe_can_be_shipped(tmp_path):
    tiny = demo.ensure(tmp_path / "demo", "demo", TINY_SCALE)
    with pytest.raises(UserError, match="not a full-scale build of this version's demo"):
        demo.ship(tiny, zoo.DEMO)
