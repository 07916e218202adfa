"""The accuracy-budget rule: a repair's strength (a learning rate, a perturbation bound,
a pruning share or threshold) set per net from clean data alone, since a value tuned on
one net wrecks another or leaves its backdoor in."""

import logging
from collections.abc import Callable, Sequence
from typing import Any

import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.defenses.repairs import Case
from badnet_repair.network.predict import accuracy

log = logging.getLogger(__name__)


def increasing(ladder: Sequence[float], key: str) -> None:
    """Check a ladder of strengths for `strongest_within`: values > 0, weakest first, no
    value twice (a repeat would train the same run again)."""
    steps = zip(ladder, list(ladder)[1:], strict=False)
    if not ladder or any(v <= 0 for v in ladder) or any(b <= a for a, b in steps):
        raise UserError(
            f"config key {key}={list(ladder)}: expected values > 0, strictly increasing"
        )


def shown(ladder: Sequence[float]) -> str:
    """A ladder in a run's name: `0.01/0.02/0.05`."""
    return "/".join(f"{value:g}" for value in ladder)


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
    case.journal.log({f"{name}/{key}": chosen})
    case.journal.note(**{f"{name}_ladder": {f"{v:g}": acc for v, acc in held.items()}})
    return chosen, trained[chosen]
