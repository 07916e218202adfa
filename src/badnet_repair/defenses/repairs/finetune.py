"""Fine-tuning alone: the baseline every backdoor-defense benchmark reports. Training on
clean data can overwrite a backdoor that nothing in it reinforces (BackdoorBench: 1.5%
ASR left on CIFAR-10 BadNets), or leave it intact."""

from dataclasses import dataclass

from omegaconf import MISSING

from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network.pruning import copy_model
from badnet_repair.network.training import Finetune


@dataclass
class Settings(RepairSettings):
    finetune: Finetune = MISSING


def describe(finetune: Finetune) -> str:
    return f"{finetune.epochs} epochs at lr {finetune.lr:g}"


def repair(case: Case, finetune: Finetune):
    model = copy_model(case.badnet)
    case.finetune(model, finetune)
    return model
