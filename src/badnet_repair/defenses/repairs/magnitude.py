"""Magnitude pruning, the seed project's method: tensorflow-model-optimization's
`prune_low_magnitude` zeroes the smallest weights of every prunable layer and keeps
doing so while the net fine-tunes on clean data.

How much: by default the accuracy-budget rule, since a fixed share that suits one net
wrecks another (0.8 left a 32x32 BatchNorm net at 10% after one epoch): the sparsities
`prune.sparsities` are tried from the smallest, each pruned and fine-tuned from the
BadNet, and the largest whose clean held-out accuracy stays within `prune.max_acc_drop`
of the BadNet's is kept. An explicit `prune.sparsity` means exactly that share.
"""

from dataclasses import dataclass

from omegaconf import MISSING

from badnet_repair import UserError
from badnet_repair.defenses.budget import increasing, rung, strongest_run
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network.pruning import magnitude_prune
from badnet_repair.network.training import Finetune
from badnet_repair.ranges import ranged


@dataclass
class Prune:
    """prune.*: `sparsity`, the share of every kernel's weights zeroed, if set; else the
    largest of `sparsities` within `max_acc_drop`."""

    sparsity: float | None = ranged(MISSING, "[0, 1)")
    sparsities: list[float] = MISSING
    max_acc_drop: float = ranged(MISSING, "[0, 1)")
    margin_se: float = ranged(MISSING, ">= 0")

    def check(self) -> None:
        increasing(self.sparsities, "prune.sparsities")
        if any(s >= 1 for s in self.sparsities):
            raise UserError(f"config key prune.sparsities={self.sparsities}: expected < 1")


@dataclass
class Settings(RepairSettings):
    prune: Prune = MISSING
    finetune: Finetune = MISSING


def describe(prune: Prune, finetune: Finetune) -> str:
    chosen = prune.sparsity is None
    amount = f"by max_acc_drop {prune.max_acc_drop:g}" if chosen else f"{prune.sparsity:g}"
    return f"sparsity {amount}, {finetune.epochs} epochs"


def repair(case: Case, prune: Prune, finetune: Finetune):
    def pruned_at(sparsity: float):
        return magnitude_prune(case.badnet, case.layer, sparsity)

    def train(sparsity: float):
        pruned = pruned_at(sparsity)
        case.finetune(pruned.model, finetune, pruned, series=f"sparsity_{rung(sparsity)}")
        return pruned.export()

    sparsity, repaired = prune.sparsity, None
    if sparsity is None:
        sparsity, repaired = strongest_run(
            case,
            "prune",
            "sparsity_chosen",
            prune.sparsities,
            train,
            prune.max_acc_drop,
            prune.margin_se,
        )
    chosen = pruned_at(sparsity)
    case.journal.log(
        {"prune/channels_pruned": len(chosen.channels_pruned), "prune/sparsity": chosen.sparsity}
    )
    case.journal.note(layer=case.layer, pruned_channels=chosen.channels_pruned)
    case.stage("pruned", chosen.export())  # the chosen share, before training
    if repaired is None:
        case.finetune(chosen.model, finetune, chosen)
        repaired = chosen.export()
    return repaired
