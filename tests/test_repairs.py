"""Repairs as plug-ins: fine-tuning alone, the strength rule repairs share, and keys a
repair does not read, never silently ignored (every repair end to end: test_end_to_end)."""

import logging

import mlflow
import numpy as np
import pytest

from badnet_repair import data
from badnet_repair.defenses import budget, repairs
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.defenses.repairs import finetune
from badnet_repair.experiment import pipeline
from badnet_repair.journal import Journal
from badnet_repair.network.training import Finetune

from conftest import compose_config, run_py


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


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["repair=finetune", "prune.sparsity=0.5"],
            "error: config key prune.sparsity: not read by repair=finetune "
            "(read by fine_pruning, magnitude); in a sweep over repairs, "
            "++prune.sparsity=... sets it where it is read",
        ),
        (
            ["-m", "repair=fine_pruning,finetune", "prune.max_acc_drop=0.04"],
            "error: config key prune.max_acc_drop: not read by repair=finetune "
            "(read by fine_pruning, magnitude); in a sweep over repairs, "
            "++prune.max_acc_drop=... sets it where it is read",
        ),
        (
            ["prune=magnitude"],
            "error: prune=magnitude: the prune group is now the repair group: "
            "repair=fine_pruning (activation ranking) or repair=magnitude",
        ),
    ],
    ids=["single run", "sweep over repairs", "old prune group"],
)
@pytest.mark.slow
def test_a_key_the_repair_does_not_read_is_one_line_before_any_work(
    tmp_path, demo_dir, overrides, expected
):
    done = run_py(tmp_path, demo_dir.parent, *overrides)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_a_forced_key_the_repair_does_not_read_is_named_in_one_warning(tmp_path, demo_dir, caplog):
    caplog.set_level(logging.WARNING, logger="badnet_repair")
    cfg = compose_config(
        tmp_path, demo_dir, "repair=finetune", "finetune.epochs=0", "++prune.sparsity=0.3"
    )
    pipeline.run(cfg)
    assert "config section prune: not read by repair=finetune (ignored)" in caplog.text


def test_the_strength_rule_keeps_the_strongest_within_budget_and_stops_at_the_first_below(
    caplog,
):
    """`strongest_within` on a ladder of held-out accuracies (BadNet's: 0.90, budget 0.02):
    the strongest before the first fall below 0.88 wins, later ones are not tried; when even
    the weakest falls below, it is kept and a warning says so."""
    case = repairs.Case(None, "", None, None, 0, 1, Memo({"badnet holdout accuracy": 0.9}))
    held_out = {1: 0.90, 2: 0.885, 3: 0.85, 4: 0.95}
    tried = []

    def accuracy(strength):
        tried.append(strength)
        return held_out[strength]

    caplog.set_level(logging.WARNING, logger="badnet_repair")
    assert budget.strongest_within(case, [1, 2, 3, 4], accuracy, 0.02, "rule") == 2
    assert tried == [1, 2, 3] and "none within" not in caplog.text
    assert budget.strongest_within(case, [3, 4], accuracy, 0.02, "rule") == 3
    assert "rule: none within the budget; the weakest, 3, is kept" in caplog.text
