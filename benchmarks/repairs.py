"""Wall time of the class-agnostic repairs at competition scale, in plain fine-tuning epochs.

The real sunglasses DeepID weights (../shared/csaw-hackml-2020/models/) and stand-in images
of the real counts (11,547 validation, split as the pipeline does with data.holdout = 0.1;
12,830 clean test and 12,830 poisoned images for the stages a repair scores; 1,283
classes). The validation stand-ins are labelled with the BadNet's own answers, so it
scores 100% on them and every rule runs as it would on real data: ladders climb until a
rung costs more than the budget, RNP's unlearning runs until accuracy falls to its floor.

Each repair runs at its defaults (the path it took is printed) and at its worst case:
every rung of its ladder (budget 0.99), and RNP's unlearning to its step bound (floor 0).
The unit is one epoch of the pipeline's own fine-tuning (`training.finetune`: Adam, batch
32, held-out accuracy after the epoch) on the same training split, measured in the same
run. Prints figures; not a test.

Usage: python benchmarks/repairs.py [--scale 1.0] [--repairs ft_sam rnp sau anp i_bau seam bti_dbf]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import COUNTS, ROOT, WEIGHTS, best_of  # noqa: E402

WORST = {
    "ft_sam": ["ft_sam.max_acc_drop=0.99"],
    "rnp": ["rnp.unlearn_until=0", "rnp.max_acc_drop=0.99"],
    "sau": ["sau.max_acc_drop=0.99"],
    "anp": ["anp.max_acc_drop=0.99"],  # a fixed number of steps: only the pruning differs
    "i_bau": ["i_bau.max_acc_drop=0.99"],
    "seam": ["seam.forget_until=0", "seam.max_acc_drop=0.99"],
    "bti_dbf": ["bti_dbf.max_acc_drop=0.99"],
}


def stand_ins(model, scale: float, seed: int = 0):
    import numpy as np

    from badnet_repair.data import Dataset
    from badnet_repair.network.predict import predict_classes

    rng = np.random.default_rng(seed)

    def images(n: int) -> np.ndarray:
        return rng.uniform(0, 1, (max(64, int(n * scale)), 55, 47, 3)).astype(np.float32)

    x = images(COUNTS["clean_validation"])
    validation = Dataset("clean_validation", x, predict_classes(model, x))
    test, poisoned = images(COUNTS["clean_test"]), images(COUNTS["sunglasses"])
    return (
        validation,
        Dataset("clean_test", test, rng.integers(0, 1283, len(test))),
        {"sunglasses": Dataset("sunglasses", poisoned, np.zeros(len(poisoned), np.int64))},
    )


def settings(name: str, *overrides: str) -> dict:
    """A repair's sections at its defaults (conf/repair/NAME.yaml), with `overrides`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from badnet_repair.defenses import repairs
    from badnet_repair.experiment import config

    config.register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"repair={name}", *overrides])
    return {s: OmegaConf.to_object(cfg[s]) for s in repairs.sections(name)}


# the key each ladder of whole runs is set by
LADDER = {"ft_sam": "lrs", "sau": "eps", "i_bau": "eps", "seam": "recover_lrs", "bti_dbf": "lrs"}


def path_taken(name: str, metrics: dict, notes: dict) -> str:
    if name == "rnp":
        return (
            f"{int(metrics['rnp/unlearn_steps'])} unlearning steps, "
            f"{int(metrics['rnp/channels_pruned'])} channels pruned"
        )
    if name == "anp":
        return f"{int(metrics['anp/channels_pruned'])} channels pruned"
    rungs = getattr(settings(name)[name], LADDER[name])
    runs = f"{len(notes[f'{name}_ladder'])} of {len(rungs)} runs of its ladder"
    if name == "seam":
        return f"{int(metrics['seam/forget_steps'])} forgetting steps, {runs}"
    return runs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=float, default=1.0, help="share of the real image counts")
    parser.add_argument(
        "--repairs",
        nargs="+",
        default=["ft_sam", "rnp", "sau", "anp", "i_bau", "seam", "bti_dbf"],
    )
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import mlflow

    import badnet_repair  # noqa: F401
    from badnet_repair import data
    from badnet_repair.data import Dataset
    from badnet_repair.defenses import repairs
    from badnet_repair.defenses.budget import NoneWithinBudget
    from badnet_repair.experiment.report import Report
    from badnet_repair.journal import Journal
    from badnet_repair.network import models
    from badnet_repair.network.pruning import copy_model
    from badnet_repair.network.training import finetune, seed_everything

    badnet = models.load_model(WEIGHTS, "deepid")
    validation, test, poisoned = stand_ins(badnet, args.scale)
    train, holdout = data.split(validation, 0.1, seed=0)
    print(
        f"machine: {os.cpu_count()} cores; {len(train)} training and {len(holdout)} held-out "
        f"stand-ins, {len(test)} test, {len(poisoned['sunglasses'])} poisoned; scale {args.scale}"
    )

    warm_up = Dataset("warm-up", train.x[:320], train.y[:320])  # traces the training step
    finetune(copy_model(badnet), warm_up, None, 1, 1e-3, 32)
    epoch_s = best_of(2, lambda: finetune(copy_model(badnet), train, holdout, 1, 1e-3, 32))
    print(f"one plain fine-tuning epoch (Adam, batch 32): {epoch_s:.1f}s")

    mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
    for name in args.repairs:
        for label, extra in (("defaults", []), ("worst case", WORST[name])):
            journal = Journal()
            report = Report(test, poisoned, 512, journal)
            case = repairs.Case(
                badnet, "conv_3", repairs.CleanData(validation, train, holdout), journal, 0, 512
            )
            chosen = settings(name, *extra)
            seed_everything(0)

            def repair_and_score():  # the repair, and the stages it hands back scored
                repairs.REGISTRY.module(name).repair(case, **chosen)  # noqa: B023
                report.handed(case.handed, case.memo)  # noqa: B023

            with mlflow.start_run(run_name=f"{name} {label}"):
                start = time.perf_counter()
                try:
                    repair_and_score()
                    taken = path_taken(name, journal.metrics, journal.notes)
                except NoneWithinBudget as declined:  # the whole ladder and its halvings ran
                    taken = f"declined: {declined}"
                seconds = time.perf_counter() - start
            print(
                f"{name} at its {label}: {seconds / epoch_s:.1f} epoch-equivalents "
                f"({seconds:.0f}s; {taken}; goal < 20)",
                flush=True,
            )
    print(f"measured {time.strftime('%Y-%m-%d')}")


if __name__ == "__main__":
    main()
