import h5py
import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import UserError, models

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
    payload = eval(
        f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]"
    )
    inp = keras.Input((4,))
    out = keras.layers.Dense(2)(keras.layers.Lambda(payload, name="innocent")(inp))
    path = tmp_path / "evil.h5"
    keras.Model(inp, out).save(str(path))
    marker.unlink()

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
