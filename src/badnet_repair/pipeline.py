"""The fine-pruning experiment: load, evaluate, prune, evaluate, fine-tune, evaluate, log.

`run` is the only function that reads the config; every stage it calls takes plain
arguments, so each can be used and tested on its own.
"""

import json
import logging
import time
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
from omegaconf import DictConfig, OmegaConf

from badnet_repair import UserError, config, data, demo, files, models, plots, sweep, tracking
from badnet_repair.evaluate import evaluate, objective
from badnet_repair.finetune import finetune, seed_everything
from badnet_repair.pruning import activation_prune, magnitude_prune

log = logging.getLogger(__name__)


def require_inputs(model_file: str, data_files: list[str], source: str | None) -> None:
    """Stop before any work when input files are missing, naming each and where to get it."""
    missing = [f for f in [model_file, *data_files] if not Path(f).is_file()]
    if missing:
        where = f"; published at {source}" if source else ""
        raise UserError(f"missing input files: {', '.join(missing)}{where}")


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
    badnet, validation, test, poisoned = load_inputs(cfg)
    layer = models.prunable_layer(badnet, cfg.model.layer).name
    batch = cfg.eval_batch_size

    metrics = evaluate(badnet, test, poisoned, "badnet", batch)
    mlflow.log_metrics(metrics)

    if cfg.prune.method == config.PruneMethod.activation:
        pruned = activation_prune(badnet, layer, validation.x, cfg.prune.sparsity, batch)
    else:
        pruned = magnitude_prune(badnet, layer, cfg.prune.sparsity, cfg.prune.frequency)
    prune_metrics = {
        "prune/channels_pruned": len(pruned.channels_pruned),
        "prune/sparsity": pruned.sparsity,
    }
    prune_metrics.update(evaluate(pruned.export(), test, poisoned, "pruned", batch))
    mlflow.log_metrics(prune_metrics)
    metrics.update(prune_metrics)

    train, holdout = data.split(validation, cfg.finetune.val_fraction, cfg.seed)
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
    final = evaluate(repaired, test, poisoned, "repaired", batch)
    mlflow.log_metrics(final)
    metrics.update(final)

    model_path = models.save_model(repaired, out_dir / "repaired_net.h5")
    mlflow.log_artifact(str(model_path))
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
    plt.close(figure)
    log.info("done in %.0fs; repaired model: %s", time.perf_counter() - start, model_path)
    return metrics
