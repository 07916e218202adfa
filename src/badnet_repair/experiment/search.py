"""Hyperparameter search with Optuna's ask-and-tell interface, each trial a Hydra job.

`hydra_plugins.badnet_repair_search` registers the sweeper (`hydra/sweeper=optuna`) and
hands its settings to `Search`; everything that needs Optuna is here and in
`search_space` (the params' syntax), so that Hydra's plugin scan, which imports every
plugin module on each start, stays cheap.

A study lives in Optuna's storage (`storage`: null keeps it in memory; an RDB URL such as
sqlite:///search.db or postgresql://... keeps it in a database) under `study_name`. With a
storage, rerunning the same command resumes the study, and any number of processes, on
one machine or many, can run the same command against one database server: each asks the
storage for its next trial (Optuna's distributed mode). `n_trials` is the study's budget,
counted over all workers and runs: trials finished, failed or running (a trial stopped by
Ctrl-C or SIGTERM is not counted; its parameters are queued again for the next worker).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.utils import JobReturn
from omegaconf import OmegaConf
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, Trial, TrialState

from badnet_repair.experiment.search_space import SearchError, Space, search_space

__all__ = ["Search", "SearchError", "Space", "search_space", "open_study", "sampler_from"]

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted"  # user attribute of a trial stopped by Ctrl-C or SIGTERM
WORKER = "worker"  # user attribute: host:pid of the process that ran the trial
RESULTS_FILE = "optimization_results.yaml"


# ---------------------------------------------------------------------------------------
# Sampling: reproducible per trial, whichever process runs it


class PerTrialSeed(BaseSampler):
    """Builds the configured sampler afresh for each trial, seeded with `seed` plus the
    trial's number. A trial's random draws then depend on its number only, not on the
    process that runs it: a resumed search does not replay the first run's draws, and
    workers started together with one seed do not all draw the same points. Samplers that
    learn from the study (TPE after its startup trials) read the trials from the storage,
    so nothing else is lost by rebuilding them."""

    def __init__(self, make: Callable[..., BaseSampler], seed: int) -> None:
        self._make = make
        self._seed = seed
        self._inner = make(seed=seed)

    def __str__(self) -> str:
        return f"{type(self._inner).__name__} (seed {self._seed} + trial number)"

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._inner = self._make(seed=self._seed + trial.number)
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def sampler_from(config: Any) -> BaseSampler:
    """The sampler of `hydra.sweeper.sampler`, which Hydra hands over as a partial
    (`_partial_: true`) or an instance; seeded per trial where it has a seed."""
    if isinstance(config, BaseSampler):
        return config
    if isinstance(config, functools.partial):
        seed = config.keywords.get("seed")
        return config() if seed is None else PerTrialSeed(config, int(seed))
    raise SearchError(f"hydra.sweeper.sampler: not an Optuna sampler: {config!r}")


# ---------------------------------------------------------------------------------------
# The study


def shown(storage: Any) -> str:
    """A storage as logged: an URL's password hidden."""
    if storage is None:
        return "in memory"
    if not isinstance(storage, str):
        return type(storage).__name__
    return re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", str(storage))


def storage_from(config: Any) -> Any:
    """`hydra.sweeper.storage`: null (memory), an URL or an instantiated storage. SQLite
    waits up to a minute for a lock, since workers on one machine share its file."""
    if isinstance(config, str) and config.startswith("sqlite"):
        return optuna.storages.RDBStorage(config, engine_kwargs={"connect_args": {"timeout": 60}})
    return config


def _transient(error: Exception) -> bool:
    """A database error that a second try may not meet (two workers creating the schema)."""
    return type(error).__module__.split(".")[0] in ("sqlalchemy", "sqlite3")


def open_study(
    storage: Any,
    study_name: str | None,
    load_if_exists: bool,
    directions: list[str],
    sampler: BaseSampler,
    tries: int = 5,
) -> optuna.Study:
    """Create the study, or load it where it exists and `load_if_exists` is set."""
    for attempt in range(1, tries + 1):
        try:
            return optuna.create_study(
                storage=storage_from(storage),
                sampler=sampler,
                study_name=study_name,
                directions=directions,
                load_if_exists=load_if_exists,
            )
        except Exception as e:
            if attempt == tries or not _transient(e):
                raise
            log.warning("opening the study failed (%s), try %d of %d", e, attempt + 1, tries)
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def counted(study: optuna.Study) -> int:
    """Trials that use the budget: finished, pruned, running, or failed other than by an
    interrupt. Queued (WAITING) ones are not, until a worker takes them."""
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.FAIL)
    return sum(
        1
        for t in study.get_trials(deepcopy=False, states=states)
        if not (t.state == TrialState.FAIL and t.user_attrs.get(INTERRUPTED))
    )


def _runs(numbers: list[int]) -> list[list[int]]:
    """Indices of a batch split where its trial numbers are not consecutive (another
    worker took the ones between), so that each job's number is its trial's number."""
    runs: list[list[int]] = []
    for i, number in enumerate(numbers):
        if runs and numbers[runs[-1][-1]] + 1 == number:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


Launch = Callable[[Sequence[Sequence[str]], int], Sequence[JobReturn]]


@dataclass
class Search:
    """One worker's part of a search: asks the study for trials, `n_jobs` at a time, runs
    each as a Hydra job through `launch` and tells the study what the job returned."""

    study: optuna.Study
    space: Space
    n_trials: int
    n_jobs: int = 1
    max_failure_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.n_trials < 0 or self.n_jobs < 1:
            raise SearchError("hydra.sweeper: n_trials must be >= 0 and n_jobs >= 1")
        if not 0.0 <= self.max_failure_rate <= 1.0:
            raise SearchError("hydra.sweeper.max_failure_rate must lie in [0, 1]")
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.completed = 0
        self.failed: list[BaseException] = []

    def ask(self) -> Trial:
        trial = self.study.ask(fixed_distributions=self.space.distributions)
        trial.set_user_attr(WORKER, self.worker)
        return trial

    def run(self, launch: Launch) -> list[JobReturn]:
        returns: list[JobReturn] = []
        already = counted(self.study)
        log.info(
            "Study %s: %d of %d trials counted before this worker started",
            self.study.study_name,
            already,
            self.n_trials,
        )
        while (left := self.n_trials - counted(self.study)) > 0:
            trials = [self.ask() for _ in range(min(self.n_jobs, left))]
            told: set[int] = set()
            try:
                for run in _runs([t.number for t in trials]):
                    batch = [trials[i] for i in run]
                    overrides = [self.space.overrides(t.params) for t in batch]
                    for trial, job in zip(batch, overrides, strict=True):
                        trial.set_user_attr("overrides", job)
                    results = launch(overrides, batch[0].number)
                    for trial, result in zip(batch, results, strict=True):
                        self.tell(trial, result)
                        told.add(trial.number)
                    returns.extend(results)
            except KeyboardInterrupt:
                self.interrupted([t for t in trials if t.number not in told])
                raise
            except BaseException as e:  # a job that exits the process (sys.exit) ends it
                for trial in trials:
                    if trial.number not in told:
                        self.fail(trial, e)
                raise
            if self.failed and len(self.failed) > self.max_failure_rate * (
                self.completed + len(self.failed)
            ):
                log.error(
                    "%d of %d trials failed (hydra.sweeper.max_failure_rate=%s): search stopped",
                    len(self.failed),
                    self.completed + len(self.failed),
                    self.max_failure_rate,
                )
                raise self.failed[-1]
        return returns

    def tell(self, trial: Trial, result: JobReturn) -> None:
        """Tell the study the job's value, or that the trial failed: the job raised, or
        returned something that is not a number (NaN included)."""
        directions = len(self.study.directions)
        try:
            value = result.return_value  # raises what the job raised
            values = [float(v) for v in ([value] if directions == 1 else value)]
            if len(values) != directions or any(math.isnan(v) for v in values):
                raise SearchError(f"the job returned {value!r}, not {directions} number(s)")
        except Exception as e:
            self.fail(trial, e)
            self.failed.append(e)
            return
        self.study.tell(trial, values[0] if directions == 1 else values)
        self.completed += 1
        log.info(
            "Trial %d: %s %s", trial.number, values[0] if directions == 1 else values, trial.params
        )

    def fail(self, trial: Trial, error: BaseException) -> None:
        log.warning("Trial %d failed: %s: %s", trial.number, type(error).__name__, error)
        try:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:1000])
            self.study.tell(trial, state=TrialState.FAIL)
        except Exception as e:  # noqa: BLE001 - the storage may be what failed
            log.warning("trial %d not marked failed: %s", trial.number, e)

    def interrupted(self, trials: list[Trial]) -> None:
        """Trials stopped by Ctrl-C or SIGTERM end FAIL, marked `interrupted` (so not
        counted), and their parameters are queued for the next worker or rerun."""
        for trial in trials:
            try:
                trial.set_user_attr(INTERRUPTED, True)
                self.study.tell(trial, state=TrialState.FAIL)
                self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            except Exception as e:  # noqa: BLE001 - the storage may be what failed
                log.warning("trial %d not marked interrupted: %s", trial.number, e)

    def report(self, sweep_dir: str | Path | None = None) -> None:
        """Log the best trial so far (over all workers) and write it to the sweep folder."""
        log.info("This worker: %d trials completed, %d failed", self.completed, len(self.failed))
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            log.info("No trial completed")
            return
        results: dict[str, Any] = {"name": self.study.study_name}
        if len(self.study.directions) == 1:
            best = self.study.best_trial
            log.info("Best trial: %d", best.number)
            log.info("Best parameters: %s", best.params)
            log.info("Best value: %s", best.value)
            results.update(best_trial=best.number, best_params=best.params, best_value=best.value)
        else:
            front = [
                {"number": t.number, "params": t.params, "values": t.values}
                for t in self.study.best_trials
            ]
            log.info("Best trials (Pareto front): %s", [t["number"] for t in front])
            results["solutions"] = front
        if sweep_dir is not None:
            path = Path(sweep_dir) / RESULTS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(OmegaConf.create(results), path)
