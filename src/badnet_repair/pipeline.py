"""The fine-pruning experiment: load, evaluate, prune, evaluate, fine-tune, evaluate, log.

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
    files,
    goodnet,
    models,
    plots,
    sweep,
    tracking,
)
from badnet_repair.curve import channels_within, pruning_curve
from badnet_repair.evaluate import (
    Answers,
    classify,
    evaluate,
    goodnet_answers,
    goodnet_scores,
    objective,
    stage_metrics,
)
from badnet_repair.finetune import finetune, seed_everything
from badnet_repair.pruning import activation_prune, channel_count, magnitude_prune, rank_channels

log = logging.getLogger(__name__)


def require_inputs(model_file: str, data_files: list[str], source: str | None) -> None:
    """Stop before any work when input files are missing, naming each and where to get it."""
    missing = [f for f in [model_file, *data_files] if not Path(f).is_file()]
    if missing:
        where = f"; published at {source}" if source else ""
        raise UserError(f"missing input files: {', '.join(missing)}{where}")


@dataclass
class Baseline:
    """What every point of a sweep over one BadNet shares: computed once per process."""

    badnet: keras.Model
    validation: data.Dataset
    test: data.Dataset
    poisoned: dict[str, data.Dataset]
    layer: str
    metrics: dict[str, float]
    order: np.ndarray | None = None
    curves: dict[str, np.ndarray] | None = None
    answers: Answers | None = None
    strip: dict[tuple, tuple] = field(default_factory=dict)

    def badnet_answers(self, batch_size: int) -> Answers:
        """The BadNet's classes on the test sets, computed once per BadNet."""
        if self.answers is None:
            self.answers = classify(self.badnet, self.test, self.poisoned, batch_size)
        return self.answers

    def strip_detector(
        self, k: int, frr: float, alpha: float, seed: int
    ) -> tuple[tuple[np.ndarray, float, np.ndarray], Answers]:
        """STRIP's calibration on the validation set and its flags on the test sets: both
        depend on the BadNet only, so they are computed once per BadNet and settings."""
        key = (k, frr, alpha, seed)
        if key not in self.strip:
            calibration = goodnet.calibrate_strip(
                self.badnet, self.validation.x, k, frr, alpha, seed
            )
            overlays, threshold, _ = calibration

            def flags(ds: data.Dataset) -> np.ndarray:
                log.info("STRIP: judging %d images of %s, %d blends each", len(ds), ds.name, k)
                return goodnet.strip_entropy(self.badnet, ds.x, overlays, alpha) < threshold

            on_poisoned = {t: flags(ds) for t, ds in self.poisoned.items()}
            self.strip[key] = (calibration, Answers(flags(self.test), on_poisoned))
        return self.strip[key]


_baseline: dict[str, Baseline] = {}


def baseline(cfg: DictConfig, with_curve: bool) -> Baseline:
    """Load and evaluate the BadNet, rank channels and trace the pruning curve, reusing the
    last result while the model and data files' contents and the settings are unchanged."""
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
    if key not in _baseline:
        _baseline.clear()  # hold one BadNet's data at a time
        badnet, validation, test, poisoned = load_inputs(cfg)
        layer = models.prunable_layer(badnet, cfg.model.layer).name
        _baseline[key] = Baseline(badnet, validation, test, poisoned, layer, {})
    else:
        log.info("reusing the loaded BadNet, its data and baseline metrics (same files)")
    base = _baseline[key]
    if with_curve and base.curves is None:
        base.order = rank_channels(base.badnet, base.layer, base.validation.x, cfg.eval_batch_size)
        sets = {"val_acc": base.validation, "clean_acc": base.test}
        sets.update({f"asr/{t}": ds for t, ds in base.poisoned.items()})
        curve = pruning_curve(base.badnet, base.layer, base.order, sets, cfg.eval_batch_size)
        base.curves = curve.accuracy
        base.answers = Answers(  # the BadNet's classes, from the curve's k = 0 point
            curve.unpruned["clean_acc"],
            {t: curve.unpruned[f"asr/{t}"] for t in base.poisoned},
        )
    if not base.metrics:
        if base.curves is not None:
            base.metrics = curve_point(base.curves, 0, "badnet")
        else:
            answers = base.badnet_answers(cfg.eval_batch_size)
            base.metrics = stage_metrics(answers, base.test, base.poisoned, "badnet")
    return base


def curve_point(curves: dict[str, np.ndarray], k: int, stage: str) -> dict[str, float]:
    """A stage's metrics read off the pruning curve: the net with the first k channels
    removed is exactly what the curve evaluated at k, so it need not be evaluated again."""
    metrics = {
        f"{stage}/{name}": float(values[k]) for name, values in curves.items() if name != "val_acc"
    }
    shown = ", ".join(f"{key.split('/', 1)[1]}={v:.4f}" for key, v in metrics.items())
    log.info("%s: %s (from the pruning curve, %d channels removed)", stage, shown, k)
    return metrics


def load_inputs(cfg: DictConfig):
    """The BadNet and its data sets, checked against each other."""
    model = models.load_model(cfg.model.file, cfg.model.architecture, cfg.model.allow_unsafe)
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
    """Carry out one fine-pruning experiment and track it; return its metrics.

    Within a sweep (`parent_run_id` given) the run is logged as the parent's child, and
    with `sweep.resume` a point whose config already has a FINISHED run is skipped.
    """
    config.validate(cfg)
    if cfg.model.builder is None:
        require_inputs(
            cfg.model.file,
            [cfg.data.clean_validation, cfg.data.clean_test, *cfg.data.poisoned.values()],
            cfg.data.source,
        )
    out_dir = files.writable_dir(cfg.paths.output_dir, "paths.output_dir")
    experiment_id = tracking.prepare(
        cfg.tracking.uri, cfg.tracking.experiment, cfg.tracking.artifact_root
    )
    run_name = run_name or f"{cfg.model.name}-{cfg.prune.method.value}-{cfg.prune.sparsity:g}"
    fingerprint = sweep.config_hash(cfg)
    tags = {"config_hash": fingerprint}
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
    if cfg.model.builder == "demo":
        demo.ensure(Path(cfg.model.file).parent, seed=cfg.seed)
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
    activation = cfg.prune.method == config.PruneMethod.activation
    base = baseline(cfg, with_curve=activation)
    validation, test, poisoned, layer = base.validation, base.test, base.poisoned, base.layer
    batch = cfg.eval_batch_size
    metrics = dict(base.metrics)
    mlflow.log_metrics(metrics)
    train, holdout = data.split(validation, cfg.finetune.val_fraction, cfg.seed)
    detector = cfg.goodnet.detector.value
    goodnet.output_kind(base.badnet)  # refuses an output the GoodNet cannot combine, now
    if detector != "disagreement":
        goodnet.check_strip(cfg.goodnet.k, len(validation))

    if activation:
        tracking.log_steps({f"curve/{name}": values for name, values in base.curves.items()})
        if cfg.prune.max_acc_drop is None:
            k = channel_count(cfg.prune.sparsity, len(base.order))
        else:
            k = channels_within(base.curves["val_acc"], cfg.prune.max_acc_drop)
            log.info(
                "max_acc_drop=%g: %d channels keep validation accuracy within %.1f points",
                cfg.prune.max_acc_drop,
                k,
                100 * cfg.prune.max_acc_drop,
            )
        pruned = activation_prune(base.badnet, layer, base.order, k)
        figure = plots.curve_plot(base.curves, k, f"{cfg.model.name}: pruning curve of {layer}")
        mlflow.log_figure(figure, "curve.png")
        plots.close(figure)
    else:
        pruned = magnitude_prune(base.badnet, layer, cfg.prune.sparsity, cfg.prune.frequency)
    prune_metrics = {
        "prune/channels_pruned": len(pruned.channels_pruned),
        "prune/sparsity": pruned.sparsity,
    }
    if activation:
        prune_metrics.update(curve_point(base.curves, k, "pruned"))
    else:
        prune_metrics.update(evaluate(pruned.export(), test, poisoned, "pruned", batch))
    mlflow.log_metrics(prune_metrics)
    metrics.update(prune_metrics)

    seed_everything(cfg.seed)  # fine-tuning starts from the same RNG state, cache hit or not
    finetune(
        pruned.model,
        train,
        holdout,
        epochs=cfg.finetune.epochs,
        lr=cfg.finetune.lr,
        batch_size=cfg.finetune.batch_size,
        callbacks=pruned.callbacks,
        on_epoch=lambda epoch, values: mlflow.log_metrics(values, step=epoch),
    )
    repaired = pruned.export()
    repaired_answers = classify(repaired, test, poisoned, batch)
    final = stage_metrics(repaired_answers, test, poisoned, "repaired")
    mlflow.log_metrics(final)
    metrics.update(final)

    model_path = models.save_model(repaired, out_dir / "repaired_net.h5")
    mlflow.log_artifact(str(model_path))

    strip = strip_flags = None
    if detector != "disagreement":
        settings = (cfg.goodnet.k, cfg.goodnet.frr, cfg.goodnet.alpha, cfg.seed)
        strip, strip_flags = base.strip_detector(*settings)
    good = goodnet.build_goodnet(
        base.badnet, repaired, detector, alpha=cfg.goodnet.alpha, calibration=strip
    )
    # Scored by the GoodNet's rule on answers in hand, not by running it (k + 2 passes)
    answers = goodnet_answers(
        repaired_answers,
        good.num_classes,
        badnet=base.badnet_answers(batch) if detector != "strip" else None,
        strip_flags=strip_flags,
    )
    good_metrics = goodnet_scores(answers, test, poisoned, good.num_classes)
    if good.threshold is not None:
        good_metrics["goodnet/strip_threshold"] = good.threshold
    shown = ", ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in good_metrics.items())
    log.info("goodnet (%s): %s", good.detector, shown)
    mlflow.log_metrics(good_metrics)
    metrics.update(good_metrics)
    mlflow.log_artifact(str(goodnet.save_goodnet(good.model, out_dir / "goodnet.h5")))
    summary = {"metrics": metrics, "layer": layer, "pruned_channels": pruned.channels_pruned}
    mlflow.log_artifact(
        str(files.write_text(out_dir / "metrics.json", json.dumps(summary, indent=2)))
    )
    figure = plots.stage_plot(
        metrics,
        list(poisoned),
        f"{cfg.model.name}: {cfg.prune.method.value} "
        f"pruning of {layer} at {cfg.prune.sparsity:g}, "
        f"{cfg.finetune.epochs} epochs",
    )
    mlflow.log_figure(figure, "stages.png")
    plots.close(figure)
    log.info("done in %.0fs; repaired model: %s", time.perf_counter() - start, model_path)
    return metrics
