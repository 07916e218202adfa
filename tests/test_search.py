"""Our Optuna sweeper (hydra/sweeper=optuna): its search-space syntax, and real searches
with real Optuna and SQLite storages, run on a tiny Hydra app (tests/search_app) so that
each takes about a second; test_sweep.py runs one through the whole pipeline."""

import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from badnet_repair.experiment import search

from conftest import ROOT

APP = Path(__file__).parent / "search_app" / "app.py"


def test_params_syntax_gives_optuna_distributions():
    space = search.search_space(
        {
            "a": "interval(0.3, 0.95)",
            "b": "range(1, 11)",
            "c": "tag(log, interval(0.0001, 0.01))",
            "d": "choice(adam, sgd)",
            "e": "tag(int, interval(1, 64))",
            "f": "tag(int, log, interval(1, 64))",
            "g": "range(0.1, 0.5, 0.1)",
            "h": "tag(log, range(1, 9))",
            "i": "1,2,4",
            "j": "range(0, 10, 3)",
        },
        [],
    )
    d = space.distributions
    assert d["a"] == FloatDistribution(0.3, 0.95)
    assert d["b"] == IntDistribution(1, 10)  # range() excludes its end, as Hydra's does
    assert d["c"] == FloatDistribution(0.0001, 0.01, log=True)
    assert d["d"] == CategoricalDistribution(["adam", "sgd"])
    assert d["e"] == IntDistribution(1, 64)
    assert d["f"] == IntDistribution(1, 64, log=True)
    assert d["g"].step == pytest.approx(0.1) and d["g"].low == pytest.approx(0.1)
    assert d["g"].high == pytest.approx(0.4)
    assert d["h"] == IntDistribution(1, 8, log=True)
    assert d["i"] == CategoricalDistribution([1, 2, 4])
    assert d["j"] == IntDistribution(0, 9, step=3)
    assert space.fixed == ()


def test_command_line_fixes_or_searches_a_key_and_passes_the_rest_as_written():
    params = {"lr": "interval(0.1, 1)", "epochs": "range(1, 11)"}
    space = search.search_space(
        params, ["+hparams_search=optuna", "epochs=1", "~gone", "+extra=choice(a b, c)"]
    )
    assert set(space.distributions) == {"lr", "extra"}
    assert space.fixed == ("+hparams_search=optuna", "epochs=1", "~gone")
    assert space.overrides({"lr": 0.5, "extra": "a b"}) == [
        "+hparams_search=optuna",
        "epochs=1",
        "~gone",
        "lr=0.5",
        "+extra=a\\ b",  # escaped as Hydra reads it
    ]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"x": "interval(2, 1)"}, "low < high"),
        ({"x": "tag(log, choice(1, 2))"}, "tags apply"),
        ({"x": "tag(int, interval(0.5, 2))"}, "integer bounds"),
        ({"x": "tag(log, range(1, 9, 2))"}, "step 1"),
        ({"x": "tag(fast, interval(0, 1))"}, "unknown tag"),
        ({"x": "3"}, "nothing to search"),
        ({}, "nothing to search"),
    ],
)
def test_bad_params_are_refused_with_their_key(params, message):
    with pytest.raises(search.SearchError, match=message):
        search.search_space(params, [])


def test_the_projects_search_config_composes_with_our_sweeper(tmp_path):
    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        cfg = compose(
            "config",
            overrides=["+hparams_search=optuna", "seed=7", f"paths.root={tmp_path}"],
            return_hydra_config=True,
        )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.badnet_repair_search.optuna_sweeper.OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 7
    assert sweeper.direction == "maximize" and sweeper.storage is None
    assert sweeper.load_if_exists is True
    space = search.search_space(OmegaConf.to_container(sweeper.params), ["finetune.epochs=1"])
    assert set(space.distributions) == {"prune.sparsity", "finetune.lr"}


def app(sweep_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(APP), "-m", f"hydra.sweep.dir={sweep_dir}", *overrides]


def run_app(sweep_dir: Path, *overrides: str, code: int = 0) -> str:
    done = subprocess.run(app(sweep_dir, *overrides), capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == code, out[-3000:]
    return out


def trials(db: Path, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db}").trials


@pytest.mark.slow
def test_in_memory_search_runs_n_trials_and_reports_the_best(tmp_path):
    out = run_app(tmp_path / "m", "hydra.sweeper.n_trials=4")
    assert "storage: in memory" in out and "Trial 3:" in out and "Trial 4:" not in out
    results = OmegaConf.load(tmp_path / "m" / search.RESULTS_FILE)
    assert f"Best value: {results.best_value}" in out
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.is_dir()) == list("0123")


@pytest.mark.slow
def test_a_stored_search_resumes_and_draws_as_if_never_stopped(tmp_path):
    """n_trials is the study's budget: a rerun runs what is missing. A trial's draws come
    from seed + its number, so the resumed study has the same points as one run through."""
    db = tmp_path / "study.db"
    storage = [f"hydra.sweeper.storage=sqlite:///{db}", "hydra/sweeper/sampler=random"]
    run_app(tmp_path / "a", *storage, "hydra.sweeper.n_trials=3")
    out = run_app(tmp_path / "b", *storage, "hydra.sweeper.n_trials=5")
    assert "3 of 5 trials counted" in out
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.is_dir()) == ["3", "4"]
    out = run_app(tmp_path / "c", *storage, "hydra.sweeper.n_trials=5")
    assert "5 of 5 trials counted" in out and "Launching" not in out
    resumed = trials(db)
    assert [t.state for t in resumed] == [TrialState.COMPLETE] * 5

    whole = tmp_path / "whole.db"
    run_app(
        tmp_path / "d",
        f"hydra.sweeper.storage=sqlite:///{whole}",
        "hydra/sweeper/sampler=random",
        "hydra.sweeper.n_trials=5",
    )
    assert [t.params for t in trials(whole)] == [t.params for t in resumed]
    assert len({t.params["x"] for t in resumed}) == 5


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path):
    """Optuna's distributed mode: two processes run the same command on one storage; each
    asks it for the next trial, and together they run the study's n_trials."""
    db = tmp_path / "shared.db"
    common = [
        f"hydra.sweeper.storage=sqlite:///{db}",
        "hydra.sweeper.n_trials=8",
        "pause=0.3",
    ]
    workers = [
        subprocess.Popen(
            app(tmp_path / f"w{i}", *common),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [w.communicate(timeout=120)[0] for w in workers]
    for w, out in zip(workers, outs, strict=True):
        assert w.returncode == 0, out[-3000:]
    done = trials(db)
    # Workers that ask at the same moment may both take the last slot: one extra at most.
    assert 8 <= len(done) <= 9
    assert all(t.state == TrialState.COMPLETE for t in done)
    assert [t.number for t in done] == list(range(len(done)))
    by_worker: dict[str, list[int]] = {}
    for t in done:
        by_worker.setdefault(t.user_attrs[search.WORKER], []).append(t.number)
    assert len(by_worker) == 2, by_worker  # both took part
    for i, (w, out) in enumerate(zip(workers, outs, strict=True)):
        ran = by_worker[f"{_host()}:{w.pid}"]
        jobs = sorted(int(p.name) for p in (tmp_path / f"w{i}").iterdir() if p.is_dir())
        assert jobs == ran  # each job's folder is its trial's number: no clashes
        assert "Best value:" in out
    assert len({(t.params["x"], t.params["y"]) for t in done}) == len(done)


def _host() -> str:
    import socket

    return socket.gethostname()


@pytest.mark.slow
def test_failed_trials_are_told_failed_and_stop_the_search_by_default(tmp_path):
    db = tmp_path / "fail.db"
    storage = f"hydra.sweeper.storage=sqlite:///{db}"
    out = run_app(tmp_path / "a", storage, "fail_above=-10", code=1)
    assert "Trial 0 failed: RuntimeError" in out and "search stopped" in out
    (failed,) = trials(db)
    assert failed.state == TrialState.FAIL and "RuntimeError" in failed.user_attrs["error"]


@pytest.mark.slow
def test_tolerated_failures_count_against_the_budget(tmp_path):
    db = tmp_path / "some.db"
    out = run_app(
        tmp_path / "a",
        f"hydra.sweeper.storage=sqlite:///{db}",
        "hydra.sweeper.max_failure_rate=1.0",
        "hydra.sweeper.n_trials=6",
        "fail_above=0",
    )
    states = [t.state for t in trials(db)]
    assert len(states) == 6 and TrialState.FAIL in states and TrialState.COMPLETE in states
    assert f"{states.count(TrialState.FAIL)} failed" in out


def hear_sigint() -> None:
    """In the child: SIGINT unblocked and at its default. Both an ignored and a blocked
    SIGINT are inherited, and joblib's loky ignores it around spawning its tracker, so a
    test run earlier in the same worker can leave the job deaf to the interrupt."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_an_interrupted_trial_is_not_counted_and_runs_again_first(tmp_path):
    db = tmp_path / "stop.db"
    storage = f"hydra.sweeper.storage=sqlite:///{db}"
    proc = subprocess.Popen(
        app(tmp_path / "a", storage, "hydra.sweeper.n_trials=2", "pause=30"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=hear_sigint,
    )
    for line in proc.stdout:
        if line.startswith("pausing"):  # the first job is in its pause (not before it)
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    stopped, queued = trials(db)
    assert stopped.state == TrialState.FAIL and stopped.user_attrs[search.INTERRUPTED]
    assert queued.state == TrialState.WAITING
    assert queued.system_attrs["fixed_params"] == stopped.params
    out = run_app(tmp_path / "b", storage, "hydra.sweeper.n_trials=2")
    assert "0 of 2 trials counted" in out
    again = trials(db)
    assert [t.state for t in again] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert again[1].params == stopped.params and again[1].user_attrs["retry_of"] == 0
