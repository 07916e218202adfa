"""SCALE-UP: the copies are the amplified, clipped input; the score is the share of copies
given the input's class; the threshold reads clean validation images only; the GoodNet's
flag is the numpy rule exactly."""

from types import SimpleNamespace

import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import UserError, data
from badnet_repair.defenses import detectors, goodnet, variants
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.defenses.detectors import scale_up
from badnet_repair.network.predict import predict_classes

FACTORS = [3, 5, 7, 9, 11]


def settings(**kw) -> SimpleNamespace:
    base = dict(
        detector="scale_up",
        frr=0.1,
        pixel_max=1.0,
        scale_up_factors=FACTORS,
        scale_up_classwise=False,
        teco_corruptions=["contrast", "brightness"],
    )
    return SimpleNamespace(**{**base, **kw})


def brightness_net() -> keras.Model:
    """Class 1 where the mean pixel exceeds 0.5, else class 0: scores [0.5, mean(x)]."""
    inp = keras.Input((4, 4, 1))
    flat = keras.layers.Flatten()(inp)
    out = keras.layers.Dense(2, activation="softmax", name="out")(flat)
    model = keras.Model(inp, out)
    kernel = np.zeros((16, 2))
    kernel[:, 1] = 1 / 16
    model.get_layer("out").set_weights([kernel, np.array([0.5, 0.0])])
    return model


def fitted_on(model, clean_x, **kw) -> detectors.Fitted:
    clean = data.Dataset("clean", clean_x, predict_classes(model, clean_x))
    context = detectors.Context(
        model, model, CleanData(clean, clean, clean), settings(**kw), 0, 64, Memo()
    )
    return detectors.fit(["scale_up"], context)[0]


def judge(model, fitted, x) -> tuple[np.ndarray, np.ndarray]:
    classes = predict_classes(model, x)
    return fitted.judge(detectors.Inputs("x", x, classes, classes))


def test_copies_are_the_input_amplified_and_clipped():
    model = brightness_net()
    copier = variants.copies_model(model, scale_up.amplify(FACTORS, 1.0), "s_")
    x = np.random.default_rng(0).uniform(0, 0.3, (5, 4, 4, 1)).astype(np.float32)
    copies = copier(x).numpy()
    assert copies.shape == (5, len(FACTORS), 4, 4, 1)
    for i, f in enumerate(FACTORS):
        np.testing.assert_allclose(copies[:, i], np.minimum(f * x, 1.0), rtol=1e-6)


def test_consistency_on_a_net_whose_answer_under_amplification_is_known():
    """Bright images (mean > 0.5) stay class 1 when amplified, black ones class 0: SPC 1.
    A dark grey of 0.12 is class 0 at x3 (0.36) and class 1 from x5 (0.6) on: SPC 1/5."""
    model = brightness_net()
    x = np.stack([np.full((4, 4, 1), v, np.float32) for v in (0.7, 0.0, 0.12)])
    rng = np.random.default_rng(1)
    clean_x = rng.uniform(0.0, 0.15, (40, 4, 4, 1)).astype(np.float32)
    fitted = fitted_on(model, clean_x)
    scores, flags = judge(model, fitted, x)
    np.testing.assert_allclose(scores, [1.0, 1.0, 0.2])
    assert scale_up.consistency(np.array([[1, 1, 0], [2, 2, 2]]), np.array([1, 0])).tolist() == [
        2 / 3,
        0.0,
    ]
    # the GoodNet answers N ("poisoned") exactly where the numpy rule flags
    gn = goodnet.build_goodnet(model, model, [fitted])
    assert ((predict_classes(gn.model, x) == 2) == flags).all()


def test_threshold_is_conformal_on_the_clean_validation_consistencies():
    model = brightness_net()
    clean_x = np.random.default_rng(2).uniform(0.0, 0.2, (60, 4, 4, 1)).astype(np.float32)
    fitted = fitted_on(model, clean_x)
    expected, _ = judge(model, fitted, clean_x)
    np.testing.assert_array_equal(fitted.calibration_scores, expected)
    rank = int(np.ceil(61 * 0.9))
    assert fitted.threshold == np.sort(expected)[rank - 1]
    assert fitted.metrics["calibration_images"] == 60


def test_class_statistics_fall_back_to_pooled_and_floor_the_std():
    spc = np.array([1.0, 1.0, 0.2, 0.6, 0.4])
    classes = np.array([0, 0, 1, 1, 2])  # class 2 has one image, class 3 none
    mean, std = scale_up.class_statistics(spc, classes, 4)
    assert mean.tolist() == pytest.approx([1.0, 0.4, spc.mean(), spc.mean()])
    assert std.tolist() == pytest.approx([0.0, 0.2, spc.std(), spc.std()])
    z = scale_up.normalise(np.array([1.0, 0.8]), np.array([0, 1]), mean, std, 0.2)
    assert z.tolist() == pytest.approx([0.0, 2.0])  # class 0's std 0 floored at 1/5


@pytest.mark.slow
def test_classwise_goodnet_follows_the_numpy_rule(demo_model, demo_data):
    """The data-limited variant on the demo: statistics from one half of the clean
    images, threshold on the other half, the GoodNet's per-class cut equal to the rule."""
    val, test, poisoned = demo_data
    fitted = fitted_on(demo_model, val.x[::3], scale_up_classwise=True)
    assert fitted.metrics["calibration_images"] == len(val.x[::3]) - len(val.x[::3]) // 2
    x = np.concatenate([test.x[::16], poisoned.x[::16]])
    _, flags = judge(demo_model, fitted, x)
    gn = goodnet.build_goodnet(demo_model, demo_model, [fitted])
    answered_n = predict_classes(gn.model, x) == 40
    assert (answered_n == flags).all()
    assert 0 < flags[len(test.x[::16]) :].mean() and flags[: len(test.x[::16])].mean() < 0.5


def test_bad_settings_are_refused_before_any_work():
    clean = SimpleNamespace(validation=data.Dataset("v", np.zeros((30, 2, 2, 1)), np.zeros(30)))
    with pytest.raises(UserError, match="scale_up_factors=\\[1, 3\\]: expected"):
        scale_up.check(None, settings(scale_up_factors=[1, 3]), clean, 64)
    with pytest.raises(UserError, match="15 clean images for its threshold"):
        scale_up.check(None, settings(scale_up_classwise=True), clean, 64)
    clean.validation.x[0, 0, 0, 0] = 255.0
    with pytest.raises(UserError, match="outside \\[0, goodnet.pixel_max=1\\]"):
        scale_up.check(None, settings(), clean, 64)
