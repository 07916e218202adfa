"""Repairs: one module per repair behind one interface, chosen with `repair=NAME`.

A repair is the module `badnet_repair/defenses/repairs/NAME.py` and the config
`conf/repair/NAME.yaml`; nothing else names it. The module defines:

- `Settings`, a `RepairSettings` dataclass whose fields are the config sections the
  repair reads (`prune`, `finetune`, ...), each a dataclass of typed keys (ranges
  with `ranges.ranged`, anything else in an optional `check` method);
- `repair(case, **sections) -> keras.Model`, one parameter per section: the repaired
  net as a plain tf_keras model, the BadNet itself left untouched;
- `describe(**sections) -> str`: its settings in a few words, for run names and titles.

A repair sees the BadNet and the defender's clean validation data (`case.clean`) and
nothing else: every choice it makes reads that data. It writes what it measured to
`case.journal` and hands intermediate nets back (`case.stage`, `case.series`); the
experiment scores those on the evaluation sets after the repair has returned.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import tf_keras as keras
from omegaconf import MISSING, DictConfig, OmegaConf

from badnet_repair.data import Dataset
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.journal import Journal
from badnet_repair.network import training
from badnet_repair.network.predict import accuracy
from badnet_repair.registry import Registry

log = logging.getLogger(__name__)
REGISTRY = Registry(__name__, __path__)


@dataclass
class RepairSettings:
    """The base of every repair's `Settings`: `repair` is the repair's name."""

    repair: str = MISSING


@dataclass
class Stage:
    """An intermediate net a repair hands back, scored as stage `name` on the evaluation
    sets once the repair has returned (a copy: the repair may go on changing its own)."""

    name: str
    model: keras.Model


@dataclass
class Series:
    """A series of nets, such as fine-pruning's k = 0..C channels removed, that
    `accuracy_on(dataset)` scores all at once (an array over k). The experiment scores it
    on each evaluation set (`name/clean_acc`, `name/asr/<trigger>`, k as step), reads
    stage `stage` off it at index `at` and draws it beside the repair's own clean-data
    series `own` into `figure`. `key` names it in the memo: points of a sweep over one
    BadNet score it once."""

    name: str
    accuracy_on: Callable[[Dataset], np.ndarray]
    own: dict[str, np.ndarray]
    stage: str
    at: int
    how: str
    title: str
    figure: str
    key: Any


@dataclass
class Case:
    """What a repair works on and where it records what it measured."""

    badnet: keras.Model
    layer: str  # model.layer: the layer that single-layer repairs work on
    clean: CleanData
    journal: Journal
    seed: int
    batch_size: int  # for forward passes (eval_batch_size)
    memo: Memo = field(default_factory=Memo)
    handed: list[Stage | Series] = field(default_factory=list)  # to be scored, in order

    def shared(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` once per BadNet and data in this process: the points of a sweep
        over one BadNet share it. `key` names everything else it depends on."""
        return self.memo.shared(key, compute)

    def badnet_holdout_accuracy(self) -> float:
        """The BadNet's accuracy on the clean held-out images: what budgets count from."""
        return self.shared(
            "badnet holdout accuracy",
            lambda: accuracy(self.badnet, self.clean.holdout, self.batch_size),
        )

    def stage(self, name: str, model: keras.Model) -> None:
        """Hand back an intermediate net to be scored as stage `name` (a copy is kept)."""
        from badnet_repair.network.pruning import copy_model

        self.handed.append(Stage(name, copy_model(model)))

    def series(self, series: Series) -> None:
        """Hand back a series of nets to be scored (see `Series`)."""
        self.handed.append(series)

    def run_steps(
        self,
        name: str,
        model: keras.Model,
        step: Callable,
        *,
        steps: int,
        batch_size: int,
        stop: Callable[[], bool] | None = None,
        seed_offset: int = 0,
        score: bool = True,
    ) -> int:
        """`training.run_steps` of a custom training `step` on the clean training split, each
        round's loss and held-out accuracy reported as `name/...` (the accuracy left out
        with `score=False`, for steps that train something other than `model`)."""
        return training.run_steps(
            name,
            model,
            self.clean.train,
            self.clean.holdout if score else None,
            steps=steps,
            batch_size=batch_size,
            seed=self.seed + seed_offset,
            step=step,
            on_round=self.journal.step,
            stop=stop,
        )

    # `repairs.finetune` is a repair module: the training function is `training.finetune`
    def finetune(
        self,
        model: keras.Model,
        settings: training.Finetune,
        pruned=None,
        series: str = "",
        train: Dataset | None = None,
    ) -> None:
        """Fine-tune `model` in place on `train` (by default the clean training split),
        seeded, reporting each epoch's loss and held-out accuracy (as
        `finetune/<series>/...` when several runs share one MLflow run); a
        `pruning.Pruned` keeps its pruning in force."""
        training.finetune(
            model,
            self.clean.train if train is None else train,
            self.clean.holdout,
            epochs=settings.epochs,
            lr=settings.lr,
            batch_size=settings.batch_size,
            seed=self.seed,
            pruning=pruned,
            on_epoch=self.journal.step,
            name=f"finetune/{series}" if series else "finetune",
        )


def names() -> list[str]:
    """Every repair, by module name."""
    return REGISTRY.names()


def settings(name: str) -> type:
    return REGISTRY.module(name).Settings


def sections(name: str) -> list[str]:
    """The config sections a repair reads."""
    return [f.name for f in fields(settings(name)) if f.name != "repair"]


def unread(cfg: DictConfig) -> list[str]:
    """Other repairs' sections present in `cfg` (forced in with `++` for a sweep over
    repairs): the chosen repair ignores them."""
    mine = set(sections(cfg.repair))
    return sorted({s for name in names() for s in sections(name) if s in cfg and s not in mine})


def _arguments(cfg: DictConfig) -> dict[str, Any]:
    return {section: OmegaConf.to_object(cfg[section]) for section in sections(cfg.repair)}


def describe(cfg: DictConfig) -> str:
    """The chosen repair and its settings in a few words: `fine_pruning (sparsity 0.5, ...)`."""
    return f"{cfg.repair} ({REGISTRY.module(cfg.repair).describe(**_arguments(cfg))})"


def run(cfg: DictConfig, case: Case) -> keras.Model:
    """Carry out the repair `cfg.repair` with its settings from `cfg`."""
    return REGISTRY.module(cfg.repair).repair(case, **_arguments(cfg))
