"""The leaderboard's clean yardstick of a backdoor: how often the BadNet's own reversed
triggers, found by Neural Cleanse's scan on clean data, still work on a net. The
leaderboard's rule may read no test or poisoned data, so this stands in for ASR there."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import tf_keras as keras
from omegaconf import DictConfig, OmegaConf

from badnet_repair.defenses import trigger_search as ts
from badnet_repair.defenses.repairs import Case, neural_cleanse
from badnet_repair.experiment.config import project_root

PROBE_SEED = 7919  # added to the run's seed: the probe's scan is not the repair's


def probe(case: Case, overrides: DictConfig | None = None) -> Callable[[keras.Model], float]:
    """A clean-data estimate of how much of the BadNet's backdoor a net keeps, for the
    leaderboard's rule (which may read no test or poisoned data): the mean attack success,
    on clean held-out images of other classes, of the BadNet's reversed triggers (the
    flagged classes', else the `candidates` smallest). The scan runs at Neural Cleanse's default
    settings (or the run's `neural_cleanse` keys, where it has them) but with a seed of its
    own: repair=neural_cleanse unlearns the triggers of its own scan, and a repair judged by
    the very triggers it trained on would look clean whatever it left behind."""
    path = Path(project_root()) / "conf" / "repair" / "neural_cleanse.yaml"
    defaults = OmegaConf.merge(
        OmegaConf.structured(neural_cleanse.NeuralCleanse),
        OmegaConf.load(path).neural_cleanse,
        overrides or {},
    )
    nc = OmegaConf.to_object(defaults)
    result = neural_cleanse.shared_scan(case, nc, seed=case.seed + PROBE_SEED)
    smallest = sorted((c for c, t in result.triggers.items() if t.valid), key=result.norms.item)
    chosen = result.flagged(nc.anomaly_threshold) or smallest[: nc.candidates]
    held = case.clean.holdout

    def estimate(model: keras.Model) -> float:
        return (
            float(
                np.mean(
                    [ts.attack_success(model, result.triggers[c], held.x, held.y) for c in chosen]
                )
            )
            if chosen
            else float("nan")
        )

    return estimate
