"""The sweeper's config (`hydra/sweeper: optuna`, samplers `hydra/sweeper/sampler: tpe`
or `random`) and the `Sweeper` Hydra instantiates. Hydra imports this module whenever it
starts, to find its plugins, so it imports neither Optuna nor the search itself; those
load when a search starts (`badnet_repair.experiment.search`).

    hydra:
      sweeper:
        direction: maximize        # or minimize; a list for several objectives
        study_name: my_search      # the study in the storage (null: a new generated name)
        storage: null              # in memory; sqlite:///PATH or postgresql://... to keep it
        load_if_exists: true       # resume the study of that name instead of failing
        n_trials: 20               # the study's budget, over all runs and workers
        n_jobs: 1                  # trials asked at once, launched together
        max_failure_rate: 0.0      # share of this worker's trials that may fail
        sampler:
          seed: 0                  # draws of trial N come from seed + N
        params:                    # Hydra's sweep syntax, as on the command line
          x: interval(0, 1)
          n: range(1, 11)
          lr: tag(log, interval(0.0001, 0.1))
          opt: choice(adam, sgd)
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    _partial_: bool = True  # the search builds one per trial, seeded with seed + number
    seed: int | None = None
    n_startup_trials: int = 10


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    _partial_: bool = True
    seed: int | None = None


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.badnet_repair_search.optuna_sweeper.OptunaSweeper"
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}])
    sampler: Any = MISSING  # from hydra/sweeper/sampler (tpe)
    direction: Any = "minimize"
    study_name: str | None = None
    storage: Any = None
    load_if_exists: bool = True
    n_trials: int = 20
    n_jobs: int = 1
    max_failure_rate: float = 0.0
    params: dict[str, str] | None = None


store = ConfigStore.instance()
store.store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="badnet_repair")
for name, node in (("tpe", TPESamplerConf), ("random", RandomSamplerConf)):
    store.store(group="hydra/sweeper/sampler", name=name, node=node, provider="badnet_repair")


class OptunaSweeper(Sweeper):
    """Each trial is asked of the study, launched as a Hydra job through the configured
    launcher (job number = trial number) and told the job's return value, or failed."""

    def __init__(
        self,
        sampler: Any,
        direction: Any,
        study_name: str | None,
        storage: Any,
        load_if_exists: bool,
        n_trials: int,
        n_jobs: int,
        max_failure_rate: float,
        params: DictConfig | None,
    ) -> None:
        self.settings = {
            "sampler": sampler,
            "direction": direction,
            "study_name": study_name,
            "storage": storage,
            "load_if_exists": load_if_exists,
            "n_trials": n_trials,
            "n_jobs": n_jobs,
            "max_failure_rate": max_failure_rate,
        }
        self.params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else params
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        from hydra.core.plugins import Plugins

        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from badnet_repair.experiment import search

        assert self.config is not None and self.launcher is not None
        s = self.settings
        space = search.search_space(
            self.params, arguments, config_loader=self.hydra_context.config_loader
        )
        direction = s["direction"]
        directions = [direction] if isinstance(direction, str) else list(direction)
        sampler = search.sampler_from(s["sampler"])
        study = search.open_study(
            s["storage"], s["study_name"], s["load_if_exists"], directions, sampler
        )
        log = search.log
        log.info("Study: %s, storage: %s", study.study_name, search.shown(s["storage"]))
        log.info("Sampler: %s; directions: %s", sampler, directions)
        log.info("Search space: %s", space.distributions)
        runner = search.Search(study, space, s["n_trials"], s["n_jobs"], s["max_failure_rate"])

        def launch(batch, first_number):
            self.validate_batch_is_legal(batch)
            return self.launcher.launch(batch, initial_job_idx=first_number)

        returns = runner.run(launch)
        runner.report(self.config.hydra.sweep.dir)
        return returns
