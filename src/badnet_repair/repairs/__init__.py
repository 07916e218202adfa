"""Repairs: one module per repair behind one interface, chosen with `repair=NAME`.

A repair is the module `badnet_repair/repairs/NAME.py` and the config
`conf/repair/NAME.yaml`; nothing else names it. The module defines:

- `Settings`, a `RepairSettings` dataclass whose fields are the config sections the
  repair reads (`prune`, `finetune`, ...), each a dataclass of typed keys (ranges
  with `config.ranged`, anything else in an optional `check` method);
- `repair(case, **sections) -> keras.Model`, one parameter per section: the repaired
  net as a plain tf_keras model, the BadNet itself left untouched;
- `describe(**sections) -> str`: its settings in a few words, for run names and titles.

A repair sees the BadNet and the defender's clean validation data (`case.clean`);
every choice it makes reads that data only. It records what it measured through
`case.report`, which can also score an intermediate model on the evaluation sets
that the repair itself never sees.
"""

import importlib
import logging
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from types import ModuleType
from typing import Any

import tf_keras as keras
from omegaconf import MISSING, DictConfig, OmegaConf

from badnet_repair import UserError, loops, training
from badnet_repair.data import Dataset
from badnet_repair.evaluate import accuracy
from badnet_repair.report import Report

log = logging.getLogger(__name__)


@dataclass
class RepairSettings:
    """The base of every repair's `Settings`: `repair` is the repair's name."""

    repair: str = MISSING


@dataclass
class CleanData:
    """The defender's clean validation images: whole, and split into `train` (to learn
    from) and `holdout` (to choose with: how much, how strong, when to stop)."""

    validation: Dataset
    train: Dataset
    holdout: Dataset


class Memo(dict):
    """What every run over one BadNet and its data shares in this process (a sweep's
    points): each value computed once, by whichever run needs it first."""

    def shared(self, key: Any, compute: Callable[[], Any]) -> Any:
        """`compute()` once; `key` names everything else it depends on."""
        if key not in self:
            self[key] = compute()
        return self[key]


@dataclass
class Case:
    """What a repair works on and where it records what it measured."""

    badnet: keras.Model
    layer: str  # model.layer: the layer that single-layer repairs work on
    clean: CleanData
    report: Report
    seed: int
    batch_size: int  # for forward passes (eval_batch_size)
    memo: Memo = field(default_factory=Memo)

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
    ) -> int:
        """`loops.run_steps` of a custom training `step` on the clean training split, each
        round's loss and held-out accuracy reported as `name/...`."""
        return loops.run_steps(
            name,
            model,
            self.clean.train,
            self.clean.holdout,
            steps=steps,
            batch_size=batch_size,
            seed=self.seed + seed_offset,
            step=step,
            on_round=self.report.step,
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
            on_epoch=self.report.step,
            name=f"finetune/{series}" if series else "finetune",
        )


def names() -> list[str]:
    """Every repair, by module name."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def module(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def settings(name: str) -> type:
    return module(name).Settings


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
    return f"{cfg.repair} ({module(cfg.repair).describe(**_arguments(cfg))})"


def run(cfg: DictConfig, case: Case) -> keras.Model:
    """Carry out the repair `cfg.repair` with its settings from `cfg`."""
    return module(cfg.repair).repair(case, **_arguments(cfg))


def increasing(ladder: Sequence[float], key: str) -> None:
    """Check a ladder of strengths for `strongest_within`: values > 0, weakest first."""
    if not ladder or any(v <= 0 for v in ladder) or sorted(ladder) != list(ladder):
        raise UserError(f"config key {key}={list(ladder)}: expected values > 0, increasing")


def strongest_within(
    case: Case,
    candidates: Sequence[Any],
    holdout_accuracy: Callable[[Any], float],
    max_acc_drop: float,
    what: str,
) -> Any:
    """The rule that sets a repair's strength from clean data alone: try `candidates`
    from weakest to strongest and keep the strongest whose accuracy on the clean held-out
    images stays within `max_acc_drop` of the BadNet's, stopping at the first that falls
    below (the weakest when none stays within). Each trial is logged as `what`."""
    floor = case.badnet_holdout_accuracy() - max_acc_drop
    chosen = candidates[0]
    for candidate in candidates:
        acc = holdout_accuracy(candidate)
        within = acc >= floor - 1e-12
        log.info(
            "%s %s: held-out clean accuracy %.4f (%s %.4f)",
            what,
            candidate,
            acc,
            "within the budget, floor" if within else "below the floor",
            floor,
        )
        if not within:
            if candidate is candidates[0]:
                log.warning("%s: none within the budget; the weakest, %s, is kept", what, chosen)
            break
        chosen = candidate
    return chosen


def strongest_run(
    case: Case,
    name: str,
    key: str,
    ladder: Sequence[float],
    train: Callable[[float], keras.Model],
    max_acc_drop: float,
) -> tuple[float, keras.Model]:
    """`strongest_within` over whole runs: `train(value)` trains a model from the BadNet at
    each value of the `ladder` (weakest first) until one's clean held-out accuracy falls
    out of the budget; returns the strongest value within it and its model. Logs the value as
    `name/key` and every run's held-out accuracy as the note `name_ladder`."""
    trained: dict[float, keras.Model] = {}
    held: dict[float, float] = {}

    def run(value: float) -> float:
        trained[value] = train(value)
        held[value] = accuracy(trained[value], case.clean.holdout, case.batch_size)
        return held[value]

    chosen = strongest_within(case, ladder, run, max_acc_drop, f"{name} {key}")
    case.report.log({f"{name}/{key}": chosen})
    case.report.note(**{f"{name}_ladder": {f"{v:g}": acc for v, acc in held.items()}})
    return chosen, trained[chosen]
