"""The whole experiment, end to end, through Hydra, TensorFlow and a SQLite MLflow store."""

import json
import logging
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.entities import RunStatus

from badnet_repair import UserError, data
from badnet_repair.experiment import inputs, leaderboard, pipeline, tracking
from badnet_repair.network import models, pruning

from conftest import TINY, compose_config, run_py

CONTRACT = [
    "badnet/clean_acc",
    "badnet/asr/patch",
    "pruned/clean_acc",
    "pruned/asr/patch",
    "repaired/clean_acc",
    "repaired/asr/patch",
    "prune/channels_pruned",
    "prune/sparsity",
    "finetune/loss",
    "finetune/val_acc",
]


def only_run(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["demo"], output_format="list")
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_activation_run_logs_the_contract_and_saves_a_pruned_model(tmp_path, demo_dir, small_data):
    cfg = compose_config(tmp_path, demo_dir, *small_data, "finetune.epochs=2", "prune.sparsity=0.5")
    metrics = pipeline.run(cfg)
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED"
    assert set(CONTRACT) <= set(run.data.metrics)
    assert run.data.metrics["prune/channels_pruned"] == 30
    assert run.data.params["prune.sparsity"] == "0.5"
    assert run.data.params["model.name"] == "demo"
    assert run.data.params["repair"] == "fine_pruning"
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "finetune/val_acc")
    assert [m.step for m in history] == [1, 2]
    for name in ("curve/val_acc", "curve/clean_acc", "curve/asr/patch"):
        points = mlflow.MlflowClient().get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in points) == list(range(61))
    for key, value in metrics.items():
        assert run.data.metrics[key] == pytest.approx(value)

    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {
        "config.yaml",
        "metrics.json",
        "repaired_net.h5",
        "stages.png",
        "curve.png",
    } <= artifacts
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, dst_path=str(tmp_path / "dl")
    )
    logged = json.loads((tmp_path / "dl" / "metrics.json").read_text())
    repaired = models.load_model(f"{local}/repaired_net.h5")
    zeroed = pruning.zeroed_channels(repaired.get_layer("conv_3"))
    assert zeroed == logged["pruned_channels"] and len(zeroed) == 30


@pytest.mark.slow
def test_magnitude_default_is_the_largest_sparsity_within_the_budget(
    tmp_path, demo_dir, small_scoring
):
    """Each share of the ladder is pruned and fine-tuned from the BadNet, until one's clean
    held-out accuracy falls out of the budget; the largest within it is kept, and the saved
    net holds that share of zero weights."""
    cfg = compose_config(
        tmp_path,
        demo_dir,
        *small_scoring,
        "repair=magnitude",
        "prune.sparsities=[0.2,0.5,0.97]",
        "prune.max_acc_drop=0.1",
        "finetune.epochs=1",
    )
    metrics = pipeline.run(cfg)
    ladder = json.loads((tmp_path / "out" / "metrics.json").read_text())["prune_ladder"]
    floor = metrics["badnet/holdout_acc"] - 0.1
    within = [float(s) for s, acc in ladder.items() if acc >= floor - 1e-12]
    assert metrics["prune/sparsity_chosen"] == max(within)
    assert ladder["0.97"] < floor  # the strongest breaks the budget: the rule had to stop
    assert metrics["prune/sparsity"] == pytest.approx(metrics["prune/sparsity_chosen"], abs=0.01)
    assert metrics["repaired/holdout_acc"] == pytest.approx(ladder[f"{max(within):g}"])
    saved = models.load_model(tmp_path / "out" / "repaired_net.h5")
    kernel = saved.get_layer("conv_3").get_weights()[0]
    assert np.mean(kernel == 0) == pytest.approx(metrics["prune/sparsity"], abs=0.01)


@pytest.mark.slow
def test_max_acc_drop_prunes_where_validation_accuracy_allows_read_off_the_curve(
    tmp_path, demo_dir, small_scoring
):
    """The stopping rule removes channels until validation accuracy would first fall more
    than max_acc_drop; with no fine-tuning the repaired net is the pruned net: `repaired/*`
    come from running the saved model, `pruned/*` from the pruning curve's linear updates."""
    settings = ["prune.max_acc_drop=0.04", "finetune.epochs=0"]
    cfg = compose_config(tmp_path, demo_dir, *small_scoring, *settings)
    metrics = pipeline.run(cfg)
    run = only_run(tmp_path)
    val = {
        m.step: m.value
        for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "curve/val_acc")
    }
    k = int(metrics["prune/channels_pruned"])
    assert 0 < k < 60
    assert all(val[j] >= val[0] - 0.04 for j in range(k + 1))
    assert val[k + 1] < val[0] - 0.04
    for name in ("clean_acc", "asr/patch"):
        assert metrics[f"pruned/{name}"] == metrics[f"repaired/{name}"]


@pytest.mark.slow
def test_a_run_failing_midway_ends_failed(tmp_path, demo_dir):
    """Data is read inside the MLflow run: a bad file found there ends the run FAILED."""
    images = np.random.default_rng(0).uniform(0, 255, (8, 3, 55, 47))
    data.save_h5(tmp_path / "bad.h5", images, np.full(8, 99))
    cfg = compose_config(tmp_path, demo_dir, f"data.poisoned.patch={tmp_path}/bad.h5")
    with pytest.raises(UserError, match=r"bad.h5: labels span \[99, 99\], expected \[0, 40\)"):
        pipeline.run(cfg)
    run = only_run(tmp_path)
    assert run.info.status == RunStatus.to_string(RunStatus.FAILED)
    assert run.data.tags["machine"] == tracking.machine()  # which CPU, for every figure


@pytest.mark.slow
def test_a_repair_with_no_strength_within_budget_declines_and_saves_no_wreck(
    tmp_path, demo_dir, small_scoring, caplog
):
    """FT-SAM at a learning rate that wrecks the demo even after five halvings: the run
    says so in one line and a tag, ends FINISHED, saves no repaired net or GoodNet and
    logs nothing as repaired; a search would rank it below every other run."""
    caplog.set_level(logging.WARNING, logger="badnet_repair")
    wreck = ["repair=ft_sam", "ft_sam.lrs=[1e6]", "ft_sam.steps=3"]
    cfg = compose_config(tmp_path, demo_dir, *small_scoring, *wreck)
    metrics = pipeline.run(cfg)
    run = only_run(tmp_path)
    assert run.info.status == RunStatus.to_string(RunStatus.FINISHED)
    assert "ft_sam lr: no value down to 31250 keeps" in run.data.tags["repair.declined"]
    assert "repair declined: ft_sam lr: no value down to 31250" in caplog.text
    assert not any(key.startswith(("repaired/", "goodnet/")) for key in metrics)
    assert metrics["objective"] == -1.0 and "badnet/clean_acc" in metrics
    assert not (tmp_path / "out" / "repaired_net.h5").exists()
    assert not (tmp_path / "out" / "goodnet.h5").exists()
    (row,) = leaderboard.runs(["demo"])
    assert row["repair"] == "ft_sam (declined)" and row["goal"] is False
    assert "| demo | ft_sam (declined) |  |  |  |" in leaderboard.markdown([row])


@pytest.mark.slow
def test_command_line_bad_value_is_one_line_and_nonzero(tmp_path, demo_dir):
    done = run_py(tmp_path, demo_dir.parent, "prune.sparsity=1.5")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "error: config key prune.sparsity=1.5: expected in [0, 1)"
    )
    assert "Traceback" not in done.stderr


def without_times(summary: dict) -> dict:
    """A metrics.json's content but for wall times, the one thing a rerun may change."""
    return {**summary, "metrics": {k: v for k, v in summary["metrics"].items() if "time/" not in k}}


@pytest.mark.slow
def test_a_command_line_run_gives_the_numbers_of_a_run_in_another_process(
    tmp_path, demo_dir, small_data
):
    """`python run.py` runs, prints the stages, ends its run FINISHED and saves the repaired
    net in its Hydra run folder; the same config run here, in a test worker that has run
    other tests before (its TensorFlow, caches and random state used), writes the same
    metrics.json to the last digit (but for wall times). (That another seed gives other
    numbers: test_runs_on_other_splits_share_nothing_computed_on_one.)"""
    settings = [*small_data, "finetune.epochs=1", "prune.sparsity=0.7", "seed=0"]
    done = run_py(tmp_path / "cli", demo_dir.parent, *settings)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "repaired: clean_acc=" in done.stderr + done.stdout
    assert only_run(tmp_path / "cli").info.status == "FINISHED"
    (folder,) = {path.parent for path in (tmp_path / "cli/outputs").glob("*/*/repaired_net.h5")}
    cfg = compose_config(tmp_path / "here", demo_dir, *settings)
    pipeline.run(cfg)
    here = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert without_times(json.loads((folder / "metrics.json").read_text())) == without_times(here)


@pytest.mark.slow
def test_points_over_one_badnet_calibrate_strip_once(tmp_path, demo_dir, small_data, caplog):
    """STRIP depends on the BadNet only: a second point reuses its overlays, clean scores
    and so its threshold."""
    caplog.set_level(logging.INFO, logger="badnet_repair")
    results = [
        pipeline.run(
            compose_config(
                tmp_path / str(s),
                demo_dir,
                *small_data,
                f"prune.sparsity={s}",
                "finetune.epochs=1",
                "goodnet.detector=strip",
                "goodnet.k=9",
            )
        )
        for s in (0.7, 0.9)
    ]
    calibrations = [r for r in caplog.records if "STRIP: scoring" in r.getMessage()]
    assert len(calibrations) == 1
    assert (
        results[0]["goodnet/strip/entropy_threshold"]
        == results[1]["goodnet/strip/entropy_threshold"]
    )
    assert results[0]["repaired/clean_acc"] != results[1]["repaired/clean_acc"]


@pytest.mark.slow
def test_runs_on_other_splits_share_nothing_computed_on_one(
    tmp_path, demo_dir, small_scoring, caplog
):
    """A seed sweep in one process: what the second point's budget counts from (the
    BadNet's held-out accuracy) is its own split's, as in a process of its own."""
    caplog.set_level(logging.INFO, logger="badnet_repair")
    ladder = [*small_scoring, "repair=ft_sam", *TINY["ft_sam"]]  # one rung

    def floor(name: str, seed: int) -> float:
        caplog.clear()
        pipeline.run(compose_config(tmp_path / name, demo_dir, f"seed={seed}", *ladder))
        (found,) = set(re.findall(r"the BadNet's (\d\.\d+)", caplog.text))  # one per rung
        return float(found)

    first, second = floor("a", 0), floor("b", 1)
    inputs._baseline.clear()
    alone = floor("c", 1)
    assert second == alone
    assert first != alone  # the splits differ, so the shared value must not be reused
