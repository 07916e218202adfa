"""Repairs as plug-ins: fine-tuning alone, the strength rule repairs share, and keys a
repair does not read, never silently ignored (every repair end to end: test_end_to_end)."""

import logging

import mlflow
import numpy as np
import pytest
from tf_keras import models as keras_models

from badnet_repair import UserError, data
from badnet_repair.defenses import budget, repairs
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.defenses.repairs import finetune
from badnet_repair.experiment import config, pipeline
from badnet_repair.journal import Journal
from badnet_repair.network.predict import accuracy
from badnet_repair.network.training import Finetune

from conftest import compose_config, run_py


@pytest.mark.slow
def test_finetune_alone_trains_every_layer_and_hands_back_no_stage(demo_model, demo_data):
    """The repair itself on the demo and its clean data: every layer trained, one epoch
    logged as a series, nothing handed back to be scored but the repaired net."""
    train, holdout = data.split(demo_data[0], 0.1, seed=0)
    journal = Journal()
    case = repairs.Case(
        demo_model, "conv_3", CleanData(demo_data[0], train, holdout), journal, 0, 512
    )
    with mlflow.start_run() as run:
        repaired = finetune.repair(case, Finetune(epochs=1, lr=1e-3, batch_size=64))
    assert case.handed == []
    for layer in ("conv_1", "conv_3", "fc_2", "output"):
        before = demo_model.get_layer(layer).get_weights()[0]
        assert not np.array_equal(repaired.get_layer(layer).get_weights()[0], before)
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "finetune/val_acc")
    assert [m.step for m in history] == [1]
    assert journal.series == {"finetune/loss", "finetune/val_acc"}


NOT_READ = (
    "config key {key}: not read by repair=finetune (read by fine_pruning, magnitude); "
    "in a sweep over repairs, ++{key}=... sets it where it is read"
)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["repair=finetune", "prune.sparsity=0.5"], NOT_READ.format(key="prune.sparsity")),
        (
            ["prune=magnitude"],
            "prune=magnitude: the prune group is now the repair group: "
            "repair=fine_pruning (activation ranking) or repair=magnitude",
        ),
    ],
    ids=["single run", "old prune group"],
)
def test_a_key_the_repair_does_not_read_is_one_line_before_any_work(overrides, expected):
    """`run.py` calls this check before Hydra composes; the command line's exit code and its
    one line are tested once, by the sweep's test below."""
    with pytest.raises(UserError) as err:
        config.check_overrides(overrides)
    assert str(err.value) == expected


@pytest.mark.slow
def test_a_sweep_over_repairs_with_a_key_one_does_not_read_exits_with_one_line(tmp_path, demo_dir):
    overrides = ["-m", "repair=fine_pruning,finetune", "prune.max_acc_drop=0.04"]
    done = run_py(tmp_path, demo_dir.parent, *overrides)
    assert done.returncode == 1
    expected = "error: " + NOT_READ.format(key="prune.max_acc_drop")
    assert done.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_forced_key_the_repair_does_not_read_is_named_in_one_warning(
    tmp_path, demo_dir, small_data, caplog
):
    caplog.set_level(logging.WARNING, logger="badnet_repair")
    settings = ["repair=finetune", "finetune.epochs=0", "++prune.sparsity=0.3"]
    cfg = compose_config(tmp_path, demo_dir, *small_data, *settings)
    pipeline.run(cfg)
    assert "config section prune: not read by repair=finetune (ignored)" in caplog.text


def _flips(n: int, wrong: int, lost: int = 0, gained: int = 0) -> np.ndarray:
    """Right/wrong on `n` held-out images for a net that gets the BadNet's `wrong` last
    images wrong, then loses `lost` of the others and gains `gained` of those."""
    right = np.arange(n) < n - wrong
    right[:lost] = False
    right[n - wrong : n - wrong + gained] = True
    return right


def _case(reference: np.ndarray) -> repairs.Case:
    return repairs.Case(None, "", None, None, 0, 1, Memo({"badnet holdout correct": reference}))


def test_the_strength_rule_keeps_the_strongest_within_budget_and_stops_at_the_first_below(
    caplog,
):
    """`strongest_within` on a ladder (the BadNet right on 90 of 100 held-out images,
    budget 0.02): the strongest before the first that falls out wins, later ones are not
    tried; when even the weakest falls out, none is kept: it raises."""
    case = _case(_flips(100, 10))
    held_out = {1: _flips(100, 10), 2: _flips(100, 10, lost=1), 3: _flips(100, 10, lost=2)}
    held_out[4] = _flips(100, 10, gained=5)
    tried = []

    def correct(strength):
        tried.append(strength)
        return held_out[strength]

    caplog.set_level(logging.WARNING, logger="badnet_repair")
    assert budget.strongest_within(case, [1, 2, 3, 4], correct, 0.02, 1.0, "rule") == 2
    assert tried == [1, 2, 3] and "none within" not in caplog.text
    with pytest.raises(budget.NoneWithinBudget, match="rule: no value tried keeps"):
        budget.strongest_within(case, [3, 4], correct, 0.02, 1.0, "rule")
    assert tried[-1] == 3  # the first below ends it


def test_the_budget_counts_the_held_out_sampling_error_of_the_drop():
    """Losing one image of 60 measures a drop of 1.7 points, within 2 by the point
    estimate, but not once one standard error (1.7 points) is added; trading two images
    each way of 100 measures no drop and a margin of 2 points: within. Each is the paired
    count, not the two accuracies' difference."""
    one_of_60 = _case(_flips(60, 0))
    assert not budget.within_budget(one_of_60, _flips(60, 0, lost=1), 0.02, 1.0, "rule", 1)
    assert budget.within_budget(one_of_60, _flips(60, 0), 0.02, 1.0, "rule", 1)
    assert budget.within_budget(one_of_60, _flips(60, 0, lost=1), 0.02, 0.0, "rule", 1)  # no margin
    traded = _case(_flips(100, 5))
    assert budget.within_budget(traded, _flips(100, 5, lost=2, gained=2), 0.02, 1.0, "rule", 1)
    assert not budget.within_budget(traded, _flips(100, 5, lost=3, gained=3), 0.02, 1.0, "rule", 1)
    assert budget.within_budget(traded, _flips(100, 5, lost=1, gained=1), 0.02, 1.0, "rule", 1)


def _noisy(model, scale: float):
    """`model` with Gaussian noise of `scale` times each weight array's spread added: a
    stand-in for a repair whose strength wrecks the net as it grows."""
    rng = np.random.default_rng(0)
    noisy = keras_models.clone_model(model)
    noisy.set_weights(
        [w + scale * w.std() * rng.standard_normal(w.shape) for w in model.get_weights()]
    )
    return noisy


@pytest.fixture(scope="module")
def demo_case(demo_model, demo_data):
    train, holdout = data.split(demo_data[0], 0.1, seed=0)
    return repairs.Case(
        demo_model, "conv_3", CleanData(demo_data[0], train, holdout), Journal(), 0, 512
    )


@pytest.mark.slow
def test_a_ladder_whose_weakest_rung_wrecks_the_net_goes_on_down_to_one_that_works(demo_case):
    """Noise at 4 times each weight's spread collapses the demo; the ladder halves
    downward from there and keeps the first rung within 2 points, a working net."""
    with mlflow.start_run():
        chosen, model = budget.strongest_run(
            demo_case, "noise", "scale", [4.0], lambda s: _noisy(demo_case.badnet, s), 0.02, 1.0
        )
    held = demo_case.journal.notes["noise_ladder"]
    assert held["4"] < 0.5 * demo_case.badnet_holdout_accuracy()  # the first rung wrecks
    assert chosen < 4.0 and list(held)[-1] == f"{chosen:g}"
    assert (
        accuracy(model, demo_case.clean.holdout, 512) >= demo_case.badnet_holdout_accuracy() - 0.02
    )
    assert demo_case.journal.metrics["noise/scale"] == chosen


@pytest.mark.slow
def test_a_ladder_with_no_working_rung_declines_after_its_halvings(demo_case):
    tried = []

    def wreck(scale):
        tried.append(scale)
        return _noisy(demo_case.badnet, 1000.0)

    with mlflow.start_run(), pytest.raises(budget.NoneWithinBudget, match="down to 0.25 keeps"):
        budget.strongest_run(demo_case, "wreck", "scale", [8.0], wreck, 0.02, 1.0)
    assert tried == [8.0 / 2**i for i in range(budget.HALVINGS + 1)]
    assert list(demo_case.journal.notes["wreck_ladder"]) == [f"{v:g}" for v in tried]
