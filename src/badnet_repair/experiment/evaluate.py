"""One shared measurement for every stage: clean accuracy and attack success rate."""

import logging
import math
import time
from dataclasses import dataclass

import numpy as np

from badnet_repair import UserError
from badnet_repair.data import Dataset
from badnet_repair.defenses import goodnet
from badnet_repair.experiment import leaderboard
from badnet_repair.network.predict import predict_classes

log = logging.getLogger(__name__)


@dataclass
class Answers:
    """A model's predicted classes on the clean test set and on each poisoned set (or a
    detector's flags on them), kept so that metrics derived from them (the GoodNet's) need
    no new forward pass."""

    clean: np.ndarray
    poisoned: dict[str, np.ndarray]
    seconds: float = 0.0

    def of(self, trigger: str | None) -> np.ndarray:
        """Those on one poisoned set, or on the clean set for None."""
        return self.clean if trigger is None else self.poisoned[trigger]


def classify(model, clean: Dataset, poisoned: dict[str, Dataset], batch_size: int = 512) -> Answers:
    """Predicted classes of `model` on the clean set and each poisoned set."""
    start = time.perf_counter()
    answers = predict_classes(model, clean.x, batch_size)
    on_poisoned = {t: predict_classes(model, ds.x, batch_size) for t, ds in poisoned.items()}
    return Answers(answers, on_poisoned, time.perf_counter() - start)


def stage_metrics(
    answers: Answers, clean: Dataset, poisoned: dict[str, Dataset], stage: str
) -> dict[str, float]:
    """Metrics named as in the MLflow contract: `<stage>/clean_acc`, `<stage>/asr/<trigger>`."""
    metrics = {f"{stage}/clean_acc": float(np.mean(answers.clean == clean.y))}
    for trigger, ds in poisoned.items():
        metrics[f"{stage}/asr/{trigger}"] = float(np.mean(answers.poisoned[trigger] == ds.y))
    n = len(clean) + sum(len(ds) for ds in poisoned.values())
    summary = ", ".join(f"{k.removeprefix(stage + '/')}={v:.4f}" for k, v in metrics.items())
    log.info("%s: %s (%d images, %.1fs)", stage, summary, n, answers.seconds)
    return metrics


def evaluate(
    model, clean: Dataset, poisoned: dict[str, Dataset], stage: str, batch_size: int = 512
) -> dict[str, float]:
    """A stage's contract metrics, measured by running `model` on the data sets."""
    return stage_metrics(classify(model, clean, poisoned, batch_size), clean, poisoned, stage)


ORACLES = ("oracle_clean_acc_under_asr", "oracle_der")  # read the test and poisoned sets


def objective(metrics: dict[str, float], name: str, asr_ceiling: float) -> float:
    """What a hyperparameter search maximises, from a run's metrics.

    - `holdout_acc` (what a defender can measure): the repaired net's accuracy on the
      clean held-out validation images, which no repair trains on. It cannot see the
      backdoor: it favours the mildest repair.
    - `oracle_clean_acc_under_asr`: the repaired net's clean test accuracy when its
      worst ASR is at most `asr_ceiling`; below every feasible value (by the excess ASR)
      otherwise. An oracle: it reads the test and poisoned sets, which no defender has.
    - `oracle_der`: defense effectiveness rating, (max(0, dASR) - max(0, dACC) + 1) / 2,
      with dASR the fall of the worst trigger's ASR and dACC the fall of clean accuracy;
      an oracle likewise.

    A run whose repair declined (no strength within its accuracy budget) has no repaired
    net: -1, below every other run's value.
    """
    if "repaired/clean_acc" not in metrics:
        return -1.0
    if name == "holdout_acc":
        return metrics["repaired/holdout_acc"]
    if name == "oracle_der":
        return leaderboard.der(metrics)
    worst = leaderboard.worst_asr(metrics)
    if worst <= asr_ceiling:
        return metrics["repaired/clean_acc"]
    return -(worst - asr_ceiling)


BLENDS_PER_BATCH = 4096  # images through the network per step, STRIP's blends included


def batch_size_for(model) -> int:
    """A batch that keeps a STRIP GoodNet's k blends per input within memory."""
    return max(1, min(512, BLENDS_PER_BATCH // (1 + goodnet.blends_per_input(model))))


def goodnet_metrics(
    model,
    clean: Dataset,
    poisoned: dict[str, Dataset],
    num_classes: int,
    batch_size: int | None = None,
) -> dict[str, float]:
    """The GoodNet's metrics (see `goodnet_scores`), measured by running the GoodNet."""
    if int(model.output_shape[-1]) != num_classes + 1:
        raise UserError(
            f"goodnet: output of {model.output_shape[-1]} answers, expected {num_classes + 1} "
            f"for {num_classes} classes"
        )
    batch = batch_size or batch_size_for(model)
    blends = goodnet.blends_per_input(model)

    def answers_on(ds: Dataset) -> np.ndarray:
        if blends:  # STRIP: k + 2 forward passes per image, minutes at competition scale
            log.info(
                "goodnet: answering %d images of %s (%d blends each)", len(ds), ds.name, blends
            )
        return predict_classes(model, ds.x, batch)

    answers = Answers(answers_on(clean), {t: answers_on(ds) for t, ds in poisoned.items()})
    return goodnet_scores(answers, clean, poisoned, num_classes)


def auroc(clean_scores: np.ndarray, poisoned_scores: np.ndarray) -> float:
    """The chance that a poisoned input scores above a clean one (ties count half)."""
    ranked = np.sort(clean_scores)
    below = np.searchsorted(ranked, poisoned_scores, side="left")
    at_most = np.searchsorted(ranked, poisoned_scores, side="right")
    return float(np.mean((below + at_most) / 2) / len(ranked))


# Clean-test rejection rates at which detection is also reported (`detection_at`)
OPERATING_RATES = (0.01, 0.05)


def detection_at(clean_scores: np.ndarray, poisoned_scores: np.ndarray, rate: float) -> float:
    """The share of poisoned inputs flagged at the operating point that rejects at most
    `rate` of the clean test inputs: each detector (a column; a 1-d array is one) flags
    above its own (k+1)-th largest clean score, one k for all, the largest k whose union
    of flags stays within `rate`, the way the GoodNet's detectors share one calibration.
    An evaluation figure read off the test set, like AUROC; no detector is set by it."""
    if not len(clean_scores) or not len(poisoned_scores):
        return float("nan")
    clean = np.asarray(clean_scores, np.float64).reshape(len(clean_scores), -1)
    poisoned = np.asarray(poisoned_scores, np.float64).reshape(len(poisoned_scores), -1)
    ordered = -np.sort(-clean, axis=0)  # each column from the largest down

    def flags(scores: np.ndarray, k: int) -> np.ndarray:
        return (scores > ordered[k][None, :]).any(axis=1)

    low, high = 0, len(clean) - 1  # k = 0 flags no clean input (above each largest)
    while low < high:  # the union's clean flags grow with k: the largest k within `rate`
        middle = (low + high + 1) // 2
        if np.mean(flags(clean, middle)) <= rate:
            low = middle
        else:
            high = middle - 1
    return float(np.mean(flags(poisoned, low)))


def rejection_p(rejected: int, m: int, n: int, bound: float) -> float:
    """The chance of `rejected` or more of m new clean inputs flagged, were a threshold set
    on n clean calibration images to keep its promise `bound` exactly: a small p says the
    test images are not like the calibration ones, not bad luck. Flagged above the k-th
    largest of n exchangeable scores (k = bound (n + 1)), a new input is rejected at a
    rate Beta(k, n + 1 - k) over calibration draws, so the count is beta-binomial
    BB(m, k, n + 1 - k): exact for one detector with continuous scores, conservative with
    ties (flagged strictly above), an approximation for detectors calibrated together.
    A bound of 1 or more (fewer images than detectors) promises nothing: p is 1.
    An evaluation figure read off the test set; nothing is set by it."""
    k = max(1, round(bound * (n + 1)))
    if k > n:
        return 1.0
    a, b = k, n + 1 - k
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    def pmf(x: int) -> float:
        chosen = math.lgamma(m + 1) - math.lgamma(x + 1) - math.lgamma(m - x + 1)
        mixed = math.lgamma(x + a) + math.lgamma(m - x + b) - math.lgamma(m + a + b)
        return math.exp(chosen + mixed - log_beta)

    return min(1.0, sum(pmf(x) for x in range(rejected, m + 1)))


def goodnet_scores(
    answers: Answers, clean: Dataset, poisoned: dict[str, Dataset], num_classes: int
) -> dict[str, float]:
    """Clean accuracy (answering N is wrong), clean flag rate, and per poisoned set the ASR
    (answered its label) and the detection rate (answered N), from a GoodNet's answers."""
    metrics = {
        "goodnet/clean_acc": float(np.mean(answers.clean == clean.y)),
        "goodnet/flag_rate_clean": float(np.mean(answers.clean == num_classes)),
    }
    for trigger, ds in poisoned.items():
        on_set = answers.poisoned[trigger]
        metrics[f"goodnet/asr/{trigger}"] = float(np.mean(on_set == ds.y))
        metrics[f"goodnet/detect/{trigger}"] = float(np.mean(on_set == num_classes))
    return metrics


def goodnet_answers(repaired: Answers, num_classes: int, flags: list[Answers]) -> Answers:
    """What a GoodNet answers, from answers already in hand: N where any detector flagged
    the input (`flags`, booleans per detector), else B''s class. The saved GoodNet
    computes the same rule; only float near-ties (of two classes, or of a score and its
    threshold) may be decided otherwise."""

    def rule(trigger: str | None) -> np.ndarray:
        answer = repaired.of(trigger)
        flagged = np.zeros(len(answer), dtype=bool)
        for detector in flags:
            flagged |= detector.of(trigger)
        return np.where(flagged, num_classes, answer)

    return Answers(rule(None), {t: rule(t) for t in repaired.poisoned})
