"""Every repair and every detector end to end on the demo, through Hydra's config and
`pipeline.run`: each is scored by one contract (the stages badnet, the repair's own,
repaired and goodnet; stages.png and metrics.json; saved nets that load with plain
tf_keras and give the logged numbers). Each repair runs once, on the small data (an eighth
of the demo's evaluation images, a third of its validation file), and so does the GoodNet
of every detector, with 120 of the 400 validation images held out (on 40 the five
detectors calibrated together could promise no better than 0.12). That none reads the
evaluation data is test_any_model's, on a small net: each repair's run, and the GoodNet
of every detector, made again there on other clean test and poisoned files saves
bit-identical nets."""

import json
from pathlib import Path
from typing import NamedTuple

import mlflow
import numpy as np
import pytest
import tf_keras as keras

from badnet_repair import data
from badnet_repair.defenses import detectors, repairs
from badnet_repair.experiment.evaluate import auroc, detection_at, rejection_p
from badnet_repair.zoo import recipes as zoo

from conftest import EVERY_DETECTOR, TINY, plain, run_afresh

pytestmark = pytest.mark.slow

# The stages a repair hands back to be scored, beside the BadNet, the repaired net and
# the GoodNet that every run scores.
OWN_STAGES = {
    "fine_pruning": {"pruned"},
    "magnitude": {"pruned"},
    "rnp": {"unlearned"},
    "anp": {"masked"},
    "seam": {"forgotten"},
}
EVERY_RUN = {"badnet", "repaired", "goodnet"}
ARTIFACTS = {
    "config.yaml",
    "metrics.json",
    "repaired_net.h5",
    "goodnet.h5",
    "goodnet_scores.npz",
    "stages.png",
}
# The share of the small validation file (400 images) held out for the GoodNet of every
# detector: 120 images, as many as the whole file's default tenth, on which the five
# detectors calibrated together can promise goodnet.frr (on 40 they could not).
HOLDOUT = 0.3
SETS = ("clean_test", "poisoned.patch")  # the evaluation sets' names in goodnet_scores.npz
PNG = b"\x89PNG\r\n\x1a\n"


def classes(model: keras.Model, ds: data.Dataset) -> np.ndarray:
    return np.argmax(model.predict(ds.x, batch_size=512, verbose=0), axis=1)


def the_run(cfg):
    mlflow.set_tracking_uri(cfg.tracking.uri)
    (found,) = mlflow.search_runs(experiment_names=["demo"], output_format="list")
    return found


def assert_scored_by_the_contract(cfg, metrics, own: set[str], evaluation, demo_model) -> None:
    """The stages scored, what is logged and saved, and the saved repaired net's answers."""
    test, poisoned = evaluation.test, evaluation.poisoned
    scored = {key.split("/")[0] for key in metrics if key.endswith("/clean_acc")}
    assert scored == EVERY_RUN | own
    for stage in scored:
        assert f"{stage}/asr/patch" in metrics, stage
    assert {"goodnet/flag_rate_clean", "goodnet/detect/patch", "time/repair_s"} <= set(metrics)

    found = the_run(cfg)
    assert found.info.status == "FINISHED" and found.data.params["repair"] == cfg.repair
    assert found.info.run_name.startswith(f"demo {cfg.repair} (")
    for key, value in metrics.items():
        assert found.data.metrics[key] == pytest.approx(value, abs=1e-12), key
    client = mlflow.MlflowClient()
    assert ARTIFACTS <= {a.path for a in client.list_artifacts(found.info.run_id)}
    local = Path(client.download_artifacts(found.info.run_id, "", str(Path(cfg.paths.root))))
    assert (local / "stages.png").read_bytes().startswith(PNG)
    logged = json.loads((local / "metrics.json").read_text())
    assert logged["metrics"] == {k: v for k, v in metrics.items() if k != "objective"}

    repaired = plain(local / "repaired_net.h5")
    assert float(np.mean(classes(repaired, test) == test.y)) == metrics["repaired/clean_acc"]
    asr = float(np.mean(classes(repaired, poisoned) == poisoned.y))
    assert asr == metrics["repaired/asr/patch"]
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(repaired.get_weights(), demo_model.get_weights(), strict=True)
    ]
    assert any(changed)  # a repair, not the BadNet handed back


# On the small validation file's 40 held-out images ANP's sampling margin keeps every
# threshold out of even a 50-point budget at its tiny settings: without it, it prunes.
SMALL_DATA_SETTINGS = {**TINY, "anp": [*TINY["anp"], "anp.margin_se=0"]}


@pytest.mark.parametrize("name", repairs.names())
def test_each_repair_is_scored_by_the_contract(
    tmp_path, demo_dir, small_data, small_evaluation, demo_model, name
):
    overrides = [f"repair={name}", *SMALL_DATA_SETTINGS.get(name, []), *small_data]
    cfg, metrics = run_afresh(tmp_path, demo_dir, *overrides)
    own = OWN_STAGES.get(name, set())
    assert_scored_by_the_contract(cfg, metrics, own, small_evaluation, demo_model)
    scored = {key.split("/")[1] for key in metrics if key.endswith("/calibration_images")}
    assert scored == {"disagreement"}  # the one detector chosen, and no other, is scored


class SavedAnswers(NamedTuple):
    """A saved GoodNet's classes and each detector's flags (in the order chosen), run by
    tf_keras on the clean test and the poisoned images."""

    classes: tuple[np.ndarray, np.ndarray]
    flags: tuple[list[np.ndarray], list[np.ndarray]]


@pytest.fixture(scope="module")
def every_detector(tmp_path_factory, demo_dir, small_data, small_evaluation):
    """One GoodNet of all the detectors (calibrated together at goodnet.frr) on the small
    data, HOLDOUT of its validation file held out, and the saved GoodNet run on the
    evaluation images. The folder, config, metrics and those answers."""
    folder = tmp_path_factory.mktemp("every_detector")
    cfg, metrics = run_afresh(
        folder, demo_dir, *EVERY_DETECTOR, *small_data, f"data.holdout={HOLDOUT}"
    )
    good = plain(folder / "out/goodnet.h5")
    assert good.output_shape == (None, zoo.DEMO.num_classes + 1)
    both = keras.Model(good.input, [good.output, *good.get_layer("gn_flag_any").input])
    ran = [
        both.predict(images.x, batch_size=512, verbose=0)
        for images in (small_evaluation.test, small_evaluation.poisoned)
    ]
    answers = SavedAnswers(
        tuple(np.argmax(out[0], axis=1) for out in ran),
        tuple([flag[:, 0] > 0.5 for flag in out[1:]] for out in ran),
    )
    return folder, cfg, metrics, answers


def test_the_goodnet_of_every_detector_is_scored_by_the_contract(
    every_detector, small_evaluation, demo_model
):
    """The saved goodnet.h5, loaded by tf_keras and run, gives the logged numbers (the run
    scores it by its rule on answers in hand, not by running it)."""
    folder, cfg, metrics, answers = every_detector
    test, poisoned = small_evaluation.test, small_evaluation.poisoned
    assert_scored_by_the_contract(cfg, metrics, set(), small_evaluation, demo_model)
    n_classes = zoo.DEMO.num_classes
    on_test, on_poisoned = answers.classes
    ran = {
        "goodnet/clean_acc": np.mean(on_test == test.y),
        "goodnet/flag_rate_clean": np.mean(on_test == n_classes),
        "goodnet/asr/patch": np.mean(on_poisoned == poisoned.y),
        "goodnet/detect/patch": np.mean(on_poisoned == n_classes),
    }
    for key, value in ran.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < metrics["goodnet/flag_rate_clean"] < 1  # both kinds of answer compared
    # the p of the saved GoodNet's false rejection, were its promise exact
    n, bound = metrics["goodnet/strip/calibration_images"], metrics["goodnet/strip/frr_bound"]
    p = rejection_p(int(np.sum(on_test == n_classes)), len(test), int(n), bound)
    assert metrics["goodnet/frr_p"] == pytest.approx(p, abs=1e-12)
    saved = np.load(folder / "out/goodnet_scores.npz")
    together = [np.stack([saved[f"{d}.{t}"] for d in cfg.goodnet.detector], axis=1) for t in SETS]
    for rate in (0.01, 0.05):  # the detectors' operating point together, as calibrated
        assert metrics[f"goodnet/detect_at_frr_{rate:g}/patch"] == detection_at(*together, rate)
    # BaDExpert's auxiliary is B repaired by FT-SAM (the repair, finetune, has no FT-SAM
    # step), saved in the GoodNet beside B' (that it too never reads the evaluation data
    # is test_any_model's)
    assert metrics["goodnet/badexpert/auxiliary_is_repaired"] == 0.0
    assert cfg.ft_sam.steps == 3 and cfg.ft_sam.erasing == 0.5  # forced key, file default
    saved = plain(folder / "out/goodnet.h5")
    assert any(layer.name.startswith("aux_") for layer in saved.layers)


@pytest.mark.parametrize("name", detectors.names())
def test_each_detector_is_scored_calibrated_and_saved_alike(every_detector, name):
    """Each detector's own flags in the saved GoodNet (the inputs of its flag-by-any layer,
    in the order chosen) give the flag rates logged for it; it is scored (AUROC) and
    calibrated together with the others, at goodnet.frr, on the same clean images."""
    folder, cfg, metrics, answers = every_detector
    own = {key.split("/", 2)[2] for key in metrics if key.startswith(f"goodnet/{name}/")}
    assert {"flag_rate_clean", "detect/patch", "auroc/patch", "calibration_images"} <= own
    assert metrics[f"goodnet/{name}/frr_bound"] <= cfg.goodnet.frr
    for key in ("frr_bound", "calibration_images"):
        assert {metrics[f"goodnet/{other}/{key}"] for other in detectors.names()} == {
            metrics[f"goodnet/{name}/{key}"]
        }
    mine = list(cfg.goodnet.detector).index(name)
    on_test, on_poisoned = (flags[mine] for flags in answers.flags)
    assert metrics[f"goodnet/{name}/flag_rate_clean"] == pytest.approx(np.mean(on_test), abs=1e-9)
    assert metrics[f"goodnet/{name}/detect/patch"] == pytest.approx(np.mean(on_poisoned), abs=1e-9)
    # its scores saved for analysis give its logged AUROC and operating points
    saved = np.load(folder / "out/goodnet_scores.npz")
    clean, poisoned = saved[f"{name}.clean_test"], saved[f"{name}.poisoned.patch"]
    assert len(clean) == len(on_test) and len(poisoned) == len(on_poisoned)
    assert metrics[f"goodnet/{name}/auroc/patch"] == auroc(clean, poisoned)
    for rate in (0.01, 0.05):
        found = metrics[f"goodnet/{name}/detect_at_frr_{rate:g}/patch"]
        assert found == detection_at(clean, poisoned, rate)
    assert len(saved[f"{name}.calibration"]) >= metrics[f"goodnet/{name}/calibration_images"]
