"""Detectors: what makes the GoodNet answer N ("triggered"), one module each, chosen with
`goodnet.detector=NAME` or a list, `goodnet.detector=[strip,disagreement]` (flagged by
any; `both` is that list).

A detector is the module `badnet_repair/defenses/detectors/NAME.py`, defining
- `check(badnet, settings, clean, batch_size)`: refuse, before any work, what it cannot
  handle (a net it cannot run, too little clean data for its threshold);
- `fit(context) -> Fitted`: everything it learns, from the defender's clean data only.
A fitted detector has a score per input (higher: more suspicious) and a threshold set
by `threshold_at` on clean images it has not learned from, for a false-rejection rate
`goodnet.frr`; or, for a rule with no score (disagreement), the rule itself. It also
builds its flag from standard Keras layers inside the GoodNet (`goodnet.Graph`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.registry import Registry

REGISTRY = Registry(__name__, __path__)
ALIASES = {"both": ["disagreement", "strip"]}


@dataclass
class Inputs:
    """Images the detectors judge, with the BadNet's and the repaired net's classes on
    them (already in hand, so a rule on classes costs no forward pass)."""

    name: str
    x: np.ndarray
    badnet: np.ndarray
    repaired: np.ndarray


@dataclass
class Context:
    """What a detector may learn from: the two nets and the defender's clean data."""

    badnet: keras.Model
    repaired: keras.Model
    clean: CleanData
    settings: Any  # the goodnet.* section
    seed: int
    batch_size: int
    memo: Memo  # shared by every run over the same BadNet and data in this process


@dataclass
class Fitted:
    """A detector ready to judge: `score` and `threshold`, or a `rule`; its flag layers."""

    name: str
    flag_layer: Callable[[Any], Any]  # goodnet.Graph -> flag tensor (batch, 1), 1 = flagged
    score: Callable[[Inputs], np.ndarray] | None = None
    threshold: float | None = None
    rule: Callable[[Inputs], np.ndarray] | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # logged as goodnet/NAME/...
    parts: dict[str, Any] = field(default_factory=dict)  # what it learned (STRIP's overlays)

    def judge(self, inputs: Inputs) -> tuple[np.ndarray | None, np.ndarray]:
        """Its scores on `inputs` (None for a rule) and which of them it flags."""
        if self.score is None:
            return None, np.asarray(self.rule(inputs), dtype=bool)
        scores = self.score(inputs)
        return scores, scores > self.threshold

    def flags(self, inputs: Inputs) -> np.ndarray:
        return self.judge(inputs)[1]


def names() -> list[str]:
    """Every detector, by module name."""
    return REGISTRY.names()


def module(name: str) -> ModuleType:
    return REGISTRY.module(name)


def parse(value: Any) -> list[str]:
    """`goodnet.detector` as a list of detector names: a name, an alias, or a list."""
    given = [value] if isinstance(value, str) else list(value)
    chosen = [name for item in given for name in ALIASES.get(str(item), [str(item)])]
    unknown = [name for name in chosen if name not in names()]
    if unknown or not chosen:
        raise UserError(
            f"config key goodnet.detector={value!r}: expected one of "
            f"{', '.join([*names(), *ALIASES])}, or a list of them"
        )
    return list(dict.fromkeys(chosen))


def check(badnet: keras.Model, settings: Any, clean: CleanData, batch_size: int) -> None:
    """Every chosen detector's check, before any work."""
    for name in parse(settings.detector):
        module(name).check(badnet, settings, clean, batch_size)


def fit(name: str, context: Context) -> Fitted:
    return module(name).fit(context)


def threshold_at(clean_scores: np.ndarray, frr: float) -> float:
    """The score above which a share `frr` of these clean images lies: flagging scores
    above it rejects about `frr` of clean inputs."""
    return float(np.quantile(clean_scores, 1.0 - frr))
