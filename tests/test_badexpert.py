"""BaDExpert: the expert stops as soon as it forgets, the threshold reads the clean
held-out images only, the division-free flag equals the score's rule, AUROC is 1 where
the detector is perfect."""

from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import tf_keras as keras
from omegaconf import OmegaConf

from badnet_repair import UserError, data
from badnet_repair.defenses import detectors, goodnet, repairs
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.defenses.detectors import badexpert
from badnet_repair.defenses.repairs import ft_sam
from badnet_repair.experiment import config, pipeline
from badnet_repair.experiment.evaluate import auroc
from badnet_repair.journal import Journal
from badnet_repair.network import models, predict, training
from badnet_repair.network.predict import accuracy, predict_classes
from badnet_repair.network.pruning import copy_model
from badnet_repair.network.training import finetune

from conftest import compose_config

FRR = 0.1
SETTINGS = dict(
    detector="badexpert",
    frr=FRR,
    expert_lr=2e-3,
    expert_epochs=2,
    expert_batch_size=32,
    expert_stop_acc=0.2,
    auxiliary="finetuned",
    aux_lr=1e-3,
    aux_epochs=1,
)


@pytest.fixture(scope="module")
def clean(demo_data):
    """A third of the demo's validation set, half of it held out (200 images, some of
    which B gets wrong: a quarter, 100, held none)."""
    part = data.split(demo_data[0], 1 / 3, seed=1)[1]
    train, holdout = data.split(part, 0.5, seed=0)
    return CleanData(part, train, holdout)


@pytest.fixture(scope="module")
def fitted(demo_model, clean):
    """BaDExpert with a fine-tuned auxiliary (no repaired net needed: the GoodNet's B')."""
    context = detectors.Context(
        demo_model, demo_model, clean, SimpleNamespace(**SETTINGS), 0, 512, Memo()
    )
    return detectors.fit(["badexpert"], context)[0]


def scores_on(fitted, badnet, x: np.ndarray) -> np.ndarray:
    """The score from its definition, on B's classes of `x`."""
    label, rows = predict_classes(badnet, x), np.arange(len(x))
    a = predict.probabilities(fitted.parts["expert"], x)[rows, label]
    b = predict.probabilities(fitted.parts["auxiliary"], x)[rows, label]
    return badexpert.triangle(a, b)


@pytest.mark.slow
def test_threshold_is_set_on_every_clean_held_out_image_only(demo_model, clean, fitted):
    """Every held-out image counts, those B gets wrong too (the test set's false rejection
    counts them), scored on the class B answers; the threshold is the conformal rank
    ceil((n + 1)(1 - frr)) of those n scores, and the bound is logged."""
    held = clean.holdout
    expected = scores_on(fitted, demo_model, held.x)
    assert (predict_classes(demo_model, held.x) != held.y).any()  # wrong ones are in
    np.testing.assert_allclose(fitted.calibration_scores, expected, rtol=1e-6)
    n = len(held)
    rank = int(np.ceil((n + 1) * (1 - FRR)))
    assert fitted.threshold == pytest.approx(np.sort(expected)[rank - 1], rel=1e-6)
    assert fitted.metrics["calibration_images"] == n
    assert fitted.metrics["frr_bound"] == pytest.approx(1 - rank / (n + 1))
    assert fitted.metrics["frr_bound"] <= FRR + 1e-12
    # the images the expert learned from would give another threshold
    on_train = np.sort(scores_on(fitted, demo_model, clean.train.x))
    other = on_train[int(np.ceil((len(on_train) + 1) * (1 - FRR))) - 1]
    assert abs(other - fitted.threshold) > 1e-3 * abs(fitted.threshold)


@pytest.mark.slow
def test_expert_stops_when_held_out_accuracy_falls_below_the_stop(demo_model, clean, fitted):
    expert, m = fitted.parts["expert"], fitted.metrics
    steps_per_epoch = -(-len(clean.train) // SETTINGS["expert_batch_size"])
    assert m["expert_steps"] < SETTINGS["expert_epochs"] * steps_per_epoch  # stopped early
    assert m["expert_holdout_acc"] < SETTINGS["expert_stop_acc"]
    assert accuracy(expert, clean.holdout) == m["expert_holdout_acc"]  # no step after it
    assert accuracy(demo_model, clean.holdout) > 0.9  # B itself untouched


@pytest.mark.slow
def test_finetune_stops_at_the_first_check_that_says_so(demo_model, clean):
    """`stop` is asked every `check_every` steps; training ends at the first yes (the
    weights then are the result), and a stop that never says yes changes nothing."""
    train = data.Dataset("few", clean.train.x[:96], clean.train.y[:96])
    asked, weights = [], []

    def stop(steps: int) -> bool:
        asked.append(steps)
        weights.append([w.copy() for w in model.get_weights()])
        return steps >= 4

    model = copy_model(demo_model)
    finetune(model, train, None, 3, 1e-3, 16, stop=stop, check_every=2)
    assert asked == [2, 4]
    for got, then in zip(model.get_weights(), weights[-1], strict=True):
        np.testing.assert_array_equal(got, then)
    plain, asked_never = copy_model(demo_model), copy_model(demo_model)
    finetune(plain, train, None, 1, 1e-3, 32, seed=3)
    finetune(asked_never, train, None, 1, 1e-3, 32, seed=3, stop=lambda steps: False)
    for got, expected in zip(asked_never.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)


@pytest.mark.slow
def test_division_free_flag_equals_the_score_rule():
    """`score_above` on a grid of (a, b), edge cases included (a below 1e-8, b above 0.5),
    against triangle(a, b) > threshold, for several thresholds."""
    values = np.array([0.0, 1e-9, 1e-7, 1e-3, 0.1, 0.3, 0.45, 0.5, 0.55, 0.7, 0.9, 0.999, 1.0])
    a, b = (g.ravel().astype(np.float32)[:, None] for g in np.meshgrid(values, values))
    inputs, kinds = [keras.Input((1,)), keras.Input((1,))], set()
    for threshold in (-1e9, -50.0, -2.0, -0.5, -0.01, 0.0):
        model = keras.Model(inputs, badexpert.score_above(*inputs, threshold))
        flag = model.predict([a, b], verbose=0)[:, 0] > 0.5
        score = badexpert.triangle(a[:, 0], b[:, 0])
        near = np.abs(score - threshold) < 1e-5 * max(1.0, abs(threshold))
        expected = score > threshold
        assert np.all((flag == expected) | near), (threshold, np.flatnonzero(flag != expected))
        kinds.update(expected[~near].tolist())
    assert kinds == {True, False}


def test_auroc_is_one_where_a_detector_is_perfect():
    clean, poisoned = np.array([-3.0, -2.0, -1.0]), np.array([0.0, 5.0])
    assert auroc(clean, poisoned) == 1.0
    assert auroc(poisoned, clean) == 0.0
    assert auroc(clean, clean) == 0.5  # ties count half
    rng = np.random.default_rng(0)
    # triggered: E agrees with B (a high), M' does not (b low); clean: the reverse
    a_bad, b_bad = rng.uniform(0.6, 1.0, 200), rng.uniform(0.0, 0.3, 200)
    a_ok, b_ok = rng.uniform(0.0, 0.3, 300), rng.uniform(0.6, 1.0, 300)
    triangle = badexpert.triangle
    assert auroc(triangle(a_ok, b_ok), triangle(a_bad, b_bad)) == 1.0


@pytest.mark.slow
def test_goodnet_with_a_finetuned_auxiliary_follows_the_rule(demo_model, fitted, demo_data):
    """M' fine-tuned (not B') is replayed into the GoodNet as its own copy."""
    _, test, poisoned = demo_data
    x = np.concatenate([test.x[::20], poisoned.x[::20]])
    gn = goodnet.build_goodnet(demo_model, demo_model, [fitted])
    assert any(layer.name.startswith("aux_") for layer in gn.model.layers)
    p_bad = demo_model.predict(x, verbose=0)
    s = scores_on(fitted, demo_model, x)
    expected = np.where(s > fitted.threshold, models.num_classes(demo_model), p_bad.argmax(axis=1))
    near = np.abs(s - fitted.threshold) < 1e-5 * max(1.0, abs(fitted.threshold))
    answers = predict_classes(gn.model, x)
    assert np.all((answers == expected) | near)
    assert 0 < np.mean(answers[len(test.x[::20]) :] == 40)


def ft_sam_sections(tmp_path, demo_dir, *overrides: str):
    """The run's config once the pipeline has added the sections the GoodNet reads."""
    cfg = compose_config(
        tmp_path, demo_dir, "goodnet.detector=[disagreement,badexpert]", *overrides
    )
    return cfg, pipeline._goodnet_sections(cfg)


@pytest.mark.slow
def test_an_auxiliary_of_its_own_reads_ft_sams_defaults_under_forced_keys(tmp_path, demo_dir):
    """With a repair that has no FT-SAM step, `auto` gives BaDExpert an FT-SAM auxiliary of
    its own: the ft_sam section is FT-SAM's file's defaults under `++` keys, typed and
    checked like a repair's; after FT-SAM, or with `repaired`, no section is added."""
    cfg, reads = ft_sam_sections(tmp_path, demo_dir, "repair=fine_pruning", "++ft_sam.steps=7")
    assert reads == {"ft_sam"}
    defaults = OmegaConf.load(f"{config.project_root()}/conf/repair/ft_sam.yaml").ft_sam
    assert cfg.ft_sam.steps == 7 and cfg.ft_sam.lrs == defaults.lrs
    assert cfg.ft_sam.rho == defaults.rho
    config.validate(cfg)
    cfg, _ = ft_sam_sections(tmp_path, demo_dir, "repair=fine_pruning", "++ft_sam.steps=0")
    with pytest.raises(UserError, match=r"ft_sam\.steps=0"):
        config.validate(cfg)
    for overrides in (["repair=fine_pruning", "goodnet.auxiliary=repaired"], ["repair=anp"]):
        cfg, reads = ft_sam_sections(tmp_path, demo_dir, *overrides)
        expected = set() if "goodnet.auxiliary=repaired" in overrides else {"ft_sam"}
        assert reads == expected and ("ft_sam" in cfg) == bool(expected)
    cfg, reads = ft_sam_sections(tmp_path, demo_dir, "repair=[fine_pruning,ft_sam]")
    assert reads == set()  # the repaired net is the auxiliary


@pytest.mark.slow
def test_auto_auxiliary_is_b_repaired_by_ft_sam_unless_the_repair_had_an_ft_sam_step(
    tmp_path, demo_dir, demo_model, clean
):
    """`auto`: after a chain with an FT-SAM step, M' is the repaired net B'; after another
    repair, M' is B repaired by FT-SAM at the run's settings, the net the repair itself
    would give (same seed), not B' and not B."""
    cfg, _ = ft_sam_sections(
        tmp_path, demo_dir, "repair=fine_pruning", "++ft_sam.steps=3", "++ft_sam.lrs=[0.001]"
    )
    settings = OmegaConf.to_object(cfg.ft_sam)
    repaired, memo = copy_model(demo_model), Memo()  # a stand-in B', shared expert
    auto = SimpleNamespace(**{**SETTINGS, "auxiliary": "auto"})

    def aux(steps):
        context = detectors.Context(
            demo_model, repaired, clean, auto, 0, 512, memo, steps, settings
        )
        return detectors.fit(["badexpert"], context)[0]

    with mlflow.start_run() as run:
        after_ft_sam = aux(("fine_pruning", "ft_sam"))
        assert after_ft_sam.parts["auxiliary"] is repaired
        assert after_ft_sam.metrics["auxiliary_is_repaired"] == 1.0
        assert not mlflow.get_run(run.info.run_id).data.metrics  # nothing trained, nothing logged
        own = aux(("fine_pruning",))
    assert own.metrics["auxiliary_is_repaired"] == 0.0
    logged = mlflow.get_run(run.info.run_id).data.metrics
    assert logged[f"{badexpert.AUXILIARY}ft_sam/lr"] == 0.001  # its training, apart
    assert not [name for name in logged if name.startswith("ft_sam/")]
    model = own.parts["auxiliary"]
    assert model is not repaired and model is not demo_model
    case = repairs.Case(demo_model, "", clean, Journal(), 0, 512)
    training.seed_everything(0)
    with mlflow.start_run():  # the repair logs its series to the active run
        direct = ft_sam.repair(case, ft_sam=settings)
    for mine, theirs in zip(model.get_weights(), direct.get_weights(), strict=True):
        np.testing.assert_array_equal(mine, theirs)
    assert any(
        not np.array_equal(w, b)
        for w, b in zip(model.get_weights(), demo_model.get_weights(), strict=True)
    )
