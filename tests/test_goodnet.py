"""GoodNet: answers follow the exact rule, the file loads in plain TensorFlow, the CLI agrees."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from badnet_repair import UserError, data
from badnet_repair.defenses import detectors, goodnet
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.defenses.detectors import badexpert, disagreement, teco
from badnet_repair.experiment import answer
from badnet_repair.experiment.evaluate import (
    Answers,
    classify,
    goodnet_answers,
    goodnet_metrics,
    goodnet_scores,
)
from badnet_repair.network import models, predict, topology
from badnet_repair.network.predict import predict_classes
from badnet_repair.network.pruning import activation_prune, channel_count, copy_model, rank_channels
from badnet_repair.network.training import finetune

N = 40
K = 8
FRR = 0.05
CHOICES = {
    "disagreement": ["disagreement"],
    "strip": ["strip"],
    "badexpert": ["badexpert"],
    "both": ["disagreement", "strip"],
    "badexpert_disagreement": ["badexpert", "disagreement"],
}
# BaDExpert's settings for the small sets here: the expert forgets within 2 epochs
EXPERT = dict(expert_lr=2e-3, expert_epochs=2, expert_batch_size=32, expert_stop_acc=0.2)
AUX = dict(auxiliary="repaired", aux_lr=1e-3, aux_epochs=1)


def fit_detectors(badnet, repaired, clean, k=K, frr=FRR) -> dict[str, dict]:
    """Each choice's detectors fitted and calibrated together as the pipeline does, on the
    clean set `clean` (a quarter held out, as the pipeline holds out data.holdout); one
    memo, so each detector learns once. {choice: {name: fitted}}."""
    settings = SimpleNamespace(detector="both", k=k, frr=frr, alpha=0.5, **EXPERT, **AUX)
    train, holdout = data.split(clean, 0.25, seed=0)
    context = detectors.Context(
        badnet, repaired, CleanData(clean, train, holdout), settings, 0, 512, Memo()
    )
    return {
        choice: {d.name: d for d in detectors.fit(names, context)}
        for choice, names in CHOICES.items()
    }


def build(badnet, repaired, fitted, choice: str) -> goodnet.GoodNet:
    return goodnet.build_goodnet(badnet, repaired, list(fitted[choice].values()))


@pytest.fixture(scope="module")
def split(demo_data):
    """The validation set in two: fine-tuning the repair, and clean images for the GoodNet."""
    return data.split(demo_data[0], 1 / 3, seed=0)


@pytest.fixture(scope="module")
def repaired(demo_model, split):
    """A cheap repair: activation pruning of conv_3 at 0.9, one epoch of fine-tuning."""
    train = split[0]
    order = rank_channels(demo_model, "conv_3", train.x)
    pruned = activation_prune(demo_model, "conv_3", order, channel_count(0.9, len(order)))
    finetune(pruned.model, train, None, 1, 1e-3, 32, pruning=pruned)
    return pruned.export()


@pytest.fixture(scope="module")
def fitted(demo_model, repaired, split):
    return fit_detectors(demo_model, repaired, split[1])


@pytest.fixture(scope="module")
def goodnets(demo_model, repaired, fitted):
    return {choice: build(demo_model, repaired, fitted, choice) for choice in CHOICES}


@pytest.fixture(scope="module")
def sample(demo_data):
    """Clean and triggered test images, about half each: every 16th of each file (100
    clean images, 2 or 3 of every class, and 98 triggered)."""
    _, test, poisoned = demo_data
    return np.concatenate([test.x[::16], poisoned.x[::16]])


def entropies(model, x, overlays, alpha):
    """Mean prediction entropy over the blends, straight from the definition."""
    blends = ((1 - alpha) * x[:, None] + alpha * overlays[None]).astype(np.float32)
    p = model.predict(blends.reshape(-1, *x.shape[1:]), verbose=0).astype(np.float64)
    if topology.output_kind(model) == "linear":  # raw scores: probabilities are their softmax
        p = np.exp(p - p.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
    h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
    return h.reshape(len(x), len(overlays)).mean(axis=1)


def reference(badnet, repaired, x, gn: goodnet.GoodNet, fitted: dict):
    """The exact rule in numpy, and which inputs are float near-ties that rounding may decide."""
    p_bad, p_rep = badnet.predict(x, verbose=0), repaired.predict(x, verbose=0)
    answer = p_rep.argmax(axis=1)
    flag = np.zeros(len(x), dtype=bool)
    near = np.zeros(len(x), dtype=bool)
    if "disagreement" in gn.detectors:
        probs = predict.probabilities(repaired, x)  # a softmax where the net gives raw scores
        gap = probs.max(axis=1) - probs[np.arange(len(x)), p_bad.argmax(axis=1)]
        threshold = fitted["disagreement"].threshold
        flag |= gap > threshold
        near |= np.abs(gap - threshold) < 1e-5
        for p in (p_bad, p_rep):
            top2 = np.sort(p, axis=1)[:, -2:]
            near |= top2[:, 1] - top2[:, 0] < 1e-6
    if "strip" in gn.detectors:
        learned, threshold = fitted["strip"].parts, fitted["strip"].metrics["entropy_threshold"]
        h = entropies(badnet, x, learned["overlays"], learned["alpha"])
        flag |= h < threshold
        near |= np.abs(h - threshold) < 1e-5
    if "badexpert" in gn.detectors:
        expert, aux = fitted["badexpert"].parts["expert"], fitted["badexpert"].parts["auxiliary"]
        label, rows = p_bad.argmax(axis=1), np.arange(len(x))
        s = badexpert.triangle(
            predict.probabilities(expert, x)[rows, label],
            predict.probabilities(aux, x)[rows, label],
        )
        threshold = fitted["badexpert"].threshold
        flag |= s > threshold
        near |= np.abs(s - threshold) < 1e-5 * max(1.0, abs(threshold))
        top2 = np.sort(p_bad, axis=1)[:, -2:]
        near |= top2[:, 1] - top2[:, 0] < 1e-6
    return np.where(flag, gn.num_classes, answer), near


@pytest.mark.slow
@pytest.mark.parametrize("detector", list(CHOICES))
def test_answers_follow_the_exact_rule(demo_model, repaired, fitted, goodnets, sample, detector):
    gn = goodnets[detector]
    assert gn.model.output_shape == (None, N + 1)
    expected, near = reference(demo_model, repaired, sample, gn, fitted[detector])
    answers = np.argmax(gn.model.predict(sample, verbose=0), axis=1)
    differ = answers != expected
    assert not np.any(differ & ~near), np.flatnonzero(differ & ~near)
    assert differ.sum() <= 1  # at most a float near-tie
    assert np.any(expected == N) and np.any(expected != N)  # both kinds of answer are covered
    np.testing.assert_array_equal(predict_classes(gn.model, sample, 64), answers)


@pytest.mark.slow
@pytest.mark.parametrize("detector", list(CHOICES))
def test_metrics_from_answers_match_running_the_goodnet(
    demo_model, repaired, fitted, goodnets, demo_data, detector
):
    """The pipeline scores a GoodNet by its rule on answers it already has (B's and B''s
    classes, each detector's flags): the same numbers as running the saved GoodNet."""
    _, test, poisoned = demo_data
    test = data.Dataset("clean_sixteenth", test.x[::16], test.y[::16])
    sets = {"patch": data.Dataset("patch_sixteenth", poisoned.x[::16], poisoned.y[::16])}
    gn = goodnets[detector]
    bad, rep = classify(demo_model, test, sets), classify(repaired, test, sets)

    def flagged(name: str, trigger: str | None):
        ds = test if trigger is None else sets[trigger]
        judged = detectors.Inputs(ds.name, ds.x, bad.of(trigger), rep.of(trigger))
        return fitted[detector][name].flags(judged)

    flags = [Answers(flagged(n, None), {"patch": flagged(n, "patch")}) for n in gn.detectors]
    answers = goodnet_answers(rep, N, flags)
    from_answers = goodnet_scores(answers, test, sets, N)
    assert from_answers == goodnet_metrics(gn.model, test, sets, N)
    assert 0 < from_answers["goodnet/flag_rate_clean"] < 1  # both kinds of answer occur
    assert 0 < from_answers["goodnet/detect/patch"]


@pytest.mark.slow
def test_strip_threshold_is_set_on_the_clean_images_not_drawn(demo_model, fitted, split):
    strip = fitted["strip"]["strip"]  # alone, calibrated at FRR
    learned, threshold = strip.parts, strip.metrics["entropy_threshold"]
    clean_x, overlays = split[1].x, learned["overlays"]
    is_overlay = np.array([np.any(np.all(overlays == img, axis=(1, 2, 3))) for img in clean_x])
    assert is_overlay.sum() == K and len(learned["entropies"]) == len(clean_x) - K
    h = entropies(demo_model, clean_x[~is_overlay], overlays, learned["alpha"])
    rank = int(np.ceil((len(h) + 1) * (1 - FRR)))  # the conformal rank of the score -h
    assert threshold == pytest.approx(-np.sort(-h)[rank - 1], rel=1e-5)
    assert FRR - 2 / len(h) <= np.mean(h < threshold) <= FRR
    assert strip.metrics["frr_bound"] == pytest.approx(1 - rank / (len(h) + 1))


@pytest.mark.slow
def test_strips_overlays_leave_every_held_out_image_to_the_joint_calibration(fitted, split):
    """STRIP draws its overlays from the training split: calibrated together with
    disagreement (`both`), which may use the held-out split only, the GoodNet keeps all
    of it (drawn from every clean image with the split's own seed, the overlays were
    held-out images, and k of them were lost)."""
    held = data.split(split[1], 0.25, seed=0)[1]
    both = fitted["both"]
    assert both["strip"].metrics["calibration_images"] == len(held)
    assert both["disagreement"].metrics["calibration_images"] == len(held)
    assert len(both["strip"].calibration_scores) == len(split[1]) - K


@pytest.mark.slow
def test_a_pair_is_calibrated_together_on_the_held_out_images(demo_model, repaired, fitted, split):
    """BaDExpert and disagreement in one GoodNet: their thresholds are the joint rule's on
    both scores of the same held-out images, with one bound for both, and the pair flags
    at most FRR of those images."""
    pair = fitted["badexpert_disagreement"]
    holdout = data.split(split[1], 0.25, seed=0)[1]
    answers = (predict_classes(demo_model, holdout.x), predict_classes(repaired, holdout.x))
    judged = detectors.Inputs(holdout.name, holdout.x, *answers)
    scores = np.stack([pair[name].score(judged) for name in CHOICES["badexpert_disagreement"]], 1)
    joint = detectors.calibrate(scores, FRR, "pair")
    assert pair["badexpert"].threshold == pytest.approx(joint.thresholds[0], rel=1e-9)
    margin = joint.thresholds[1] + disagreement.MARGIN
    assert pair["disagreement"].threshold == pytest.approx(margin, rel=1e-9)
    bounds = {pair[name].metrics["frr_bound"] for name in pair}
    assert bounds == {joint.bound} and joint.bound <= FRR
    assert {pair[name].metrics["calibration_images"] for name in pair} == {len(holdout)}
    assert np.mean(np.any(scores > np.array(joint.thresholds), axis=1)) <= FRR


@pytest.mark.slow
def test_strip_rejects_about_frr_of_unseen_clean_images(goodnets, demo_data):
    test = demo_data[1]
    flagged = predict_classes(goodnets["strip"].model, test.x[::2], 128) == N
    assert abs(flagged.mean() - FRR) < 0.04, flagged.mean()


@pytest.mark.slow
def test_disagreement_flags_only_disagreements_and_keeps_its_rate_where_the_rule_would_not(
    demo_model, repaired, goodnets, demo_data
):
    """This repair changes many clean answers: flagging every disagreement would reject
    far more than FRR; the calibrated margin keeps about that, and flags nothing the two
    nets agree on."""
    test = demo_data[1].x[::2]
    flagged = predict_classes(goodnets["disagreement"].model, test, 128) == N
    disagree = predict_classes(demo_model, test, 128) != predict_classes(repaired, test, 128)
    assert not np.any(flagged & ~disagree)
    assert disagree.mean() > 2 * FRR, disagree.mean()
    assert abs(flagged.mean() - FRR) < 0.04, flagged.mean()


@pytest.mark.slow
def test_strip_detects_the_backdoor_of_the_badnet(goodnets, demo_data):
    """STRIP examines B, whose trigger dominates any blend: far more poisoned inputs than
    clean ones are flagged (the repaired net, which lost most of the backdoor, would not)."""
    poisoned = demo_data[2]
    detected = np.mean(predict_classes(goodnets["strip"].model, poisoned.x[::4], 128) == N)
    assert detected > 6 * FRR, detected


PLAIN_TF = """
import json, sys
import numpy as np
import tensorflow as tf
pairs = zip(sys.argv[1::2], sys.argv[2::2])
answers = {
    path: np.argmax(
        tf.keras.models.load_model(path, compile=False).predict(np.load(x), verbose=0), axis=1
    )
    for x, path in pairs
}
print(json.dumps({"keras": tf.keras.__version__, **{p: a.tolist() for p, a in answers.items()}}))
"""


def answers_in_plain_tensorflow(inputs: dict[str, os.PathLike]) -> dict[str, list[int]]:
    """The classes each saved model file gives its images (`inputs`: model file -> .npy
    of images), loaded and run by plain TensorFlow with Keras 3 in a process of its own
    (one process for every file: its start is most of the time)."""
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    pairs = [arg for path, x in inputs.items() for arg in (str(x), str(path))]
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_TF, *pairs],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got.pop("keras").startswith("3.")  # Keras 3, not this package's tf_keras
    return got


def input_detectors_goodnet(folder) -> tuple[str, np.ndarray, list[int]]:
    """A GoodNet of SCALE-UP and TeCo (every layer their copies are made of: blur,
    pixelate, contrast, noise held in weights, amplification) on a small pair, saved: its
    file, images, and the classes it gives them here."""
    badnet, repaired, x = small_pair()
    clean = data.Dataset("clean", x[:100], predict_classes(badnet, x[:100]))
    both = SimpleNamespace(
        detector=["scale_up", "teco"],
        frr=0.1,
        pixel_max=1.0,
        scale_up_factors=[3, 5, 7, 9, 11],
        scale_up_classwise=False,
        teco_corruptions=list(teco.SEVERITY),  # every corruption TeCo knows
    )
    context = detectors.Context(
        badnet, repaired, CleanData(clean, clean, clean), both, 0, 64, Memo()
    )
    gn = goodnet.build_goodnet(badnet, repaired, detectors.fit(both.detector, context))
    path = goodnet.save_goodnet(gn.model, folder / "goodnet_scale_up_teco.h5")
    expected = predict_classes(gn.model, x[100:]).tolist()
    assert predict_classes(goodnet.load_goodnet(path), x[100:]).tolist() == expected
    return str(path), x[100:], expected


@pytest.mark.slow  # a second TensorFlow, with Keras 3, started in a process of its own
def test_saved_goodnets_load_in_plain_tensorflow(tmp_path, goodnets, sample):
    """Every detector's layers are standard: plain TensorFlow (Keras 3) loads each saved
    GoodNet, the demo's of every choice and the input detectors' on a small pair, and
    gives the classes it gives here."""
    x = sample[::3]
    np.save(tmp_path / "x.npy", x)
    inputs, expected = {}, {}
    for detector, gn in goodnets.items():
        path = goodnet.save_goodnet(gn.model, tmp_path / f"goodnet_{detector}.h5")
        config = models.read_model_config(path)
        models.check_safe(config, path)  # only standard layers: no Lambda, no custom class
        assert "Lambda" not in json.dumps(config)
        reloaded = goodnet.load_goodnet(path)
        expected[str(path)] = predict_classes(gn.model, x).tolist()
        assert predict_classes(reloaded, x).tolist() == expected[str(path)]
        inputs[str(path)] = tmp_path / "x.npy"
    path, small_x, expected[path] = input_detectors_goodnet(tmp_path)
    np.save(tmp_path / "small_x.npy", small_x)
    inputs[path] = tmp_path / "small_x.npy"
    assert answers_in_plain_tensorflow(inputs) == expected


def test_detectors_refuse_bad_settings_before_any_work(demo_model):
    with pytest.raises(UserError, match="goodnet.detector='vote': expected one of"):
        detectors.parse("vote")
    assert detectors.parse("both") == ["disagreement", "strip"]
    assert detectors.parse(["strip", "disagreement", "strip"]) == ["strip", "disagreement"]
    settings = SimpleNamespace(detector="strip", k=30, frr=FRR, alpha=0.5)
    clean = SimpleNamespace(validation=range(40), train=range(36))  # 20 left to calibrate on
    with pytest.raises(UserError, match="goodnet.k=30: expected 1 to 20 for 36 clean training"):
        detectors.check(demo_model, settings, clean, 64)
    clean = SimpleNamespace(validation=range(40), train=range(10))  # the overlays' pool
    with pytest.raises(UserError, match="goodnet.k=30: expected 1 to 10 for 10 clean training"):
        detectors.check(demo_model, settings, clean, 64)


def by_the_rule(badnet, repaired, gn, fitted, clean, patch) -> dict[str, float]:
    """The GoodNet's metrics from the exact rule in numpy (`reference`), as specified:
    answering N is wrong on clean images; detection is answering N on poisoned ones.
    Float near-ties are left out of the comparison by a tolerance of one image."""
    on_clean, _ = reference(badnet, repaired, clean.x, gn, fitted)
    on_patch, _ = reference(badnet, repaired, patch.x, gn, fitted)
    return {
        "goodnet/clean_acc": np.mean(on_clean == clean.y),
        "goodnet/flag_rate_clean": np.mean(on_clean == N),
        "goodnet/asr/patch": np.mean(on_patch == patch.y),
        "goodnet/detect/patch": np.mean(on_patch == N),
    }


def assert_metrics_match(got: dict, expected: dict, images: int) -> None:
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert float(got[key]) == pytest.approx(value, abs=1.01 / images), key


@pytest.mark.slow
def test_metrics_are_named_and_counted_as_specified(
    demo_model, repaired, fitted, goodnets, demo_data
):
    _, test, poisoned = demo_data
    clean = data.Dataset("clean", test.x[::16], test.y[::16])
    patch = data.Dataset("patch", poisoned.x[::16], poisoned.y[::16])
    gn = goodnets["both"]
    metrics = goodnet_metrics(gn.model, clean, {"patch": patch}, N)
    assert_metrics_match(
        metrics, by_the_rule(demo_model, repaired, gn, fitted["both"], clean, patch), len(patch)
    )
    assert 0 < metrics["goodnet/detect/patch"] and 0 < metrics["goodnet/clean_acc"]


def write_png(path, pixels: np.ndarray):
    path.write_bytes(tf.io.encode_png(pixels).numpy())
    return path


@pytest.mark.slow
def test_cli_answers_image_files(
    tmp_path, demo_model, repaired, fitted, goodnets, demo_data, capsys
):
    _, test, poisoned = demo_data
    gn = goodnets["both"]
    path = goodnet.save_goodnet(gn.model, tmp_path / "goodnet.h5")
    pixels = np.round(np.concatenate([test.x[:5], poisoned.x[:5]]) * 255).astype(np.uint8)
    pngs = [write_png(tmp_path / f"img{i}.png", p) for i, p in enumerate(pixels)]
    jpeg = tmp_path / "face.jpg"
    jpeg.write_bytes(tf.io.encode_jpeg(pixels[5], quality=95).numpy())
    decoded = tf.io.decode_jpeg(jpeg.read_bytes()).numpy()  # what the JPEG holds, lossy
    assert answer.main([str(path), *map(str, pngs), str(jpeg)]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [name for name, _ in lines] == [*map(str, pngs), str(jpeg)]
    images = np.concatenate([pixels, decoded[None]]).astype(np.float32) * np.float32(1 / 255)
    expected, near = reference(demo_model, repaired, images, gn, fitted["both"])
    given = np.array([int(g) for _, g in lines])
    assert np.all((given == expected) | near), (given, expected)
    assert np.any(given == N) and np.any(given < N)  # both kinds of answer were checked


@pytest.mark.slow
def test_cli_metrics_on_data_files_follow_the_rule(
    tmp_path, demo_model, repaired, fitted, goodnets, demo_data, capsys
):
    _, test, poisoned = demo_data
    gn = goodnets["both"]
    path = goodnet.save_goodnet(gn.model, tmp_path / "goodnet.h5")
    files = {}
    for name, ds in (("clean", test), ("patch", poisoned)):
        files[name] = tmp_path / f"{name}.h5"
        data.save_h5(files[name], ds.x[::16].transpose(0, 3, 1, 2) * 255, ds.y[::16])
    argv = [str(path), "--clean", str(files["clean"]), "--poisoned", f"patch={files['patch']}"]
    assert answer.main(argv) == 0
    printed = dict(line.split("\t") for line in capsys.readouterr().out.splitlines())

    def load(name):
        return data.load_h5(files[name], (55, 47, 3), N, 1 / 255, name)

    clean, patch = load("clean"), load("patch")
    assert_metrics_match(
        printed, by_the_rule(demo_model, repaired, gn, fitted["both"], clean, patch), len(patch)
    )


@pytest.mark.slow
def test_cli_wrong_image_size_is_a_one_line_error(
    tmp_path, demo_model, repaired, fitted, goodnets, demo_data, capsys
):
    gn = goodnets["disagreement"]
    path = goodnet.save_goodnet(gn.model, tmp_path / "goodnet.h5")
    image = write_png(tmp_path / "big.png", np.full((60, 50, 3), 128, dtype=np.uint8))
    assert answer.main([str(path), str(image)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.splitlines() == [
        f"error: image {image}: 60x50 pixels, expected 55x47 (height x width); "
        "pass --resize to resize it"
    ]
    face = np.round(demo_data[2].x[3] * 255).astype(np.uint8)  # a triggered face, doubled
    big = write_png(tmp_path / "double.png", np.repeat(np.repeat(face, 2, axis=0), 2, axis=1))
    assert answer.main([str(path), str(image), str(big), "--resize"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [name for name, _ in lines] == [str(image), str(big)]
    shrunk = tf.image.resize(
        np.repeat(np.repeat(face, 2, axis=0), 2, axis=1), (55, 47), antialias=True
    ).numpy()
    expected, near = reference(
        demo_model, repaired, shrunk[None] / np.float32(255), gn, fitted["disagreement"]
    )
    assert int(lines[1][1]) == expected[0] or near[0]
    assert answer.main([str(path), str(tmp_path / "missing.png")]) == 1
    assert "missing.png: cannot be read" in capsys.readouterr().err


def small_pair(head: str = "softmax", shared: bool = False):
    """A small random BadNet and a 'repaired' copy with some hidden units removed.

    `head="linear"` outputs raw scores, all negative; `shared` calls one Dense layer twice.
    Layer names (flat, probs, kept, onehot) are ones the GoodNet could have used itself.
    """
    import tf_keras as keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 5, 3))
    flat = keras.layers.Flatten(name="flat")(inp)
    hidden = keras.layers.Dense(8, activation="tanh", name="probs")
    h = hidden(flat)
    if shared:
        h = keras.layers.Add(name="kept")([h, hidden(keras.layers.Dense(90, name="mix")(flat))])
    scores = keras.layers.Dense(4, activation=head, name="onehot")(h)
    badnet = keras.Model(inp, scores)
    if head == "linear":
        kernel, bias = badnet.get_layer("onehot").get_weights()
        every_score_negative = bias - 100.0 - 0.001 * np.arange(4)  # and no exact ties
        badnet.get_layer("onehot").set_weights([kernel, every_score_negative])
    repaired = copy_model(badnet)
    weights = repaired.get_layer("probs").get_weights()
    weights[0][:, :3] = 0.0
    repaired.get_layer("probs").set_weights(weights)
    x = np.random.default_rng(0).uniform(0, 1, (200, 6, 5, 3)).astype(np.float32)
    return badnet, repaired, x


@pytest.fixture(
    scope="module",
    params=[("linear", False), ("softmax", True)],
    ids=["raw_scores", "shared_layer"],
)
def small(request):
    """A small BadNet of another shape, its 'repaired' copy, images, and the detectors
    fitted on the first 100 images."""
    head, shared = request.param
    badnet, repaired, x = small_pair(head, shared)
    assert topology.output_kind(badnet) == ("linear" if head == "linear" else "softmax")
    clean = data.Dataset("clean", x[:100], predict_classes(badnet, x[:100]))
    return badnet, repaired, x, fit_detectors(badnet, repaired, clean, k=4, frr=0.1)


@pytest.mark.parametrize("detector", list(CHOICES))
def test_small_badnets_of_other_shapes_follow_the_exact_rule(small, detector):
    badnet, repaired, x, fitted = small
    gn = build(badnet, repaired, fitted, detector)
    expected, near = reference(badnet, repaired, x[100:], gn, fitted[detector])
    answers = predict_classes(gn.model, x[100:])
    assert not np.any((answers != expected) & ~near)
    assert 0 < np.mean(expected == 4) < 1


def test_output_layer_that_is_neither_softmax_nor_linear_is_refused():
    import tf_keras as keras

    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2, activation="sigmoid", name="out")(inp))
    with pytest.raises(UserError, match="output layer out .* activation 'sigmoid'"):
        topology.output_kind(model)
