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

A chain (`repair=[fine_pruning,ft_sam]`) runs repairs in turn, each from the previous
one's net, through the same interface: each step gets a `Case` of its own (`Case.step`).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import tf_keras as keras
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from badnet_repair import UserError
from badnet_repair.data import Dataset
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.journal import Journal
from badnet_repair.network import training
from badnet_repair.network.predict import correct
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
    original: keras.Model | None = None  # a chain's later step: the BadNet it began from

    def shared(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` once per BadNet and data in this process: the points of a sweep
        over one BadNet share it. `key` names everything else it depends on."""
        return self.memo.shared(key, compute)

    def input_holdout_correct(self) -> np.ndarray:
        """Per clean held-out image, whether the net this case repairs gets it right (the
        BadNet; in a chain's later step, the previous step's net)."""
        if self.original is None:
            return self.badnet_holdout_correct()
        return self.shared(
            "input holdout correct",
            lambda: correct(self.badnet, self.clean.holdout, self.batch_size),
        )

    def badnet_holdout_correct(self) -> np.ndarray:
        """Per clean held-out image, whether the BadNet gets it right: what budgets count
        from. In a chain, the original BadNet's, so that the steps' losses never add up
        past a budget."""
        first = self.badnet if self.original is None else self.original
        return self.shared(
            "badnet holdout correct", lambda: correct(first, self.clean.holdout, self.batch_size)
        )

    def badnet_holdout_accuracy(self) -> float:
        """The BadNet's accuracy on the clean held-out images (the original's in a chain)."""
        return float(np.mean(self.badnet_holdout_correct()))

    def step(self, name: str, model: keras.Model) -> "Case":
        """The case of chain step `name`, which repairs `model` (the previous step's net,
        or this case's BadNet): names it logs and hands back go under `name/`, budgets
        still count from this case's BadNet, and a later step gets a memo of its own (the
        memo caches what was computed on the BadNet)."""
        first = model is self.badnet
        return Case(
            model,
            self.layer,
            self.clean,
            self.journal.prefixed(f"{name}/"),
            self.seed,
            self.batch_size,
            self.memo if first else Memo(),
            original=None if first else self.badnet,
        )

    def stage(self, name: str, model: keras.Model) -> None:
        """Hand back an intermediate net to be scored as stage `name` (a copy is kept)."""
        from badnet_repair.network.pruning import copy_model

        self.handed.append(Stage(self.journal.prefix + name, copy_model(model)))

    def series(self, series: Series) -> None:
        """Hand back a series of nets to be scored (see `Series`)."""
        prefix = self.journal.prefix
        self.handed.append(
            replace(
                series,
                name=prefix + series.name,
                stage=prefix + series.stage,
                figure=prefix + series.figure,
            )
        )

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


def steps(cfg: DictConfig) -> list[str]:
    """The repairs chosen, in order: one, or a chain's steps. Hydra's list selection
    (`repair=[a,b]`) merges the repairs' files, which leaves `repair` the last one's name;
    each repair's schema records its name under `chain`, in the order chosen, until
    `experiment.config.settle` writes the list into `repair`."""
    if isinstance(cfg.repair, ListConfig | list):
        return [str(name) for name in cfg.repair]
    return [str(name) for name in cfg.get("chain") or [cfg.repair]]


def label(cfg: DictConfig) -> str:
    """The chosen repair's name, or a chain's steps joined: `fine_pruning+ft_sam`."""
    return "+".join(steps(cfg))


def check_chain(chosen: list[str]) -> None:
    """A chain names known repairs, each once, and steps that read one section read it
    with one schema (they share its values)."""
    shown = f"repair=[{','.join(chosen)}]"
    unknown = [name for name in chosen if name not in names()]
    if unknown:
        raise UserError(
            f"config key {shown}: no repair {', '.join(unknown)}; expected names among "
            f"{', '.join(names())}"
        )
    repeated = sorted({name for name in chosen if chosen.count(name) > 1})
    if repeated:
        raise UserError(
            f"config key {shown}: {', '.join(repeated)} more than once; a chain runs each "
            "repair once"
        )
    read: dict[str, tuple[str, type]] = {}
    for name in chosen:
        for spec in fields(settings(name)):
            first, schema = read.setdefault(spec.name, (name, spec.type))
            if spec.name != "repair" and schema is not spec.type:
                raise UserError(
                    f"config key {shown}: {first} and {name} read different keys under "
                    f"{spec.name}; they cannot be chained"
                )


def unread(cfg: DictConfig) -> list[str]:
    """Other repairs' sections present in `cfg` (forced in with `++` for a sweep over
    repairs): the chosen repair ignores them."""
    mine = {s for name in steps(cfg) for s in sections(name)}
    return sorted({s for name in names() for s in sections(name) if s in cfg and s not in mine})


def _arguments(cfg: DictConfig, name: str) -> dict[str, Any]:
    return {section: OmegaConf.to_object(cfg[section]) for section in sections(name)}


def describe(cfg: DictConfig) -> str:
    """The chosen repair and its settings in a few words: `fine_pruning (sparsity 0.5, ...)`,
    a chain's steps joined by ` + `."""
    return " + ".join(
        f"{name} ({REGISTRY.module(name).describe(**_arguments(cfg, name))})" for name in steps(cfg)
    )


def run(cfg: DictConfig, case: Case) -> tuple[list[Case], keras.Model]:
    """Carry out the chosen repair, or a chain's steps in turn, each from the previous
    one's net, each from the same RNG state; return each step's case (what it handed
    back, under `name/` in a chain, with every step's output but the last's as stage
    `name/repaired`) and the repaired net."""
    chosen = steps(cfg)
    if len(chosen) == 1:
        return [case], REGISTRY.module(chosen[0]).repair(case, **_arguments(cfg, chosen[0]))
    cases, model = [], case.badnet
    for name in chosen:
        if cases:
            cases[-1].stage("repaired", model)
        cases.append(case.step(name, model))
        training.seed_everything(case.seed)
        model = REGISTRY.module(name).repair(cases[-1], **_arguments(cfg, name))
    return cases, model
