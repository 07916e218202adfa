"""The experiment: load and score the BadNet, repair it, score the repair, build and score
the GoodNet, save and log.

This module is the only one that reads the config; every stage it calls takes plain
arguments, so each can be used and tested on its own.
"""

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import tf_keras as keras
from omegaconf import DictConfig, OmegaConf

from badnet_repair import (
    UserError,
    config,
    data,
    demo,
    detectors,
    files,
    goodnet,
    models,
    plots,
    repairs,
    sweep,
    topology,
    tracking,
)
from badnet_repair.evaluate import (
    Answers,
    accuracy,
    auroc,
    goodnet_answers,
    goodnet_scores,
    objective,
)
from badnet_repair.probe import probe
from badnet_repair.report import Report
from badnet_repair.training import seed_everything

log = logging.getLogger(__name__)


def require_inputs(paths: list[str], where: str | None) -> None:
    """Stop before any work when input files are missing, naming each and where they
    come from."""
    missing = [f for f in paths if not Path(f).is_file()]
    if missing:
        raise UserError(f"missing input files: {', '.join(missing)}{f'; {where}' if where else ''}")


def require_separate(validation: str, test: str) -> None:
    """The defender's data and the data that scores the repair must differ: a repair whose
    choices read the clean test set would be judged on what it was tuned on."""
    if files.content_hash(validation) == files.content_hash(test):
        raise UserError(
            f"config keys data.clean_validation={validation} and data.clean_test={test}: "
            "the same data; the test set must be held out from the defender's data"
        )


@dataclass
class Baseline:
    """What every run over one BadNet and its data shares: computed once per process."""

    badnet: keras.Model
    validation: data.Dataset
    test: data.Dataset
    poisoned: dict[str, data.Dataset]
    layer: str
    answers: Answers  # the BadNet's classes on the evaluation sets
    splits: dict = field(default_factory=dict)

    def clean(self, holdout: float, seed: int) -> tuple[repairs.CleanData, repairs.Memo]:
        """The defender's data: the validation set and its seeded split; with it, what the
        repairs and detectors of every run on that split share (a value computed on one
        split is not another's)."""
        if (holdout, seed) not in self.splits:
            train, held = data.split(self.validation, holdout, seed)
            clean = repairs.CleanData(self.validation, train, held)
            self.splits[(holdout, seed)] = clean, repairs.Memo()
        return self.splits[(holdout, seed)]


_baseline: dict[str, Baseline] = {}


def baseline(cfg: DictConfig) -> Baseline:
    """Load the BadNet and its data and classify the evaluation sets, reusing the last
    result while the model and data files' contents and the settings are unchanged."""
    paths = [cfg.model.file, cfg.data.clean_validation, cfg.data.clean_test]
    paths += list(cfg.data.poisoned.values())
    key = json.dumps(
        [
            [files.content_hash(p) for p in paths],
            list(cfg.data.poisoned),
            cfg.model.architecture,
            cfg.model.layer,
            cfg.data.scale,
        ]
    )
    if key in _baseline:
        log.info("reusing the loaded BadNet, its data and baseline metrics (same files)")
        return _baseline[key]
    _baseline.clear()  # hold one BadNet's data at a time
    badnet, validation, test, poisoned = load_inputs(cfg)
    layer = models.prunable_layer(badnet, cfg.model.layer).name
    answers = Report(test, poisoned, cfg.eval_batch_size).answers(badnet)
    _baseline[key] = Baseline(badnet, validation, test, poisoned, layer, answers)
    return _baseline[key]


def load_inputs(cfg: DictConfig):
    """The BadNet and its data sets, checked against each other."""
    loaded = models.load_model(cfg.model.file, cfg.model.architecture, cfg.model.allow_unsafe)
    model = topology.normalize(loaded)
    shape, n = models.input_shape(model), models.num_classes(model)

    def load(path: str, name: str) -> data.Dataset:
        return data.load_h5(path, shape, n, cfg.data.scale, name)

    validation = load(cfg.data.clean_validation, "clean_validation")
    test = load(cfg.data.clean_test, "clean_test")
    poisoned = {str(k): load(v, str(k)) for k, v in cfg.data.poisoned.items()}
    for trigger, ds in poisoned.items():
        targets = data.label_counts(ds)
        if len(targets) > 1:
            shown = ", ".join(f"{label}: {n}" for label, n in list(targets.items())[:5])
            log.warning(
                "poisoned set %s has %d targets (label: images) %s", trigger, len(targets), shown
            )
    if not poisoned:
        log.warning("no poisoned data set configured: reporting clean accuracy only")
    log.info(
        "loaded %s: input %s, %d classes; %d validation, %d test, poisoned: %s",
        cfg.model.file,
        shape,
        n,
        len(validation),
        len(test),
        ", ".join(f"{k}={len(v)}" for k, v in poisoned.items()) or "none",
    )
    return model, validation, test, poisoned


def run(
    cfg: DictConfig, run_name: str | None = None, parent_run_id: str | None = None
) -> dict[str, float]:
    """Carry out one experiment and track it; return its metrics.

    Within a sweep (`parent_run_id` given) the run is logged as the parent's child, and
    with `sweep.resume` a point whose config already has a FINISHED run is skipped.
    """
    config.validate(cfg)
    for section in repairs.unread(cfg):
        log.warning("config section %s: not read by repair=%s (ignored)", section, cfg.repair)
    inputs = [cfg.model.file, cfg.data.clean_validation, cfg.data.clean_test]
    inputs += list(cfg.data.poisoned.values())
    built = Path(cfg.model.file).parent if cfg.model.builder else None
    source = f"published at {cfg.data.source}" if cfg.data.source else None
    require_inputs([f for f in inputs if Path(f).parent != built], source)
    out_dir = files.writable_dir(cfg.paths.output_dir, "paths.output_dir")
    experiment_id = tracking.prepare(
        cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root
    )
    run_name = run_name or f"{cfg.model.name} {repairs.describe(cfg)}"
    fingerprint = sweep.config_hash(cfg)
    tags = {"config_hash": fingerprint, "repair": cfg.repair}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
        done = sweep.finished_children(experiment_id, parent_run_id, fingerprint)
        if done and cfg.sweep.resume:
            log.info(
                "sweep point '%s': already FINISHED as run %s, skipped (sweep.resume=false reruns)",
                run_name,
                done[-1].info.run_id,
            )
            return _with_objective(dict(done[-1].data.metrics), cfg)
    if built is not None:  # a demo BadNet, built on first use: then every input must exist
        demo.ensure(built, cfg.model.builder, cfg.model.build_scale)
        require_inputs(inputs, f"not among the files the {cfg.model.builder} build made in {built}")
    require_separate(cfg.data.clean_validation, cfg.data.clean_test)
    with tracking.tracked_run(experiment_id, run_name, tags) as run_id:
        log.info("MLflow run %s in experiment '%s'", run_id, cfg.tracking.experiment)
        mlflow.log_params(tracking.flatten(cfg))
        mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        metrics = _with_objective(_experiment(cfg, out_dir), cfg)
        mlflow.log_metric("objective", metrics["objective"])
        return metrics


def _with_objective(metrics: dict[str, float], cfg: DictConfig) -> dict[str, float]:
    value = objective(metrics, cfg.sweep.objective.value, cfg.sweep.asr_ceiling)
    return {**metrics, "objective": value}


def _experiment(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    seed_everything(cfg.seed)
    start = time.perf_counter()
    base = baseline(cfg)
    report = Report(base.test, base.poisoned, cfg.eval_batch_size)
    report.stage("badnet", answers=base.answers)
    topology.output_kind(base.badnet)  # probabilities or raw scores, or refused now
    detectors.check(base.badnet, cfg.goodnet, len(base.validation))

    clean, memo = base.clean(cfg.data.holdout, cfg.seed)
    case = repairs.Case(base.badnet, base.layer, clean, report, cfg.seed, cfg.eval_batch_size, memo)
    seed_everything(cfg.seed)  # the repair starts from the same RNG state, cache hit or not
    repair_start = time.perf_counter()
    repaired = repairs.run(cfg, case)
    mlflow.log_metric("time/repair_s", time.perf_counter() - repair_start)
    repaired_answers = report.answers(repaired)
    report.stage("repaired", answers=repaired_answers)
    report.log(
        {  # what a defender can see of the repair's cost: clean images no repair trains on
            "badnet/holdout_acc": case.badnet_holdout_accuracy(),
            "repaired/holdout_acc": accuracy(repaired, clean.holdout, cfg.eval_batch_size),
        }
    )
    if cfg.sweep.leaderboard:  # the clean-data yardstick of the leaderboard's rule
        estimate = probe(case, cfg.get("neural_cleanse"))
        report.log(
            {"badnet/probe_asr": estimate(base.badnet), "repaired/probe_asr": estimate(repaired)}
        )
    model_path = models.save_model(repaired, out_dir / "repaired_net.h5")
    mlflow.log_artifact(str(model_path))

    _goodnet(cfg, base, case, repaired, repaired_answers, report, out_dir)
    summary = {"metrics": report.metrics, **report.notes}
    mlflow.log_artifact(
        str(files.write_text(out_dir / "metrics.json", json.dumps(summary, indent=2)))
    )
    title = f"{cfg.model.name}: {repairs.describe(cfg)}"
    figure = plots.stage_plot(report.metrics, report.stages, report.triggers, title)
    report.figure(figure, "stages.png")
    mlflow.set_tag("series", ",".join(sorted(report.series)))
    log.info("done in %.0fs; repaired model: %s", time.perf_counter() - start, model_path)
    return report.metrics


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
        base.badnet, repaired, case.clean, cfg.goodnet, cfg.seed, cfg.eval_batch_size, case.memo
    )
    fitted = [detectors.fit(name, context) for name in detectors.parse(cfg.goodnet.detector)]
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
        if detector.score is not None:
            scored = scores[detector.name] = {t: s for t, (s, _) in judged.items()}
            for t in base.poisoned:
                metrics[f"auroc/{t}"] = auroc(scored[None], scored[t])
        report.log({f"goodnet/{detector.name}/{key}": value for key, value in metrics.items()})
    good = goodnet.build_goodnet(base.badnet, repaired, fitted)
    answers = goodnet_answers(repaired_answers, good.num_classes, flags)
    values = goodnet_scores(answers, base.test, base.poisoned, good.num_classes)
    values = {key.split("/", 1)[1]: value for key, value in values.items()}
    report.stage_from("goodnet", values, f"{' + '.join(good.detectors)}, by its rule")
    if base.poisoned:
        operating = dict(zip(good.detectors, flags, strict=True))
        report.figure(plots.roc_plot(scores, operating, report.triggers), "goodnet_roc.png")
    mlflow.log_artifact(str(goodnet.save_goodnet(good.model, out_dir / "goodnet.h5")))
