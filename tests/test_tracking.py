import signal
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import RunStatus
from omegaconf import OmegaConf
from sqlalchemy import event
from sqlalchemy.engine import Engine

from badnet_repair import UserError
from badnet_repair.experiment import tracking


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.fixture
def signal_in_the_next_store_write():
    """SIGTERM raised from inside SQLAlchemy's execute of the next write, where an
    interrupt once left the SQLite database locked and the run RUNNING."""
    armed = []

    def fire(conn, cursor, statement, *args):
        if armed and statement.lstrip().upper().startswith(("INSERT", "UPDATE")):
            armed.clear()
            signal.raise_signal(signal.SIGTERM)

    event.listen(Engine, "before_cursor_execute", fire)
    yield lambda: armed.append(True)
    event.remove(Engine, "before_cursor_execute", fire)


def test_a_signal_during_a_store_write_interrupts_once_the_write_is_done(
    tmp_path, signal_in_the_next_store_write
):
    experiment = tracking.prepare(f"sqlite:///{tmp_path}/m.db", "exp", str(tmp_path / "a"))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt, match="signal"):
        with tracking.tracked_run(experiment, "r") as run_id:
            mlflow.log_metric("x", 1.0, step=0)
            signal_in_the_next_store_write()
            mlflow.log_metric("x", 2.0, step=1)
            mlflow.log_metric("after", 1.0)  # never reached: interrupted as the write returned
    run = mlflow.get_run(run_id)
    assert run.info.status == "KILLED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "x")]
    assert steps == [0, 1]
    assert "after" not in run.data.metrics
    assert sys.getprofile() is None
    assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.slow
def test_a_signal_while_the_run_starts_ends_it_killed(tmp_path, signal_in_the_next_store_write):
    experiment = tracking.prepare(f"sqlite:///{tmp_path}/m.db", "exp", str(tmp_path / "a"))
    signal_in_the_next_store_write()
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run(experiment, "r"):
            pytest.fail("the body ran although the signal came while the run was created")
    (run,) = mlflow.search_runs([experiment], output_format="list")
    assert run.info.status == "KILLED"
    assert mlflow.active_run() is None


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
        assert name.startswith(f"{models[0]} (")  # the first CPU's name, then its details


def test_two_cpus_of_one_model_name_are_told_apart_by_family_and_vector_width():
    def cpuinfo(family: str, flags: str) -> str:
        block = f"processor\t: {{n}}\nmodel name\t: AMD EPYC\ncpu family\t: {family}\n"
        block += f"model\t\t: 17\nstepping\t: 1\nflags\t\t: fpu {flags} sse2\n"
        return block.format(n=0) + "\n" + block.format(n=1).replace("17", "99")

    zen4 = tracking.describe_cpu(cpuinfo("25", "avx2 avx512f avx512bw"))
    zen2 = tracking.describe_cpu(cpuinfo("23", "avx2"))
    assert zen4 == "AMD EPYC (cpu family 25, model 17, stepping 1, avx512f)"  # first block
    assert zen2 == "AMD EPYC (cpu family 23, model 17, stepping 1, avx2)"
    assert tracking.describe_cpu("processor\t: 0\nflags\t: fpu\n") == ""  # no model name
