"""Fine-pruning (Liu, Dolan-Gavitt, Garg 2018): zero the channels of `model.layer` that
clean images leave least active (a backdoor tends to hide in them), then fine-tune on
clean data with those channels held at zero.

Every run traces the pruning curve, accuracy after removing k = 0..C channels in
activation order, in about four forward passes (see `curve`): on the clean validation
data it chooses k (`prune.max_acc_drop`, the paper's stopping rule); on the evaluation
sets the experiment scores it for the record (`curve/*`, `curve.png`) and reads the
`pruned` stage off it.
"""

from dataclasses import dataclass

from omegaconf import MISSING

from badnet_repair import UserError
from badnet_repair.defenses.repairs import Case, RepairSettings, Series
from badnet_repair.network.curve import PruningCurve, channels_within
from badnet_repair.network.predict import accuracy
from badnet_repair.network.pruning import activation_prune, channel_count, rank_channels
from badnet_repair.network.training import Finetune
from badnet_repair.ranges import ranged


@dataclass
class Prune:
    """prune.*: `max_acc_drop`, the paper's stopping rule (the default): remove channels
    in order until clean validation accuracy would first fall more than that below the
    BadNet's; or, when set, `sparsity`: exactly that share of the layer's channels."""

    sparsity: float | None = ranged(MISSING, "[0, 1)")
    max_acc_drop: float | None = ranged(MISSING, "[0, 1)")

    def check(self) -> None:
        if self.sparsity is None and self.max_acc_drop is None:
            raise UserError("config keys prune.sparsity and prune.max_acc_drop: set one")


@dataclass
class Settings(RepairSettings):
    prune: Prune = MISSING
    finetune: Finetune = MISSING


def describe(prune: Prune, finetune: Finetune) -> str:
    if prune.sparsity is not None:
        amount = f"sparsity {prune.sparsity:g}"
    else:
        amount = f"max_acc_drop {prune.max_acc_drop:g}"
    return f"{amount}, {finetune.epochs} epochs"


def repair(case: Case, prune: Prune, finetune: Finetune):
    badnet, layer, clean = case.badnet, case.layer, case.clean
    order = case.shared(
        "activation order",
        lambda: rank_channels(badnet, layer, clean.validation.x, case.batch_size),
    )
    curve = case.shared(
        "pruning curve", lambda: PruningCurve(badnet, layer, order, case.batch_size)
    )
    val_acc = case.shared("pruning curve on validation", lambda: curve.on(clean.validation))
    case.journal.curves({"curve/val_acc": val_acc})
    if prune.sparsity is not None:
        k = channel_count(prune.sparsity, len(order))
        rule = f"sparsity {prune.sparsity:g}"
    else:
        start = None  # in a chain's later step, the budget counts from the original BadNet
        if case.original is not None:
            start = accuracy(case.original, clean.validation, case.batch_size)
        k = channels_within(val_acc, prune.max_acc_drop, start)
        rule = f"validation accuracy within {100 * prune.max_acc_drop:g} points"
    pruned = activation_prune(badnet, layer, order, k)
    case.journal.log({"prune/channels_pruned": k, "prune/sparsity": pruned.sparsity})
    case.journal.note(layer=layer, pruned_channels=pruned.channels_pruned)
    case.series(
        Series(
            name="curve",
            accuracy_on=curve.on,
            own={"val_acc": val_acc},
            stage="pruned",
            at=k,
            how=f"from the pruning curve, {k} channels removed",
            title=f"pruning curve of {layer}: {k} of {len(order)} channels ({rule})",
            figure="curve.png",
            key="pruning curve",
        )
    )
    case.finetune(pruned.model, finetune, pruned)
    return pruned.model
