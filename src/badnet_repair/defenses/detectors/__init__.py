"""Detectors: what makes the GoodNet answer N ("triggered"), one module each, chosen with
`goodnet.detector=NAME` or a list, `goodnet.detector=[strip,disagreement]` (flagged by
any; `both` is that list).

A detector is the module `badnet_repair/defenses/detectors/NAME.py`, defining
- `check(badnet, settings, clean, batch_size)`: refuse, before any work, what it cannot
  handle (a net it cannot run, too little clean data for its threshold);
- `fit(context) -> Fitted`: everything it learns, from the defender's clean data only.
A fitted detector has a score per input (higher: more suspicious) and a conformal
threshold (`calibrate`) set on clean images it has not learned from, so that it rejects
at most its share of `goodnet.frr` of new clean inputs in expectation. It also builds
its flag from standard Keras layers inside the GoodNet (`goodnet.Graph`).

The GoodNet flags an input when any of its detectors does, so the detectors split
`goodnet.frr` evenly (Bonferroni): with m of them, each is calibrated at frr / m, and
the union rejects at most frr of clean inputs in expectation.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.registry import Registry

log = logging.getLogger(__name__)
REGISTRY = Registry(__name__, __path__)
ALIASES = {"both": ["disagreement", "strip"]}


@dataclass
class Inputs:
    """Images the detectors judge, with the BadNet's and the repaired net's classes on
    them (already in hand: a detector that reads classes runs no net for them)."""

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
    repair_steps: tuple[str, ...] = ()  # the run's repair, or a chain's steps
    ft_sam: Any = None  # FT-SAM's settings, for a BaDExpert auxiliary of its own


@dataclass
class Fitted:
    """A detector ready to judge: its `score`, `threshold` and flag layers."""

    name: str
    flag_layer: Callable[[Any], Any]  # goodnet.Graph -> flag tensor (batch, 1), 1 = flagged
    score: Callable[[Inputs], np.ndarray]
    threshold: float
    metrics: dict[str, float] = field(default_factory=dict)  # logged as goodnet/NAME/...
    parts: dict[str, Any] = field(default_factory=dict)  # what it learned (STRIP's overlays)

    def judge(self, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
        """Its scores on `inputs` and which of them it flags."""
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


def frr_each(settings: Any) -> float:
    """Each detector's share of `goodnet.frr` (Bonferroni over the chosen detectors)."""
    return settings.frr / len(parse(settings.detector))


@dataclass
class Calibration:
    """A conformal threshold: flagging scores above `threshold` rejects at most `bound`
    of new clean inputs in expectation, for inputs exchangeable with the `size` clean
    calibration images (split conformal: `bound` = 1 - rank / (size + 1))."""

    threshold: float
    size: int
    bound: float

    def metrics(self) -> dict[str, float]:
        return {"calibration_images": float(self.size), "frr_bound": self.bound}


def calibrate(clean_scores: np.ndarray, frr: float, who: str) -> Calibration:
    """The smallest threshold whose expected false rejection on new clean inputs is at
    most `frr`: the rank ceil((n + 1)(1 - frr)) score of the n clean `clean_scores`
    (a sample quantile would promise `frr` and keep about frr + 1/n). With fewer than
    1/frr - 1 scores no rank keeps the promise: the largest score is used, which
    promises 1/(n + 1), and a warning says so."""
    ranked = np.sort(np.asarray(clean_scores, np.float64))
    n = len(ranked)
    rank = int(np.ceil((n + 1) * (1.0 - frr) - 1e-9))
    if rank > n:
        log.warning(
            "%s: %d clean calibration images support a false-rejection rate of %.4f at "
            "best, not the %.4f asked; using that (more clean validation data, or a larger "
            "data.holdout, would do)",
            who,
            n,
            1.0 / (n + 1),
            frr,
        )
        rank = n
    bound = 1.0 - rank / (n + 1)
    log.info(
        "%s: threshold at rank %d of %d clean scores, false rejection <= %.4f", who, rank, n, bound
    )
    return Calibration(float(ranked[rank - 1]), n, bound)
