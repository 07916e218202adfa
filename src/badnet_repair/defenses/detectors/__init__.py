"""Detectors: what makes the GoodNet answer N ("triggered"), one module each, chosen with
`goodnet.detector=NAME` or a list, `goodnet.detector=[strip,disagreement]` (flagged by
any; `both` is that list).

A detector is the module `badnet_repair/defenses/detectors/NAME.py`, defining
- `check(badnet, settings, clean, batch_size)`: refuse, before any work, what it cannot
  handle (a net it cannot run, too little clean data for its threshold);
- `fit(context) -> Scored`: everything it learns, from the defender's clean data only,
  with its scores (higher: more suspicious) on the clean images it did not learn from,
  and how it flags once given a threshold (its flag built from standard Keras layers
  inside the GoodNet, `goodnet.Graph`).

The GoodNet flags an input when any of its detectors does. `fit` sets the chosen
detectors' thresholds together (`calibrate`, conformal), on the clean images all of
them may be calibrated on, so that the GoodNet as a whole rejects at most `goodnet.frr`
of new clean inputs in expectation.
"""

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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
    """A detector ready to judge: its `score`, `threshold` and flag layers (what its
    `Scored.place` returns; `fit` adds the name and the calibration scores)."""

    flag_layer: Callable[[Any], Any]  # goodnet.Graph -> flag tensor (batch, 1), 1 = flagged
    score: Callable[[Inputs], np.ndarray]
    threshold: float
    metrics: dict[str, float] = field(default_factory=dict)  # logged as goodnet/NAME/...
    parts: dict[str, Any] = field(default_factory=dict)  # what it learned (STRIP's overlays)
    name: str = ""
    calibration_scores: np.ndarray = field(default_factory=lambda: np.empty(0))  # Scored's

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


@dataclass
class Scored:
    """A fitted detector before its threshold: its scores on the clean images it may be
    calibrated on (none that it learned from), and `place`, which gives the detector
    flagging scores above a threshold."""

    name: str
    clean_x: np.ndarray
    clean_scores: np.ndarray
    place: Callable[[float], Fitted]


def fit(names: list[str], context: Context) -> list[Fitted]:
    """The detectors `names`, each fitted on clean data, then calibrated together on the
    clean images all of them may be calibrated on, so that the GoodNet, which flags an
    input when any of them does, rejects at most `goodnet.frr` of new clean inputs in
    expectation (`calibrate`)."""
    scored = [module(name).fit(context) for name in names]
    calibration = calibrate(common_scores(scored), context.settings.frr, " + ".join(names))
    fitted = []
    for detector, threshold in zip(scored, calibration.thresholds, strict=True):
        placed = detector.place(threshold)
        placed.metrics.update(calibration.metrics())
        fitted.append(replace(placed, name=detector.name, calibration_scores=detector.clean_scores))
    return fitted


def _image_keys(x: np.ndarray) -> list[tuple[bytes, int]]:
    """Each image's content digest, with its occurrence number among equal images."""
    seen: dict[bytes, int] = {}
    keys = []
    for image in x:
        digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()
        keys.append((digest, seen.get(digest, 0)))
        seen[digest] = keys[-1][1] + 1
    return keys


def common_scores(scored: list[Scored]) -> np.ndarray:
    """(n, m): the m detectors' scores on the n clean images every one of them may be
    calibrated on (the held-out split for those that learn from the training split).
    Detectors scored on the very same images (one array) are taken as they are; others
    are matched image by image, by content."""
    if all(d.clean_x is scored[0].clean_x for d in scored):
        return np.stack([np.asarray(d.clean_scores, np.float64) for d in scored], axis=1)
    by_image = [dict(zip(_image_keys(d.clean_x), d.clean_scores, strict=True)) for d in scored]
    shared = [key for key in by_image[0] if all(key in other for other in by_image[1:])]
    rows = [[scores[key] for scores in by_image] for key in shared]
    return np.asarray(rows, np.float64).reshape(len(shared), len(scored))


@dataclass
class Calibration:
    """Conformal thresholds, one per detector: flagging an input when any detector's score
    is above its threshold rejects at most `bound` of new clean inputs in expectation, for
    inputs exchangeable with the `size` clean calibration images."""

    thresholds: list[float]
    size: int
    bound: float

    def metrics(self) -> dict[str, float]:
        return {"calibration_images": float(self.size), "frr_bound": self.bound}


def calibrate(scores: np.ndarray, frr: float, who: str) -> Calibration:
    """Thresholds for m detectors at once from their scores (n, m) on n clean images (a
    1-d array: one detector), flagged by any, promising at most `frr` false rejection.

    The rule is the minimum of the detectors' conformal p-values, calibrated jointly
    (rather than each detector at frr / m, which is as strict as if they never flagged
    the same clean image, while ours mostly flag the same ones: B's errors). Every
    detector flags above its k-th largest calibration score, one k for all, the largest
    k for which 1 + N(k) <= frr (n + 1), where N(k) bounds how many calibration images
    rank among the top k of some detector once the new input is ranked with them. A
    flagged input's full-conformal p-value (its best rank across detectors, among the
    n + 1 images, a symmetric score) is then at most frr, so a new clean input, which is
    exchangeable with the calibration images, is flagged with probability at most
    `bound` = floor(frr (n + 1)) / (n + 1). With one detector this is split conformal,
    the rank ceil((n + 1)(1 - frr)) score from the bottom. Where even k = 1 breaks the
    promise (fewer than about m / frr - 1 images), the largest scores are used, which
    promise m / (n + 1), and a warning says so.
    """
    s = np.asarray(scores, np.float64)
    s = s[:, None] if s.ndim == 1 else s
    n, m = s.shape
    if n == 0:
        raise UserError(f"{who}: no clean image that every detector may be calibrated on")
    # ranks[i, j]: how many calibration scores of detector j are >= image i's (1 = top)
    ranks = np.stack(
        [n - np.searchsorted(np.sort(s[:, j]), s[:, j], side="left") for j in range(m)], axis=1
    )
    ks = np.arange(n + 1)
    counted = np.zeros(n + 1)
    for j in range(m):  # the new input tops detector j: its k-th image drops to rank k + 1
        others = np.delete(ranks, j, axis=1).min(axis=1) if m > 1 else np.full(n, n + 1)
        effective = np.sort(np.minimum(ranks[:, j] + 1, others))
        counted = np.maximum(counted, np.searchsorted(effective, ks, side="right"))
    kept = np.flatnonzero(1 + counted[1:] <= frr * (n + 1) + 1e-9) + 1
    k = int(kept.max()) if len(kept) else 1
    bound = (np.floor(frr * (n + 1) + 1e-9) if len(kept) else m) / (n + 1)
    if not len(kept):
        log.warning(
            "%s: %d clean calibration images support a false-rejection rate of %.4f at "
            "best, not the %.4f asked; using that (more clean validation data, or a larger "
            "data.holdout, would do)",
            who,
            n,
            bound,
            frr,
        )
    log.info(
        "%s: thresholds at the rank %d of %d clean scores (from the top), false rejection <= %.4f",
        who,
        k,
        n,
        bound,
    )
    thresholds = -np.sort(-s, axis=0)[k - 1]
    return Calibration([float(t) for t in thresholds], n, float(bound))
