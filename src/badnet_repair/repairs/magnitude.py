"""Magnitude pruning, the seed project's method: tensorflow-model-optimization's
`prune_low_magnitude` zeroes the smallest weights of every prunable layer to
`prune.sparsity`, and keeps doing so while the net fine-tunes on clean data.
"""

from dataclasses import dataclass

from omegaconf import MISSING

from badnet_repair.config import ranged
from badnet_repair.pruning import magnitude_prune
from badnet_repair.repairs import Case, RepairSettings
from badnet_repair.training import Finetune


@dataclass
class Prune:
    """prune.*: the share of every kernel's weights zeroed, and the training steps
    between tfmot's mask updates."""

    sparsity: float = ranged(MISSING, "[0, 1)")
    frequency: int = ranged(MISSING, ">= 1")


@dataclass
class Settings(RepairSettings):
    prune: Prune = MISSING
    finetune: Finetune = MISSING


def describe(prune: Prune, finetune: Finetune) -> str:
    return f"sparsity {prune.sparsity:g}, {finetune.epochs} epochs"


def repair(case: Case, prune: Prune, finetune: Finetune):
    pruned = magnitude_prune(case.badnet, case.layer, prune.sparsity, prune.frequency)
    case.report.log(
        {"prune/channels_pruned": len(pruned.channels_pruned), "prune/sparsity": pruned.sparsity}
    )
    case.report.note(layer=case.layer, pruned_channels=pruned.channels_pruned)
    case.report.stage("pruned", pruned.export())
    case.finetune(pruned.model, finetune, pruned)
    return pruned.export()
