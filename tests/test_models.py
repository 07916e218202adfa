import json
import zipfile

import h5py
import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.network import models

from conftest import SHARED

CSAW_NETS = ["sunglasses", "anonymous_1", "anonymous_2", "multi_trigger_multi_target", "lab3"]


def test_deepid_matches_the_competition_network():
    model = models.build_deepid()
    assert model.count_params() == 601_643
    assert model.get_layer("conv_3").output_shape == (None, 10, 8, 60)
    assert model.get_layer("conv_4").output_shape == (None, 4, 3, 80)
    assert models.prunable_layer(model, None).name == "conv_4"


@pytest.mark.skipif(
    not SHARED.is_dir(), reason="../shared/csaw-hackml-2020 is not beside this clone"
)
@pytest.mark.parametrize("net", CSAW_NETS)
def test_real_csaw_weights_load_into_deepid(net):
    path = SHARED / "models" / f"{net}_bd_weights.h5"
    model = models.load_model(path, architecture="deepid")
    assert models.num_classes(model) == 1283 and models.input_shape(model) == (55, 47, 3)
    with h5py.File(path, "r") as f:
        stored = f["conv_3"]["conv_3"]["kernel:0"][()]
    np.testing.assert_array_equal(model.get_layer("conv_3").get_weights()[0], stored)


def test_weights_only_file_needs_an_architecture(tmp_path):
    path = tmp_path / "w.h5"
    models.build_deepid(num_classes=7).save_weights(str(path))
    with pytest.raises(UserError, match="set model.architecture"):
        models.load_model(path)
    assert models.num_classes(models.load_model(path, architecture="deepid")) == 7
    with pytest.raises(UserError, match="model.architecture='vgg'"):
        models.load_model(path, architecture="vgg")


def test_not_a_model_file(tmp_path):
    (tmp_path / "x.h5").write_text("hello")
    with pytest.raises(UserError, match="not a Keras .h5 or .keras model file"):
        models.load_model(tmp_path / "x.h5")
    with pytest.raises(UserError, match="not found"):
        models.load_model(tmp_path / "absent.h5")


def test_lambda_layer_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = lambda_model_file(tmp_path, marker)
    with pytest.raises(UserError, match="layer 'innocent' is a Lambda.*model.allow_unsafe=true"):
        models.load_model(path)
    assert not marker.exists()

    models.load_model(path, allow_unsafe=True)  # the opt-in really does run the file's code
    assert marker.read_text() == "ran"


def test_prunable_layer_errors_name_the_key(demo_model):
    assert models.prunable_layer(demo_model, "conv_3").name == "conv_3"
    assert models.prunable_layer(demo_model, "fc_1").name == "fc_1"
    with pytest.raises(
        UserError, match="model.layer='conv_9': no such layer; prunable layers: conv_1"
    ):
        models.prunable_layer(demo_model, "conv_9")
    with pytest.raises(UserError, match="model.layer='pool_3': a MaxPooling2D"):
        models.prunable_layer(demo_model, "pool_3")


def test_save_model_is_atomic_and_reloads(demo_model, tmp_path):
    path = models.save_model(demo_model, tmp_path / "sub" / "net.h5")
    assert sorted(p.name for p in path.parent.iterdir()) == ["net.h5"]
    again = models.load_model(path)
    for a, b in zip(again.get_weights(), demo_model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def lambda_model_file(tmp_path, marker):
    """A real .h5 model whose Lambda layer writes `marker` when tf_keras rebuilds it."""
    payload = eval(
        f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]"
    )
    inp = keras.Input((4,))
    out = keras.layers.Dense(2)(keras.layers.Lambda(payload, name="innocent")(inp))
    path = tmp_path / "evil.h5"
    keras.Model(inp, out).save(str(path))
    marker.unlink()
    return path


def set_config(path, config):
    with h5py.File(path, "r+") as f:
        f.attrs["model_config"] = json.dumps(config)


def test_lambda_in_an_old_style_sequential_list_is_refused(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = lambda_model_file(tmp_path, marker)
    with h5py.File(path, "r") as f:
        functional = json.loads(f.attrs["model_config"])
    lambda_layer = next(x for x in functional["config"]["layers"] if x["class_name"] == "Lambda")
    lambda_layer["config"]["batch_input_shape"] = [None, 4]
    set_config(path, {"class_name": "Sequential", "config": [lambda_layer]})
    with pytest.raises(UserError, match="layer 'innocent' is a Lambda"):
        models.load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["layer", "backward_layer", "cell"])
def test_lambda_nested_anywhere_in_the_config_is_refused(tmp_path, key):
    marker = tmp_path / "pwned.txt"
    path = lambda_model_file(tmp_path, marker)
    with h5py.File(path, "r") as f:
        config = json.loads(f.attrs["model_config"])
    layers = config["config"]["layers"]
    hidden = next(x for x in layers if x["class_name"] == "Lambda")
    wrapper = {"class_name": "Bidirectional", "config": {"name": "wrap", key: hidden}}
    config["config"]["layers"] = [wrapper if x is hidden else x for x in layers]
    set_config(path, config)
    with pytest.raises(UserError, match="layer 'innocent' is a Lambda"):
        models.load_model(path)
    assert not marker.exists()


def test_hdf5_file_with_a_harmless_zip_appended_is_checked_as_hdf5(tmp_path):
    marker = tmp_path / "pwned.txt"
    path = lambda_model_file(tmp_path, marker)
    decoy = tmp_path / "decoy.keras"
    models.save_model(models.build_deepid(num_classes=3), decoy)
    with open(path, "ab") as f:
        f.write(decoy.read_bytes())
    assert zipfile.is_zipfile(path) and h5py.is_hdf5(path)
    with pytest.raises(UserError, match="layer 'innocent' is a Lambda"):
        models.load_model(path)
    assert not marker.exists()


def test_keras_archive_naming_a_foreign_module_is_refused(tmp_path):
    path = tmp_path / "net.keras"
    models.save_model(models.build_deepid(num_classes=3), path)
    with zipfile.ZipFile(path) as z:
        parts = {name: z.read(name) for name in z.namelist()}
    config = json.loads(parts["config.json"])
    config["config"]["layers"][1]["module"] = "antigravity"
    parts["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, content in parts.items():
            z.writestr(name, content)
    with pytest.raises(UserError, match="names module 'antigravity'.*model.allow_unsafe"):
        models.load_model(path)
