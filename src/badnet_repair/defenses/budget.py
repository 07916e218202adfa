"""The accuracy-budget rule: a repair's strength (a learning rate, a perturbation bound,
a pruning share or threshold) set per net from clean data alone, since a value tuned on
one net wrecks another or leaves its backdoor in."""

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.defenses.repairs import Case
from badnet_repair.network.predict import correct

log = logging.getLogger(__name__)

HALVINGS = 5  # below a ladder's weakest rung: at most this many halvings (down to 1/32 of it)


class NoneWithinBudget(Exception):
    """No strength a repair tried kept the clean held-out accuracy within its budget: the
    repair declines rather than hand back a wreck (the run says so and saves no net)."""


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


def rung(value: float) -> str:
    """A ladder value in a metric's name (`ft_sam/lr_0.01/loss`); MLflow refuses the `+`
    of `1e+06`."""
    return f"{value:g}".replace("+", "")


def strongest_within(
    case: Case,
    candidates: Sequence[Any],
    holdout_correct: Callable[[Any], np.ndarray],
    max_acc_drop: float,
    margin_se: float,
    what: str,
) -> Any:
    """The rule that sets a repair's strength from clean data alone: try `candidates`
    from weakest to strongest and keep the strongest whose clean held-out images
    (`holdout_correct`: right or wrong, per image) stay within `max_acc_drop` of the
    BadNet's with `margin_se` standard errors to spare (`within_budget`), stopping at the
    first that falls out. Raises `NoneWithinBudget` when even the weakest falls out. Each
    trial is logged as `what`."""
    chosen = None
    for candidate in candidates:
        right = holdout_correct(candidate)
        if not within_budget(case, right, max_acc_drop, margin_se, what, candidate):
            break
        chosen = (candidate,)
    if chosen is None:
        raise NoneWithinBudget(
            f"{what}: no value tried keeps the clean held-out accuracy within "
            f"{max_acc_drop:g} of the BadNet's {_floor(case, max_acc_drop, margin_se)}"
        )
    return chosen[0]


def within_budget(
    case: Case,
    correct: np.ndarray,
    max_acc_drop: float,
    margin_se: float,
    what: str,
    candidate: Any,
) -> bool:
    """Whether a net right on the held-out images `correct` costs at most `max_acc_drop`
    of the BadNet's accuracy, counting the sampling error of a hundred images: its
    measured drop plus `margin_se` standard errors of that drop must be within budget.
    The drop is paired (the same images for both nets): of n images, `lost` that only
    the BadNet gets right and `gained` that only this net does; drop (lost - gained) / n,
    its standard error sqrt(lost + gained) / n (McNemar's)."""
    reference = case.badnet_holdout_correct()
    n = len(reference)
    lost = int(np.sum(reference & ~correct))
    gained = int(np.sum(~reference & correct))
    drop = (lost - gained) / n
    margin = margin_se * np.sqrt(lost + gained) / n
    within = bool(drop + margin <= max_acc_drop + 1e-12)
    log.info(
        "%s %s: held-out clean accuracy %.4f, the BadNet's %.4f (of %d images %d lost, %d "
        "gained: drop %.4f + margin %.4f %s %g)",
        what,
        candidate,
        float(np.mean(correct)),
        float(np.mean(reference)),
        n,
        lost,
        gained,
        drop,
        margin,
        "within the budget" if within else "over the budget",
        max_acc_drop,
    )
    return within


def _floor(case: Case, max_acc_drop: float, margin_se: float) -> str:
    """What the budget counted from, for a message: the floor on held-out accuracy, which
    the margin raises (a net must clear it by `margin_se` standard errors of its drop)."""
    floor = case.badnet_holdout_accuracy() - max_acc_drop
    if not margin_se:
        return f"(floor {floor:.4f})"
    return f"(floor {floor:.4f}, raised by {margin_se:g} standard errors of the drop)"


def strongest_run(
    case: Case,
    name: str,
    key: str,
    ladder: Sequence[float],
    train: Callable[[float], keras.Model],
    max_acc_drop: float,
    margin_se: float,
) -> tuple[float, keras.Model]:
    """`strongest_within` over whole runs: `train(value)` trains a model from the BadNet at
    each value of the `ladder` (weakest first) until one's clean held-out accuracy falls
    out of the budget; returns the strongest value within it and its model. When even the
    weakest rung falls out, the ladder goes on downward, halving, for at most `HALVINGS`
    rungs (a setting tuned on one net wrecks another), and raises `NoneWithinBudget` if
    none holds. Logs the value as `name/key` and every run's held-out accuracy as the note
    `name_ladder`."""
    trained: dict[float, keras.Model] = {}
    held: dict[float, float] = {}

    def run(value: float) -> np.ndarray:
        trained[value] = train(value)
        right = correct(trained[value], case.clean.holdout, case.batch_size)
        held[value] = float(np.mean(right))
        return right

    what = f"{name} {key}"
    try:
        try:
            chosen = strongest_within(case, ladder, run, max_acc_drop, margin_se, what)
        except NoneWithinBudget:
            below = [ladder[0] / 2**i for i in range(1, HALVINGS + 1)]
            log.warning("%s: the weakest rung, %g, is out of budget; halving", what, ladder[0])
            chosen = _first_within(case, below, run, max_acc_drop, margin_se, what)
    finally:
        case.journal.note(**{f"{name}_ladder": {f"{v:g}": acc for v, acc in held.items()}})
    case.journal.log({f"{name}/{key}": chosen})
    return chosen, trained[chosen]


def _first_within(
    case: Case,
    weaker: Sequence[float],
    holdout_correct: Callable[[float], np.ndarray],
    max_acc_drop: float,
    margin_se: float,
    what: str,
) -> float:
    """The first of `weaker` (strongest first) within the budget."""
    for value in weaker:
        if within_budget(case, holdout_correct(value), max_acc_drop, margin_se, what, value):
            return value
    raise NoneWithinBudget(
        f"{what}: no value down to {weaker[-1]:g} keeps the clean held-out accuracy within "
        f"{max_acc_drop:g} of the BadNet's {_floor(case, max_acc_drop, margin_se)}"
    )
