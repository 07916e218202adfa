"""Multiruns as MLflow parent and children, through real Hydra launchers and sweepers."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from badnet_repair.experiment import evaluate, leaderboard, sweep

from conftest import multirun, run_py, run_py_command

EPOCH = "finetune.epochs=1"  # one epoch per point


def parents_and_children(root: Path):
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["demo"], output_format="list")
    parents = [r for r in runs if r.data.tags.get("sweep_parent") == "true"]
    children = {
        p.info.run_id: [r for r in runs if r.data.tags.get("mlflow.parentRunId") == p.info.run_id]
        for p in parents
    }
    return parents, children


@pytest.fixture(scope="module")
def swept(tmp_path_factory, demo_dir, small_data):
    """A 3-point sparsity sweep, interrupted after its first point and then rerun."""
    root = tmp_path_factory.mktemp("sweep")
    points = [*small_data, EPOCH, "prune.sparsity=0.3,0.6,0.9"]
    cmd = run_py_command(root, demo_dir.parent, "-m", *points)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = []
    for line in proc.stdout:
        first.append(line)
        if "#1 :" in line:  # the first point is done, the second starting
            break
    proc.send_signal(signal.SIGTERM)
    first.extend(proc.stdout)
    proc.wait(timeout=60)
    (parent,), children = parents_and_children(root)
    statuses = sorted(c.info.status for c in children[parent.info.run_id])
    interrupted = {"code": proc.returncode, "parent": parent.info.status, "children": statuses}
    second = multirun(root, demo_dir.parent, *points)
    third = multirun(root, demo_dir.parent, *points)
    return root, "".join(first), second, third, interrupted


@pytest.mark.slow
def test_sweep_has_one_parent_with_a_child_per_point(swept):
    root, _, second, *_ = swept
    parents, children = parents_and_children(root)
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.info.run_name.endswith("finetune.epochs=1 prune.sparsity=0.3,0.6,0.9")
    finished = [c for c in children[parent.info.run_id] if c.info.status == "FINISHED"]
    assert sorted(c.data.params["prune.sparsity"] for c in finished) == ["0.3", "0.6", "0.9"]
    for child in finished:
        assert f"prune.sparsity={child.data.params['prune.sparsity']}" in child.info.run_name
        assert child.data.tags["config_hash"]
        assert "repaired/asr/patch" in child.data.metrics
    assert "| run | prune.sparsity |" in second and "Sweep " in second


@pytest.mark.slow
def test_interrupted_sweep_reruns_only_missing_points_then_skips_all(swept):
    root, first, second, third, interrupted = swept
    assert "#0 :" in first
    assert interrupted["code"] == 130, first[-2000:]
    assert interrupted["parent"] == "KILLED"  # not left RUNNING
    assert "RUNNING" not in interrupted["children"]
    assert second.count("already FINISHED") == 1  # the point done before the interrupt
    assert second.count("reusing the loaded BadNet") == 1  # loaded once for two points
    assert third.count("already FINISHED") == 3
    _, children = parents_and_children(root)
    finished = [c for kids in children.values() for c in kids if c.info.status == "FINISHED"]
    assert len(finished) == 3


@pytest.mark.slow
def test_parent_holds_summary_table_and_plot(swept):
    root, *_ = swept
    (parent,), _ = parents_and_children(root)
    client = mlflow.MlflowClient()
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "summary.csv",
        "summary.md",
        "sweep.png",
    }
    local = Path(client.download_artifacts(parent.info.run_id, "summary.csv"))
    header, *rows = local.read_text().strip().splitlines()
    assert header.startswith("run,prune.sparsity,badnet/asr/patch")
    assert "repaired/clean_acc" in header and "pruned/asr/patch" in header
    assert "curve/" not in header and "finetune/" not in header  # series, not results
    assert [r.split(",")[1] for r in rows] == ["0.3", "0.6", "0.9"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_server_serves_the_sweep_over_rest(swept):
    root, *_ = swept
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root}/mlruns/mlflow.db",
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        experiment = json.load(
            urllib.request.urlopen(
                f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=demo"
            )
        )["experiment"]
        request = urllib.request.Request(
            f"{base}/api/2.0/mlflow/runs/search",
            data=json.dumps(
                {"experiment_ids": [experiment["experiment_id"]], "max_results": 100}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        runs = json.load(urllib.request.urlopen(request))["runs"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    (parent_id,) = [
        r["info"]["run_id"]
        for r, t in zip(runs, tags, strict=True)
        if t.get("sweep_parent") == "true"
    ]
    children = [
        r for r, t in zip(runs, tags, strict=True) if t.get("mlflow.parentRunId") == parent_id
    ]
    finished = [c for c in children if c["info"]["status"] == "FINISHED"]
    assert len(finished) == 3
    for child in finished:
        params = {p["key"]: p["value"] for p in child["data"]["params"]}
        metrics = {m["key"] for m in child["data"]["metrics"]}
        assert params["repair"] == "fine_pruning" and "prune.sparsity" in params
        assert {"badnet/clean_acc", "repaired/asr/patch", "finetune/loss"} <= metrics


@pytest.fixture(scope="module")
def searched(tmp_path_factory, demo_dir, small_data):
    """An Optuna search of two trials asked at once and launched together by joblib, two
    jobs at a time, on one SQLite store: its root and output."""
    root = tmp_path_factory.mktemp("search")
    parallel = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]
    search = ["+hparams_search=optuna", "hydra.sweeper.n_trials=2", "sweep.objective=oracle_der"]
    return root, multirun(root, demo_dir.parent, *small_data, EPOCH, *search, *parallel)


@pytest.mark.slow
def test_parallel_jobs_share_one_sqlite_store(searched):
    """Two jobs at once (joblib) on one SQLite store: the store, experiment and parent are
    created before they start. Any Hydra launcher and sweeper take the same path through
    sweep.py (the basic sweeper's is the other tests'), so one pair is run here
    (submitit_local, 36 s more, is not)."""
    root, out = searched
    (parent,), children = parents_and_children(root)
    kids = children[parent.info.run_id]
    assert sorted(c.info.status for c in kids) == ["FINISHED", "FINISHED"]
    assert parent.info.status == "FINISHED"
    (header,) = [line for line in out.splitlines() if line.startswith("| run |")]
    assert "prune.sparsity" in header and "finetune.lr" in header  # the trials' own values
    assert "Joblib.Parallel(n_jobs=2," in out and "is launching 2 jobs" in out


@pytest.mark.slow
def test_optuna_search_logs_every_trial_and_maximises_the_objective(searched):
    root, out = searched
    (parent,), children = parents_and_children(root)
    kids = children[parent.info.run_id]
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    best = max(k.data.metrics["objective"] for k in kids)
    assert f"Best value: {best}" in out
    for kid in kids:  # DER = (max(0, fall of the worst ASR) - max(0, fall of accuracy) + 1) / 2
        m = kid.data.metrics
        d_asr = m["badnet/asr/patch"] - m["repaired/asr/patch"]
        d_acc = m["badnet/clean_acc"] - m["repaired/clean_acc"]
        assert m["objective"] == pytest.approx((max(0, d_asr) - max(0, d_acc) + 1) / 2)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("oracle_der", (0.90 - 0.02 + 1) / 2),
        ("oracle_clean_acc_under_asr", 0.95),
        ("holdout_acc", 0.9),
    ],
)
def test_objectives_by_hand(name, expected):
    metrics = {
        "badnet/clean_acc": 0.97,
        "repaired/clean_acc": 0.95,
        "badnet/asr/a": 1.0,
        "badnet/asr/b": 0.8,
        "repaired/asr/a": 0.01,
        "repaired/asr/b": 0.1,
        "repaired/holdout_acc": 0.9,
    }
    assert evaluate.objective(metrics, name, 0.1) == pytest.approx(expected)
    if name == "oracle_clean_acc_under_asr":  # the worst trigger over the ceiling: below all
        assert evaluate.objective(metrics, name, 0.05) == pytest.approx(-0.05)


@pytest.mark.slow
def test_resume_false_reruns_points(tmp_path, demo_dir, small_data):
    """One point twice in one sweep: resumed, the second would find the first FINISHED
    (as the interrupted sweep's rerun does); with sweep.resume=false both run."""
    points = [*small_data, EPOCH, "prune.sparsity=0.5,0.5", "sweep.resume=false"]
    out = multirun(tmp_path, demo_dir.parent, *points)
    assert "already FINISHED" not in out and "reusing the loaded BadNet" in out
    (parent,), children = parents_and_children(tmp_path)
    assert len(children[parent.info.run_id]) == 2
    assert sweep.read_parent(tmp_path / "absent") is None


@pytest.mark.slow
def test_sweep_stopped_by_bad_input_ends_its_parent_failed(tmp_path, demo_dir):
    done = run_py(tmp_path, demo_dir.parent, "-m", "finetune.lr=0,0.001")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (parent,), children = parents_and_children(tmp_path)
    assert parent.info.status == "FAILED" and children[parent.info.run_id] == []


@pytest.mark.slow
def test_a_sweep_whose_points_are_in_other_experiments_is_summarised_in_full(tmp_path):
    """`-m model=a,b` logs each point in its model's experiment (tracking.experiment follows
    the model) and the parent in the composed config's: the summary, the leaderboard and
    the resume check find the points by their parent, wherever they are."""
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    home = client.create_experiment("demo")
    parent = client.create_run(home, tags={"sweep_parent": "true"}).info.run_id
    for name, acc in (("demo_clean", 0.96), ("demo_bn_clean", 0.99)):
        tags = {"mlflow.parentRunId": parent, "config_hash": name, "repair": "finetune"}
        child = client.create_run(client.create_experiment(name), tags=tags).info.run_id
        for key, value in (("model.name", name), ("repair", "finetune")):
            client.log_param(child, key, value)
        for key, value in (("badnet/clean_acc", 0.95), ("repaired/clean_acc", acc)):
            client.log_metric(child, key, value)
        client.set_terminated(child, "FINISHED")
    children = sweep.finished_children(parent)
    table = sweep.summarise(parent, children)
    assert "| run | model.name |" in table and "0.9600" in table and "0.9900" in table
    assert sweep._other_experiments(home, children) == ["demo_bn_clean", "demo_clean"]
    assert sweep._other_experiments(
        client.get_experiment_by_name("demo_clean").experiment_id, children
    ) == ["demo_bn_clean"]
    assert len(sweep.finished_children(parent, "demo_bn_clean")) == 1
    rows = leaderboard.runs(None, parent)
    assert leaderboard.rows_of(children) == rows  # what a sweep's end builds its board from
    assert sorted(row["badnet"] for row in rows) == ["demo_bn_clean", "demo_clean"]
    assert leaderboard.runs(["demo"], parent) == []
