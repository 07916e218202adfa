"""Neural Cleanse (Wang et al., IEEE S&P 2019): reverse-engineer every class's smallest
trigger on clean images, flag the classes whose mask is anomalously small, and unlearn
their triggers: fine-tune on clean data plus copies stamped with each flagged trigger,
the true labels kept.

Many classes are made affordable by a scan in three steps (see `scan`): an optional
label pre-screen (K-Arm's top-k rule), a short batched optimisation of every class left at
one fixed mask-size weight (the screen, ranked by its loss: cross-entropy plus the weighted
mask norm), and the full optimisation for the `candidates` lowest, plus `references`
spread evenly over the rest of the screen's ranking. The anomaly index needs the median and
the MAD of the population's norms at the full optimisation's level: they come from the
references, a sample of the classes that were not chosen for being small, optimised
exactly like the candidates (without a screen, from every class, as in the paper).
"""

import logging
import time
from dataclasses import astuple, dataclass, field, replace

import numpy as np
from omegaconf import MISSING

from badnet_repair.data import Dataset
from badnet_repair.defenses import trigger_pictures as pictures
from badnet_repair.defenses import trigger_search as ts
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.network.models import num_classes
from badnet_repair.network.pruning import copy_model
from badnet_repair.network.training import Finetune
from badnet_repair.ranges import ranged

log = logging.getLogger(__name__)

SHOWN = 3  # candidates pictured beyond the flagged classes


@dataclass
class NeuralCleanse:
    """neural_cleanse.*: the scan, the anomaly rule and the unlearning's stamped share
    (each key is described in conf/repair/neural_cleanse.yaml)."""

    prescreen: float = ranged(MISSING, "(0, 1]")
    screen_rounds: int = ranged(MISSING, ">= 0")
    screen_lr: float = ranged(MISSING, "> 0")
    screen_cost: float = ranged(MISSING, "> 0")
    candidates: int = ranged(MISSING, ">= 1")
    references: int = ranged(MISSING, ">= 3")  # the MAD of fewer says nothing
    rounds: int = ranged(MISSING, ">= 1")
    early_stop: int = ranged(MISSING, ">= 0")
    round_batches: int = ranged(MISSING, ">= 1")
    batch_size: int = ranged(MISSING, ">= 1")
    lr: float = ranged(MISSING, "> 0")
    init_cost: float = ranged(MISSING, "> 0")
    cost_multiplier: float = ranged(MISSING, "> 1")
    patience: int = ranged(MISSING, ">= 1")
    threshold: float = ranged(MISSING, "(0, 1]")
    anomaly_threshold: float = ranged(MISSING, "> 0")
    fraction: float = ranged(MISSING, "(0, 1]")
    unlearn_smallest: int = ranged(MISSING, ">= 0")
    slots: int = ranged(MISSING, ">= 1")

    def schedule(self, screen: bool) -> ts.Schedule:
        """The paper's schedule for the full optimisation; the screen keeps one weight for
        every class (`screen_cost`, on from the start) so that their losses compare."""
        common = dict(
            round_batches=self.round_batches, batch_size=self.batch_size, threshold=self.threshold
        )
        if screen:
            fixed = dict(patience=self.screen_rounds + 1, wait=False)
            return ts.Schedule(
                self.screen_rounds, lr=self.screen_lr, init_cost=self.screen_cost, **fixed, **common
            )
        return ts.Schedule(
            self.rounds,
            lr=self.lr,
            init_cost=self.init_cost,
            multiplier=self.cost_multiplier,
            patience=self.patience,
            early_stop=self.early_stop,
            **common,
        )


@dataclass
class Settings(RepairSettings):
    neural_cleanse: NeuralCleanse = MISSING
    finetune: Finetune = MISSING


def describe(neural_cleanse: NeuralCleanse, finetune: Finetune) -> str:
    nc = neural_cleanse
    return f"{nc.candidates} candidates, index > {nc.anomaly_threshold:g}, {finetune.epochs} epochs"


@dataclass
class Scan:
    """What the reverse-engineering found, per class."""

    triggers: dict[int, ts.Trigger]  # the fully optimised classes
    norms: np.ndarray  # per class, its mask's L1 norm (NaN: not optimised in full)
    index: np.ndarray  # per class, its anomaly index (NaN: not optimised in full)
    table: list[dict] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    population: list[int] = field(default_factory=list)  # whose norms set median and MAD

    def flagged(self, threshold: float) -> list[int]:
        """Classes with a successful trigger and an anomaly index above `threshold`,
        highest first."""
        found = [c for c, t in self.triggers.items() if t.valid and self.index[c] > threshold]
        return sorted(found, key=lambda c: -self.index[c])

    def smallest(self, k: int) -> list[int]:
        """The `k` classes with a successful trigger and the smallest masks, smallest first."""
        return sorted((c for c, t in self.triggers.items() if t.valid), key=self.norms.__getitem__)[
            :k
        ]


def scan(model, x: np.ndarray, y: np.ndarray, nc: NeuralCleanse, seed: int) -> Scan:
    """Pre-screen and screen the classes, optimise the candidates and references in full,
    and give each of them its anomaly index against the references' norms."""
    n = num_classes(model)
    seconds, start = {}, time.perf_counter()
    share = ts.label_scores(model, x, y)
    kept = max(nc.candidates + nc.references, int(np.ceil(nc.prescreen * n)))
    screened = np.sort(np.argsort(-share, kind="stable")[:kept]).tolist()
    seconds["prescreen"] = time.perf_counter() - start
    rows = {c: {"class": c, "label_score": round(float(share[c]), 4)} for c in range(n)}
    for c in set(range(n)) - set(screened):
        rows[c]["stage"] = "pre-screened out"
        rows[c]["why"] = f"label score below the top {kept} of {n} (neural_cleanse.prescreen)"
    start = time.perf_counter()
    if nc.screen_rounds == 0 or len(screened) <= nc.candidates + nc.references:
        full_classes, candidates, population = screened, screened, screened
    else:
        screen = ts.search(model, x, screened, nc.schedule(True), seed, nc.slots, "screen")
        ranked = sorted(screened, key=lambda c: screen[c].loss)
        candidates, rest = ranked[: nc.candidates], ranked[nc.candidates :]
        picks = np.linspace(0, len(rest) - 1, min(nc.references, len(rest))).round()
        population = [rest[int(i)] for i in sorted(set(picks))]
        full_classes = sorted([*candidates, *population])
        for rank, c in enumerate(ranked):
            loss, norm = round(screen[c].loss, 4), round(screen[c].norm, 2)
            rows[c].update(screen_loss=loss, screen_norm=norm)
            rows[c]["stage"] = "candidate" if c in candidates else "screened out"
            rows[c]["why"] = f"screen: loss rank {rank + 1} of {len(ranked)}" + (
                "" if c in candidates else f" (candidates: the lowest {nc.candidates})"
            )
        for c in population:
            rows[c]["stage"] = "reference"
    seconds["screen"] = time.perf_counter() - start
    start = time.perf_counter()
    full = ts.search(model, x, full_classes, nc.schedule(False), seed, nc.slots, "optimise")
    seconds["optimise"] = time.perf_counter() - start
    norms, index = np.full(n, np.nan), np.full(n, np.nan)
    norms[full_classes] = [full[c].norm for c in full_classes]
    index[full_classes] = ts.anomaly_index(norms[full_classes], norms[population])
    for c in full_classes:
        rows[c].update(norm=round(full[c].norm, 2), success=full[c].success, rounds=full[c].rounds)
        rows[c]["anomaly_index"] = round(float(index[c]), 3)
        rows[c].setdefault("stage", "candidate")
    return Scan(full, norms, index, [rows[c] for c in range(n)], seconds, population)


def shared_scan(case: Case, nc: NeuralCleanse, seed: int | None = None) -> Scan:
    """The BadNet's scan (seeded with `seed`, by default the run's), once per BadNet, scan
    settings and seed: sweep points over the threshold and the unlearning share it."""
    search = replace(nc, anomaly_threshold=1.0, fraction=1.0)  # what the scan depends on
    seed = case.seed if seed is None else seed
    return case.shared(
        ("neural_cleanse scan", astuple(search), seed),
        lambda: scan(case.badnet, case.clean.train.x, case.clean.train.y, nc, seed),
    )


def repair(case: Case, neural_cleanse: NeuralCleanse, finetune: Finetune):
    nc, badnet, clean = neural_cleanse, case.badnet, case.clean
    result = shared_scan(case, nc)
    flagged = result.flagged(nc.anomaly_threshold)
    unlearned = flagged or result.smallest(nc.unlearn_smallest)
    _report(case, nc, result, flagged, unlearned)
    model = copy_model(badnet)
    start = time.perf_counter()
    if not flagged:
        log.warning(
            "Neural Cleanse flagged no class (highest anomaly index %.2f <= %g): %s",
            np.nanmax(result.index),
            nc.anomaly_threshold,
            f"unlearning the {len(unlearned)} smallest triggers instead"
            if unlearned
            else "plain fine-tuning, no unlearning",
        )
    data = clean.train
    if unlearned:
        triggers = [result.triggers[c] for c in unlearned]
        data = _unlearning_set(clean.train, triggers, nc.fraction, case.seed)
        log.info(
            "unlearning the triggers of class(es) %s: %d clean images + %d stamped",
            ", ".join(map(str, unlearned)),
            len(clean.train),
            len(data) - len(clean.train),
        )
    case.finetune(model, finetune, train=data)
    case.journal.log({"neural_cleanse/time/unlearn_s": time.perf_counter() - start})
    after = {
        f"neural_cleanse/trigger_asr_after/{c}": ts.attack_success(
            model, result.triggers[c], clean.holdout.x, clean.holdout.y
        )
        for c in unlearned
    }
    case.journal.log(after)
    return model


def _unlearning_set(train: Dataset, triggers: list[ts.Trigger], fraction: float, seed: int):
    """The clean training images, plus stamped copies with their true labels: the net learns
    that the triggers mean nothing. `fraction` is the stamped share over all triggers
    (the paper's 20% for one), so three triggers do not drown the clean images."""
    rng = np.random.default_rng(seed)
    xs, ys = [train.x], [train.y]
    per_trigger = max(1, round(fraction / max(1, len(triggers)) * len(train)))
    for trigger in triggers:
        picked = rng.choice(len(train), per_trigger, replace=False)
        xs.append(ts.stamp(train.x[picked], trigger.mask, trigger.pattern))
        ys.append(train.y[picked])
    return Dataset("unlearning", np.concatenate(xs), np.concatenate(ys))


def _report(
    case: Case, nc: NeuralCleanse, result: Scan, flagged: list[int], unlearned: list[int]
) -> None:
    """Metrics, tags, notes, the per-class table and the pictures."""
    holdout, report = case.clean.holdout, case.journal
    stages = [row.get("stage") for row in result.table]
    asr = {
        c: ts.attack_success(case.badnet, result.triggers[c], holdout.x, holdout.y)
        for c in unlearned
    }
    full_index = {c: float(result.index[c]) for c in result.triggers}
    top = max(full_index.values())
    report.log(
        {
            "neural_cleanse/anomaly_index": top,
            "neural_cleanse/flagged": len(flagged),
            "neural_cleanse/unlearned": len(unlearned),
            "neural_cleanse/classes_prescreened_out": stages.count("pre-screened out"),
            "neural_cleanse/classes_screened_out": stages.count("screened out"),
            "neural_cleanse/classes_optimised": len(result.triggers),
            "neural_cleanse/median_norm": float(np.median(result.norms[result.population])),
            **{f"neural_cleanse/time/{k}_s": v for k, v in result.seconds.items()},
            **{f"neural_cleanse/trigger_asr/{c}": v for c, v in asr.items()},
        }
    )
    named = ",".join(map(str, flagged)) or "none"
    outcome = (
        "unlearned"
        if flagged
        else f"no class flagged: unlearned the smallest triggers ({', '.join(map(str, unlearned))})"
        if unlearned
        else "no class flagged: fine-tuned without unlearning"
    )
    report.tags({"neural_cleanse.flagged": named, "neural_cleanse.outcome": outcome})
    report.note(
        neural_cleanse={
            "flagged": flagged,
            "unlearned": unlearned,
            "outcome": outcome,
            "anomaly_index": {str(c): round(v, 3) for c, v in full_index.items()},
            "norms": {str(c): round(t.norm, 2) for c, t in result.triggers.items()},
            "trigger_asr": {str(c): v for c, v in asr.items()},
        }
    )
    table = [{**r, "flagged": r["class"] in flagged} if "norm" in r else r for r in result.table]
    report.text(pictures.csv(table), "neural_cleanse_classes.csv")
    log.info(
        "Neural Cleanse: anomaly index %.2f at most; flagged: %s; %s",
        top,
        named,
        ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()),
    )
    ranked = sorted(full_index, key=lambda c: -full_index[c])
    shown = flagged + [c for c in ranked if c not in flagged][:SHOWN]
    low, high = float(holdout.x.min()), float(holdout.x.max())
    figure = pictures.trigger_figure(
        result.triggers, result.index, flagged, shown, holdout, low, high
    )
    report.figure(figure, "triggers.png")
    figure = pictures.anomaly_figure(
        result.index, result.population, flagged, ranked, nc.anomaly_threshold
    )
    report.figure(figure, "anomaly_index.png")
