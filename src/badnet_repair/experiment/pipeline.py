"""The experiment, top-down: check the config and inputs, open the MLflow run, then the
stages: score the BadNet, repair it, score what the repair handed back and the repaired
net, build and score the GoodNet, save and log.

This module is the only one that reads the config; every stage it calls takes plain
arguments, so each can be used and tested on its own.
"""

import json
import logging
import time
from dataclasses import fields
from pathlib import Path

import mlflow
import numpy as np
import tf_keras as keras
from omegaconf import DictConfig, OmegaConf, open_dict

from badnet_repair import files, plots
from badnet_repair.defenses import detectors, goodnet, repairs
from badnet_repair.defenses.budget import NoneWithinBudget
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.defenses.detectors import badexpert
from badnet_repair.experiment import config, inputs, sweep, tracking
from badnet_repair.experiment.evaluate import (
    OPERATING_RATES,
    Answers,
    auroc,
    detection_at,
    goodnet_answers,
    goodnet_scores,
    objective,
    rejection_p,
)
from badnet_repair.experiment.inputs import Baseline
from badnet_repair.experiment.probe import probe
from badnet_repair.experiment.report import Report
from badnet_repair.journal import Journal
from badnet_repair.network import models, topology
from badnet_repair.network.predict import accuracy
from badnet_repair.network.training import seed_everything

log = logging.getLogger(__name__)


def run(
    cfg: DictConfig, run_name: str | None = None, parent_run_id: str | None = None
) -> dict[str, float]:
    """Carry out one experiment and track it; return its metrics.

    Within a sweep (`parent_run_id` given) the run is logged as the parent's child, and
    with `sweep.resume` a point whose config already has a FINISHED run is skipped.
    """
    config.settle(cfg)
    goodnet_reads = _goodnet_sections(cfg)
    config.validate(cfg)
    for section in sorted(set(repairs.unread(cfg)) - goodnet_reads):
        log.warning(
            "config section %s: not read by repair=%s (ignored)", section, repairs.label(cfg)
        )
    inputs.check_present(cfg)
    out_dir = files.writable_dir(cfg.paths.output_dir, "paths.output_dir")
    experiment_id = tracking.prepare(
        cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root
    )
    run_name = run_name or f"{cfg.model.name} {repairs.describe(cfg)}"
    fingerprint = sweep.config_hash(cfg)
    tags = {"config_hash": fingerprint, "repair": repairs.label(cfg), "machine": tracking.machine()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
        done = sweep.finished_children(parent_run_id, fingerprint)
        if done and cfg.sweep.resume:
            log.info(
                "sweep point '%s': already FINISHED as run %s, skipped (sweep.resume=false reruns)",
                run_name,
                done[-1].info.run_id,
            )
            return _with_objective(dict(done[-1].data.metrics), cfg)
    inputs.build_if_needed(cfg)
    tags["model.content_hash"] = files.content_hash(cfg.model.file)  # tells nets apart
    with tracking.tracked_run(experiment_id, run_name, tags) as run_id:
        log.info("MLflow run %s in experiment '%s'", run_id, cfg.tracking.experiment)
        mlflow.log_params({**tracking.flatten(cfg), "repair": repairs.label(cfg)})  # a+b
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        metrics = _with_objective(_experiment(cfg, out_dir), cfg)
        mlflow.log_metric("objective", metrics["objective"])
        return metrics


def _goodnet_sections(cfg: DictConfig) -> set[str]:
    """The repair sections the GoodNet reads: `ft_sam` where BaDExpert repairs a copy of B
    with FT-SAM for its auxiliary model (`goodnet.auxiliary` ft_sam, or auto and no FT-SAM
    step in the repair). Where the repair brings no such section, it is FT-SAM's file's
    defaults, under any `++ft_sam.KEY=` given: checked, logged and hashed as a repair's."""
    if any(OmegaConf.is_missing(cfg.goodnet, key) for key in ("detector", "auxiliary")):
        return set()  # `config.validate` names the key
    chosen, steps = detectors.parse(cfg.goodnet.detector), repairs.steps(cfg)
    if "badexpert" not in chosen or badexpert.auxiliary_kind(cfg.goodnet, steps) != "ft_sam":
        return set()
    if "ft_sam" not in steps:
        schema = {f.name: f.type for f in fields(repairs.settings("ft_sam"))}["ft_sam"]
        defaults = OmegaConf.load(Path(config.project_root()) / "conf/repair/ft_sam.yaml")
        given = cfg.get("ft_sam") or {}
        with open_dict(cfg):
            cfg.ft_sam = OmegaConf.merge(OmegaConf.structured(schema), defaults.ft_sam, given)
    return {"ft_sam"}


def _with_objective(metrics: dict[str, float], cfg: DictConfig) -> dict[str, float]:
    value = objective(metrics, cfg.sweep.objective.value, cfg.sweep.asr_ceiling)
    return {**metrics, "objective": value}


def _experiment(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    seed_everything(cfg.seed)
    start = time.perf_counter()
    base = inputs.baseline(cfg)
    journal = Journal()
    report = Report(base.test, base.poisoned, cfg.eval_batch_size, journal)
    report.stage("badnet", answers=base.answers)
    topology.output_kind(base.badnet)  # probabilities or raw scores, or refused now
    clean, memo = base.clean(cfg.data.holdout, cfg.seed)
    detectors.check(base.badnet, cfg.goodnet, clean, cfg.eval_batch_size)

    try:
        case, steps, repaired = _repair(cfg, base, clean, memo, journal)
    except NoneWithinBudget as declined:  # no wreck is saved or scored as repaired
        log.warning("repair declined: %s; no repaired net is saved or scored", declined)
        mlflow.set_tag("repair.declined", str(declined))
        _summary(cfg, journal, report, out_dir)
        return journal.metrics
    for step in steps:  # a chain's steps each hand back their own, under their names
        report.handed(step.handed, step.memo)
    repaired_answers = report.answers(repaired)
    report.stage("repaired", answers=repaired_answers)
    _clean_yardsticks(cfg, base, case, repaired, journal)
    model_path = models.save_model(repaired, out_dir / "repaired_net.h5")
    mlflow.log_artifact(str(model_path))

    _goodnet(cfg, base, case, repaired, repaired_answers, report, out_dir)
    _summary(cfg, journal, report, out_dir)
    log.info("done in %.0fs; repaired model: %s", time.perf_counter() - start, model_path)
    return journal.metrics


def _repair(
    cfg: DictConfig, base: Baseline, clean: CleanData, memo: Memo, journal: Journal
) -> tuple[repairs.Case, list[repairs.Case], keras.Model]:
    """The chosen repair (or chain), on the BadNet and the defender's clean data only:
    the BadNet's case, each step's, and the repaired net."""
    case = repairs.Case(
        base.badnet, base.layer, clean, journal, cfg.seed, cfg.eval_batch_size, memo
    )
    seed_everything(cfg.seed)  # the repair starts from the same RNG state, cache hit or not
    repair_start = time.perf_counter()
    steps, repaired = repairs.run(cfg, case)
    journal.log({"time/repair_s": time.perf_counter() - repair_start})
    return case, steps, repaired


def _clean_yardsticks(
    cfg: DictConfig, base: Baseline, case: repairs.Case, repaired: keras.Model, journal: Journal
) -> None:
    """What a defender can see of the repair: its cost on clean images no repair trains
    on, and in leaderboard sweeps how well the BadNet's reversed triggers still work."""
    journal.log(
        {
            "badnet/holdout_acc": case.badnet_holdout_accuracy(),
            "repaired/holdout_acc": accuracy(repaired, case.clean.holdout, cfg.eval_batch_size),
        }
    )
    if cfg.sweep.leaderboard:
        estimate = probe(case, cfg.get("neural_cleanse"))
        journal.log(
            {"badnet/probe_asr": estimate(base.badnet), "repaired/probe_asr": estimate(repaired)}
        )


def _summary(cfg: DictConfig, journal: Journal, report: Report, out_dir: Path) -> None:
    """metrics.json, stages.png and the list of per-step series."""
    summary = {"metrics": journal.metrics, **journal.notes}
    mlflow.log_artifact(
        str(files.write_text(out_dir / "metrics.json", json.dumps(summary, indent=2)))
    )
    title = f"{cfg.model.name}: {repairs.describe(cfg)}"
    figure = plots.stage_plot(journal.metrics, report.stages, report.triggers, title)
    journal.figure(figure, "stages.png")
    mlflow.set_tag("series", ",".join(sorted(journal.series)))


def _goodnet(
    cfg: DictConfig,
    base: Baseline,
    case: repairs.Case,
    repaired: keras.Model,
    repaired_answers: Answers,
    report: Report,
    out_dir: Path,
) -> None:
    """Fit the detectors on clean data, score each and the GoodNet by its rule on the
    answers in hand (not by running it: STRIP alone costs k + 2 passes per image), save."""
    context = detectors.Context(
        base.badnet,
        repaired,
        case.clean,
        cfg.goodnet,
        cfg.seed,
        cfg.eval_batch_size,
        case.memo,
        tuple(repairs.steps(cfg)),
        OmegaConf.to_object(cfg.ft_sam) if "ft_sam" in cfg else None,
    )
    fitted = detectors.fit(detectors.parse(cfg.goodnet.detector), context)
    sets = {None: base.test, **base.poisoned}
    inputs = {
        t: detectors.Inputs(ds.name, ds.x, base.answers.of(t), repaired_answers.of(t))
        for t, ds in sets.items()
    }
    flags, scores = [], {}
    for detector in fitted:
        judged = {t: detector.judge(inputs[t]) for t in sets}
        on = {t: flagged for t, (_, flagged) in judged.items()}
        flags.append(Answers(on[None], {t: on[t] for t in base.poisoned}))
        metrics = {"flag_rate_clean": float(np.mean(on[None])), **detector.metrics}
        metrics.update({f"detect/{t}": float(np.mean(on[t])) for t in base.poisoned})
        scored = scores[detector.name] = {t: s for t, (s, _) in judged.items()}
        for t in base.poisoned:
            metrics[f"auroc/{t}"] = auroc(scored[None], scored[t])
            metrics.update(_operating_points(scored[None], scored[t], t))
        report.journal.log(
            {f"goodnet/{detector.name}/{key}": value for key, value in metrics.items()}
        )
    good = goodnet.build_goodnet(base.badnet, repaired, fitted)
    answers = goodnet_answers(repaired_answers, good.num_classes, flags)
    values = goodnet_scores(answers, base.test, base.poisoned, good.num_classes)
    values = {key.split("/", 1)[1]: value for key, value in values.items()}
    report.stage_from("goodnet", values, f"{' + '.join(good.detectors)}, by its rule")
    promise = fitted[0].metrics  # one calibration for all: the GoodNet's size and bound
    rejected = int(np.sum(answers.clean == good.num_classes))
    n, bound = int(promise["calibration_images"]), promise["frr_bound"]
    p = rejection_p(rejected, len(base.test), n, bound)
    report.journal.log({"goodnet/frr_p": p})
    log.info(
        "goodnet: %d of %d clean test images rejected, p %.2g against its promise %.4f "
        "(%d calibration images; a tiny p: test images unlike the clean validation ones)",
        rejected,
        len(base.test),
        p,
        bound,
        n,
    )
    together = {t: np.stack([scores[d.name][t] for d in fitted], axis=1) for t in sets}
    for t in base.poisoned:
        points = _operating_points(together[None], together[t], t)
        report.journal.log({f"goodnet/{key}": value for key, value in points.items()})
    if base.poisoned:
        operating = dict(zip(good.detectors, flags, strict=True))
        figure = plots.roc_plot(scores, operating, report.triggers)
        report.journal.figure(figure, "goodnet_roc.png")
    mlflow.log_artifact(str(_save_scores(fitted, scores, out_dir / "goodnet_scores.npz")))
    mlflow.log_artifact(str(goodnet.save_goodnet(good.model, out_dir / "goodnet.h5")))


def _operating_points(clean: np.ndarray, poisoned: np.ndarray, trigger: str) -> dict:
    """Detection of `trigger`'s inputs where the clean test set's rejection is at most 1%
    and 5% (`detect_at_frr_0.01/trigger`, ...): how the ranking would do at those rates."""
    return {
        f"detect_at_frr_{rate:g}/{trigger}": detection_at(clean, poisoned, rate)
        for rate in OPERATING_RATES
    }


def _save_scores(fitted: list, scores: dict[str, dict], path: Path) -> Path:
    """Every detector's scores, for analysis after the run (another rate, another pair):
    `NAME.calibration` (on the clean images it may be calibrated on), `NAME.clean_test`
    and `NAME.poisoned.TRIGGER`, in the order of the evaluation files."""
    arrays = {}
    for detector in fitted:
        arrays[f"{detector.name}.calibration"] = np.asarray(detector.calibration_scores)
        for t, values in scores[detector.name].items():
            part = "clean_test" if t is None else f"poisoned.{t}"
            arrays[f"{detector.name}.{part}"] = np.asarray(values)
    with files.atomic(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return path
