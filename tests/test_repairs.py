"""Repairs as plug-ins: every `repair` choice composes, runs end to end on the demo and is
scored by the same shared code; keys a repair does not read are never silently ignored."""

import json
import logging
import subprocess
import sys

import mlflow
import numpy as np
import pytest

from badnet_repair.defenses import budget, repairs
from badnet_repair.defenses.clean import Memo
from badnet_repair.experiment import pipeline
from badnet_repair.network import models

from conftest import ROOT, TINY, compose_config

SHARED_METRICS = {
    "badnet/clean_acc",
    "badnet/asr/patch",
    "repaired/clean_acc",
    "repaired/asr/patch",
}
SHARED_METRICS |= {"goodnet/clean_acc", "goodnet/flag_rate_clean", "goodnet/detect/patch"}


@pytest.mark.slow
@pytest.mark.parametrize("name", repairs.names())
def test_every_repair_runs_end_to_end_and_is_scored_alike(tmp_path, demo_dir, demo_model, name):
    cfg = compose_config(tmp_path, demo_dir, f"repair={name}", *TINY.get(name, []))
    metrics = pipeline.run(cfg)
    assert SHARED_METRICS <= set(metrics)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    (run,) = mlflow.search_runs(experiment_names=["demo"], output_format="list")
    assert run.info.status == "FINISHED" and run.data.params["repair"] == name
    assert run.info.run_name.startswith(f"demo {name} (")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {
        "config.yaml",
        "metrics.json",
        "repaired_net.h5",
        "goodnet.h5",
        "stages.png",
    } <= artifacts
    logged = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert logged["metrics"] == {k: v for k, v in metrics.items() if k != "objective"}
    repaired = models.load_model(tmp_path / "out" / "repaired_net.h5")
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(repaired.get_weights(), demo_model.get_weights(), strict=True)
    ]
    assert any(changed)  # a repair, not the BadNet handed back
    assert "time/repair_s" in run.data.metrics


@pytest.mark.slow
def test_finetune_alone_trains_every_layer_and_adds_no_stage(tmp_path, demo_dir, demo_model):
    cfg = compose_config(tmp_path, demo_dir, "repair=finetune", "finetune.epochs=1")
    metrics = pipeline.run(cfg)
    assert not any(k.startswith(("pruned/", "prune/")) for k in metrics)
    repaired = models.load_model(tmp_path / "out" / "repaired_net.h5")
    for layer in ("conv_1", "conv_3", "fc_2", "output"):
        before = demo_model.get_layer(layer).get_weights()[0]
        assert not np.array_equal(repaired.get_layer(layer).get_weights()[0], before)
    history = mlflow.MlflowClient().get_metric_history(
        mlflow.search_runs(experiment_names=["demo"], output_format="list")[0].info.run_id,
        "finetune/val_acc",
    )
    assert [m.step for m in history] == [1]


def cli(tmp_path, demo_dir, *args):
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    root = [f"paths.root={tmp_path}", f"paths.data={demo_dir.parent}"]
    return subprocess.run(
        [sys.executable, f"{ROOT}/run.py", *flags, *root, *overrides],
        capture_output=True,
        text=True,
        timeout=300,
    )


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
def test_a_key_the_repair_does_not_read_is_one_line_before_any_work(
    tmp_path, demo_dir, overrides, expected
):
    done = cli(tmp_path, demo_dir, *overrides)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "mlruns").exists()


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
