from pathlib import Path

import mlflow
import pytest
from mlflow.entities import RunStatus
from omegaconf import OmegaConf

from badnet_repair import UserError
from badnet_repair.experiment import tracking


def test_prepare_creates_store_and_experiment_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    first = tracking.prepare(uri, "exp", str(tmp_path / "artifacts"))
    assert tracking.prepare(uri, "exp", str(tmp_path / "artifacts")) == first
    assert (tmp_path / "store" / "mlflow.db").is_file()
    location = mlflow.get_experiment(first).artifact_location
    assert location == (tmp_path / "artifacts" / "exp").as_uri()


def test_relative_sqlite_uri_is_refused(tmp_path):
    with pytest.raises(UserError, match="tracking.uri=sqlite:///mlruns/x.db: a SQLite path must"):
        tracking.prepare("sqlite:///mlruns/x.db", "exp", str(tmp_path))


def test_unreachable_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(
        UserError, match="tracking.uri=http://127.0.0.1:9: MLflow store not reachable"
    ):
        tracking.prepare("http://127.0.0.1:9", "exp", str(tmp_path))


@pytest.mark.parametrize(
    ("error", "status"),
    [(RuntimeError("boom"), RunStatus.FAILED), (KeyboardInterrupt(), RunStatus.KILLED)],
)
def test_a_run_that_raises_is_never_left_running(tmp_path, error, status):
    experiment = tracking.prepare(f"sqlite:///{tmp_path}/m.db", "exp", str(tmp_path / "a"))
    with pytest.raises(type(error)):
        with tracking.tracked_run(experiment, "r") as run_id:
            mlflow.log_metric("x", 1.0)
            raise error
    run = mlflow.get_run(run_id)
    assert run.info.status == RunStatus.to_string(status)
    assert run.data.metrics == {"x": 1.0}


def test_flatten_uses_dotted_keys():
    cfg = OmegaConf.create({"prune": {"sparsity": 0.5}, "data": {"poisoned": {"a": "p"}}, "x": 1})
    assert tracking.flatten(cfg) == {"prune.sparsity": "0.5", "data.poisoned.a": "p", "x": "1"}
    assert Path(tracking.sqlite_path("sqlite:////abs/m.db")) == Path("/abs/m.db")


def test_machine_names_the_cpu_a_run_trained_on():
    """The `machine` tag: the CPU model from /proc/cpuinfo where there is one."""
    name = tracking.machine()
    assert name and name != "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        models = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        assert name == models[0]
