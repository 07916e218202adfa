"""One shared measurement for every stage: clean accuracy and attack success rate."""

import logging
import time
import weakref

import numpy as np
import tensorflow as tf

from badnet_repair import UserError, goodnet
from badnet_repair.data import Dataset

log = logging.getLogger(__name__)


_compiled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _argmax_fn(model):
    """One compiled argmax-of-forward-pass per model, reused across calls and data sets."""
    if model not in _compiled:
        _compiled[model] = tf.function(
            lambda b: tf.argmax(model(b, training=False), axis=-1), reduce_retracing=True
        )
    return _compiled[model]


def predict_classes(model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Argmax predictions through one compiled function (no Keras predict overhead)."""
    step = _argmax_fn(model)
    out = [step(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.empty(0, dtype=np.int64)


def accuracy(model, ds: Dataset, batch_size: int = 512) -> float:
    """Share of `ds` predicted as its label: clean accuracy, or ASR on a poisoned set."""
    return float(np.mean(predict_classes(model, ds.x, batch_size) == ds.y))


def evaluate(
    model, clean: Dataset, poisoned: dict[str, Dataset], stage: str, batch_size: int = 512
) -> dict[str, float]:
    """Metrics named as in the MLflow contract: `<stage>/clean_acc`, `<stage>/asr/<trigger>`."""
    start = time.perf_counter()
    metrics = {f"{stage}/clean_acc": accuracy(model, clean, batch_size)}
    for trigger, ds in poisoned.items():
        metrics[f"{stage}/asr/{trigger}"] = accuracy(model, ds, batch_size)
    n = len(clean) + sum(len(ds) for ds in poisoned.values())
    summary = ", ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in metrics.items())
    log.info("%s: %s (%d images, %.1fs)", stage, summary, n, time.perf_counter() - start)
    return metrics


def objective(metrics: dict[str, float], name: str, asr_ceiling: float) -> float:
    """What a hyperparameter search maximises, from a run's metrics.

    - `clean_acc_under_asr`: the repaired net's clean accuracy when its worst ASR is at
      most `asr_ceiling`; below every feasible value (by the excess ASR) otherwise.
    - `der`: defense effectiveness rating, (max(0, dASR) - max(0, dACC) + 1) / 2, with
      dASR the fall of the worst trigger's ASR and dACC the fall of clean accuracy.
    """
    asr = [v for k, v in metrics.items() if k.startswith("repaired/asr/")]
    badnet_asr = [v for k, v in metrics.items() if k.startswith("badnet/asr/")]
    worst = max(asr, default=0.0)
    if name == "der":
        d_asr = max(badnet_asr, default=0.0) - worst
        d_acc = metrics["badnet/clean_acc"] - metrics["repaired/clean_acc"]
        return (max(0.0, d_asr) - max(0.0, d_acc) + 1) / 2
    if worst <= asr_ceiling:
        return metrics["repaired/clean_acc"]
    return -(worst - asr_ceiling)


BLENDS_PER_BATCH = 4096  # images through the network per step, STRIP's blends included


def batch_size_for(model) -> int:
    """A batch that keeps a STRIP GoodNet's k blends per input within memory."""
    return max(1, min(512, BLENDS_PER_BATCH // (1 + goodnet.blends_per_input(model))))


def goodnet_metrics(
    model,
    clean: Dataset,
    poisoned: dict[str, Dataset],
    num_classes: int,
    batch_size: int | None = None,
) -> dict[str, float]:
    """Clean accuracy (answering N is wrong), clean flag rate, and per poisoned set the ASR
    (answered its label) and the detection rate (answered N)."""
    if int(model.output_shape[-1]) != num_classes + 1:
        raise UserError(
            f"goodnet: output of {model.output_shape[-1]} answers, expected {num_classes + 1} "
            f"for {num_classes} classes"
        )
    batch = batch_size or batch_size_for(model)
    blends = goodnet.blends_per_input(model)

    def answers_on(ds: Dataset) -> np.ndarray:
        if blends:  # STRIP: k + 2 forward passes per image, minutes at competition scale
            log.info(
                "goodnet: answering %d images of %s (%d blends each)", len(ds), ds.name, blends
            )
        return predict_classes(model, ds.x, batch)

    answers = answers_on(clean)
    metrics = {
        "goodnet/clean_acc": float(np.mean(answers == clean.y)),
        "goodnet/flag_rate_clean": float(np.mean(answers == num_classes)),
    }
    for trigger, ds in poisoned.items():
        answers = answers_on(ds)
        metrics[f"goodnet/asr/{trigger}"] = float(np.mean(answers == ds.y))
        metrics[f"goodnet/detect/{trigger}"] = float(np.mean(answers == num_classes))
    return metrics
