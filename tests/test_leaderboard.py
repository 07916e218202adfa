"""The leaderboard: every repair on a BadNet (defense_comparison), every BadNet of the zoo
(zoo), resumable like every sweep, rebuilt from the store; the clean rule that marks the
best repair reads no test or poisoned data."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from badnet_repair.defenses import repairs
from badnet_repair.experiment import leaderboard

from conftest import ROOT, TINY

pytestmark = pytest.mark.slow

SCALE = "model.build_scale=0.05"  # tiny demo builds: the mechanics, not the figures


def tiny_settings() -> list[str]:
    """Every repair's tiny settings, forced in for a sweep over repairs (`++`: set where
    a repair reads them, ignored with a warning elsewhere)."""
    return sorted({f"++{o}" for settings in TINY.values() for o in settings})


def multirun(root: Path, *overrides: str) -> str:
    done = subprocess.run(
        [
            sys.executable,
            f"{ROOT}/run.py",
            "-m",
            f"paths.root={root}",
            f"paths.data={root}/data",
            SCALE,
            "goodnet.k=8",
            *tiny_settings(),
            *overrides,
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("comparison")
    first = multirun(root, "+experiment=defense_comparison")
    again = multirun(root, "+experiment=defense_comparison")
    return root, first, again


def parent_of(root: Path, experiment: str):
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=[experiment], output_format="list")
    (parent,) = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    return parent


def test_defense_comparison_runs_every_repair_once_and_resumes(compared):
    root, first, again = compared
    parent = parent_of(root, "demo")
    rows = leaderboard.runs(["demo"], parent.info.run_id)
    assert sorted(row["repair"] for row in rows) == repairs.names()
    assert again.count("already FINISHED") == len(repairs.names())
    assert "Leaderboard:" in first and "| badnet | repair | best |" in first
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.info.run_id)}
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.png", "summary.md"} <= artifacts


def test_the_leaderboard_is_rebuilt_from_the_store(compared, tmp_path, capsys):
    root, *_ = compared
    parent = parent_of(root, "demo")
    uri = f"sqlite:///{root}/mlruns/mlflow.db"
    argv = ["--tracking-uri", uri, "--parent", parent.info.run_id, "--out", str(tmp_path)]
    assert leaderboard.main(argv) == 0
    logged = mlflow.MlflowClient().download_artifacts(parent.info.run_id, "leaderboard.md")
    assert capsys.readouterr().out == Path(logged).read_text()
    assert (tmp_path / "leaderboard.png").stat().st_size > 0
    assert leaderboard.main(["--tracking-uri", uri, "--experiment", "absent"]) == 1


def test_zoo_runs_every_demo_badnet_in_one_experiment(tmp_path):
    out = multirun(tmp_path, "+experiment=zoo", "repair=finetune,fine_pruning")
    parent = parent_of(tmp_path, "zoo")
    rows = leaderboard.runs(["zoo"], parent.info.run_id)
    badnets = {"demo", "demo_blend", "demo_bn", "demo_lowrate", "demo_multi"}
    assert {(r["badnet"], r["repair"]) for r in rows} == {
        (b, r) for b in badnets for r in ("finetune", "fine_pruning")
    }
    assert "asr/glasses" in out and "asr/blend" in out  # every trigger has its column


def finished_run(client, experiment_id: str, badnet: str, repair: str, **metrics) -> None:
    run = client.create_run(experiment_id, tags={"config_hash": f"{badnet}-{repair}"})
    client.log_param(run.info.run_id, "model.name", badnet)
    client.log_param(run.info.run_id, "repair", repair)
    values = {"badnet/clean_acc": 0.97, "badnet/asr/patch": 1.0, "badnet/holdout_acc": 0.96}
    for key, value in {**values, **metrics}.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")


def test_the_clean_rule_never_reads_the_test_or_poisoned_sets(tmp_path):
    """The best repair is marked by held-out accuracy and the probe: a repair with a
    perfect (test) ASR but a worse probe is not picked; one over the accuracy budget is
    not picked; a BadNet without a probe gets no mark."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("board")
    common = {"repaired/clean_acc": 0.96}
    finished_run(
        client,
        experiment,
        "a",
        "x",
        **common,
        **{"repaired/asr/patch": 0.0},
        **{"repaired/holdout_acc": 0.955, "repaired/probe_asr": 0.3},
    )
    finished_run(
        client,
        experiment,
        "a",
        "y",
        **common,
        **{"repaired/asr/patch": 0.5},
        **{"repaired/holdout_acc": 0.95, "repaired/probe_asr": 0.01},
    )
    finished_run(
        client,
        experiment,
        "a",
        "z",
        **common,
        **{"repaired/asr/patch": 0.4},
        **{"repaired/holdout_acc": 0.90, "repaired/probe_asr": 0.0},
    )
    finished_run(
        client,
        experiment,
        "b",
        "x",
        **common,
        **{"repaired/asr/patch": 0.0},
        **{"repaired/holdout_acc": 0.96},
    )
    rows = leaderboard.runs(["board"])
    marks = leaderboard.best(rows)
    picked = {
        row["badnet"]: row["repair"] for row in rows if marks.get(row["badnet"]) == row["run_id"]
    }
    assert picked == {"a": "y"}
    text = leaderboard.markdown(rows)
    assert (
        "| a | y | * |" in text
        and "goal (ASR <= 0.02 at <= 2 points lost) reached on: a, b" in text
    )
