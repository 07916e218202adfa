"""TeCo: each corruption does what its name says, the flip severity and its spread are
computed right, the seed fixes every score, the GoodNet's flag is the numpy rule."""

from types import SimpleNamespace

import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import UserError, data
from badnet_repair.defenses import detectors, goodnet, variants
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.defenses.detectors import teco
from badnet_repair.network.predict import predict_classes

KINDS = list(teco.SEVERITY)


def settings(**kw) -> SimpleNamespace:
    base = dict(detector="teco", frr=0.1, pixel_max=1.0, teco_corruptions=KINDS)
    return SimpleNamespace(**{**base, **kw})


def fitted_on(model, clean_x, seed=0, **kw) -> detectors.Fitted:
    clean = data.Dataset("clean", clean_x, predict_classes(model, clean_x))
    context = detectors.Context(
        model, model, CleanData(clean, clean, clean), settings(**kw), seed, 64, Memo()
    )
    return detectors.fit(["teco"], context)[0]


def scores(model, fitted, x) -> tuple[np.ndarray, np.ndarray]:
    classes = predict_classes(model, x)
    return fitted.judge(detectors.Inputs("x", x, classes, classes))


def copies(kinds, x, seed=0, high=1.0) -> np.ndarray:
    inp = keras.Input(x.shape[1:])
    model = keras.Model(inp, keras.layers.Flatten()(inp))
    return variants.copies_model(model, teco.corrupt(kinds, high, seed), "t_")(x).numpy()


def test_flip_severity_and_spread_are_computed_right():
    on_input = np.array([3, 3])
    # two types, severities 1-5: type 0 flips at 3 (then back: still 3), type 1 never
    first = [3, 3, 0, 3, 1] + [3] * 5
    second = [0] * 5 + [3, 3, 3, 3, 0]  # flips at 1; flips at 5
    sev = teco.flip_severities(np.array([first, second]), on_input)
    assert sev.tolist() == [[3, 6], [1, 5]]
    np.testing.assert_allclose(teco.spread(sev), np.std(sev, axis=1))
    sev = np.array([[1, 6, 2, 6, 3, 6], [6, 6, 6, 6, 6, 6]])
    np.testing.assert_allclose(teco.spread(sev), np.std(sev, axis=1))


@pytest.mark.slow
def test_a_constant_net_never_flips():
    """A net answering class 2 whatever the input: severity 6 for every corruption, a
    spread of 0 for every input, and the GoodNet flags nothing."""
    inp = keras.Input((6, 5, 3))
    out = keras.layers.Dense(4, activation="softmax", name="out")(keras.layers.Flatten()(inp))
    model = keras.Model(inp, out)
    model.get_layer("out").set_weights([np.zeros((90, 4)), np.array([0.0, 0.0, 1.0, 0.0])])
    x = np.random.default_rng(0).uniform(0, 1, (30, 6, 5, 3)).astype(np.float32)
    fitted = fitted_on(model, x)
    copier = variants.copies_model(model, teco.corrupt(KINDS, 1.0, 0), "t_")
    on_copies = variants.classes_of_copies(model, copier, x, 64)
    assert on_copies.shape == (30, 5 * len(KINDS)) and (on_copies == 2).all()
    assert (teco.flip_severities(on_copies, np.full(30, 2)) == 6).all()
    got, flags = scores(model, fitted, x)
    assert (got == 0).all() and not flags.any()
    gn = goodnet.build_goodnet(model, model, [fitted])
    assert (predict_classes(gn.model, x) == 2).all()


def test_corruptions_do_what_their_names_say():
    rng = np.random.default_rng(3)
    x = rng.uniform(0.2, 0.8, (2, 11, 9, 3)).astype(np.float32)
    flat = x.reshape(2, -1)

    def of(kind) -> np.ndarray:
        return copies([kind], x).reshape(2, 5, -1)

    noisy = of("gaussian_noise")  # one draw, scaled by each severity's std
    std = (noisy - flat[:, None]).std(axis=2)
    assert (np.diff(std, axis=1) > 0).all() and abs(std[0, -1] - 0.38) < 0.08
    impulse = of("impulse_noise")
    changed = np.mean(~np.isclose(impulse, flat[:, None]), axis=2)
    np.testing.assert_allclose(changed.mean(axis=0), teco.SEVERITY["impulse_noise"], atol=0.05)
    assert set(np.unique(impulse[~np.isclose(impulse, flat[:, None])])) <= {0.0, 1.0}
    bright = of("brightness")
    np.testing.assert_allclose(bright[:, 0], np.minimum(flat + 0.1, 1.0), rtol=1e-6)
    contrast = copies(["contrast"], x)  # channel means kept, spread cut to c
    means = x.mean(axis=(1, 2))
    np.testing.assert_allclose(contrast.mean(axis=(2, 3)), means[:, None].repeat(5, 1), atol=1e-5)
    np.testing.assert_allclose(
        contrast[:, 4] - means[:, None, None], (x - means[:, None, None]) * 0.05, atol=1e-5
    )
    grey = np.full((1, 11, 9, 3), 0.4, np.float32)  # blur renormalised at the border
    np.testing.assert_allclose(copies(["gaussian_blur"], grey), 0.4, rtol=1e-5)
    tiles = copies(["pixelate"], x)[:, 0]  # 2 x 2 blocks: each tile holds its mean
    np.testing.assert_allclose(
        tiles[:, :2, :2],
        x[:, :2, :2].mean(axis=(1, 2), keepdims=True).repeat(2, 1).repeat(2, 2),
        rtol=1e-5,
    )
    assert len(np.unique(tiles[0, :, :, 0])) <= 6 * 5


@pytest.mark.slow
def test_the_seed_fixes_every_score(demo_model, demo_data):
    val, test, poisoned = demo_data
    x = np.concatenate([test.x[:20], poisoned.x[:20]])
    kinds = ["gaussian_noise", "impulse_noise", "contrast"]
    runs = [fitted_on(demo_model, val.x[:30], teco_corruptions=kinds) for _ in range(2)]
    got = [scores(demo_model, f, x)[0] for f in runs]  # two fits at seed 0, apart
    np.testing.assert_array_equal(got[0], got[1])
    assert np.ptp(got[0]) > 0  # scores that differ from image to image, compared
    noise = [copies(["gaussian_noise"], test.x[:1], seed) for seed in (0, 0, 1)]
    np.testing.assert_array_equal(noise[0], noise[1])
    assert not np.allclose(noise[0], noise[2])


@pytest.mark.slow
def test_goodnet_follows_the_numpy_rule_on_the_demo(demo_model, demo_data):
    val, test, poisoned = demo_data
    calibration = val.x[::12]  # 100 images, every corruption: 3,000 copies
    fitted = fitted_on(demo_model, calibration)
    assert fitted.metrics["calibration_images"] == len(calibration)
    clean = test.x[::64]
    x = np.concatenate([clean, poisoned.x[::64]])
    got, flags = scores(demo_model, fitted, x)
    gn = goodnet.build_goodnet(demo_model, demo_model, [fitted])
    assert ((predict_classes(gn.model, x) == 40) == flags).all()
    assert flags[len(clean) :].mean() > flags[: len(clean)].mean()
    np.testing.assert_array_equal(
        fitted.calibration_scores, scores(demo_model, fitted, calibration)[0]
    )


def test_bad_settings_are_refused_before_any_work():
    clean = SimpleNamespace(validation=data.Dataset("v", np.zeros((30, 2, 2, 1)), np.zeros(30)))
    with pytest.raises(UserError, match="teco_corruptions=\\['fog', 'contrast'\\]: expected"):
        teco.check(None, settings(teco_corruptions=["fog", "contrast"]), clean, 64)
    with pytest.raises(UserError, match="expected two or more"):
        teco.check(None, settings(teco_corruptions=["contrast", "contrast"]), clean, 64)
    small = SimpleNamespace(validation=data.Dataset("v", np.zeros((10, 2, 2, 1)), np.zeros(10)))
    with pytest.raises(UserError, match="10 clean images for its threshold"):
        teco.check(None, settings(), small, 64)
