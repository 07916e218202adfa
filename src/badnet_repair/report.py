"""What one run records: MLflow metrics, per-step series, figures, and notes for
`metrics.json`; and the one place where models are scored on the evaluation sets.

Repairs never see the clean test or poisoned sets. They hand the report a model (or a
function of a data set, for a series of models such as a pruning curve) and get its
scores back, logged under the stage's name. Their own choices read clean validation
data only; the scores are for the record.
"""

import logging
from collections.abc import Callable, Sequence
from typing import Any

import mlflow
import numpy as np

from badnet_repair import plots, tracking
from badnet_repair.data import Dataset
from badnet_repair.evaluate import Answers, classify, stage_metrics

log = logging.getLogger(__name__)


class Report:
    def __init__(self, test: Dataset, poisoned: dict[str, Dataset], batch_size: int):
        self._test, self._poisoned, self.batch_size = test, poisoned, batch_size
        self.triggers = list(poisoned)
        self.metrics: dict[str, float] = {}  # results: metrics.json, sweep tables, objective
        self.series: set[str] = set()  # names logged per step (a series' last value is no result)
        self.stages: list[str] = []  # in the order they were scored, for stages.png
        self.notes: dict[str, Any] = {}

    def log(self, metrics: dict[str, float]) -> None:
        """Results of the run, logged once each."""
        mlflow.log_metrics(metrics)
        self.metrics.update(metrics)

    def step(self, step: int, values: dict[str, float]) -> None:
        """One step of per-step series (an epoch's loss and held-out accuracy)."""
        mlflow.log_metrics(values, step=step)
        self.series.update(values)

    def curves(self, values: dict[str, Sequence[float]]) -> None:
        """Whole series at once: value i of each at step i."""
        tracking.log_steps(values)
        self.series.update(values)

    def figure(self, figure, name: str) -> None:
        mlflow.log_figure(figure, name)
        plots.close(figure)

    def text(self, text: str, name: str) -> None:
        """A text artifact of the run (a table as CSV, ...)."""
        mlflow.log_text(text, name)

    def tags(self, tags: dict[str, str]) -> None:
        """Short facts to filter runs by in the UI (`neural_cleanse.flagged`: `7`)."""
        mlflow.set_tags(tags)

    def note(self, **values: Any) -> None:
        """Facts for metrics.json beside the metrics (which channels were pruned, ...)."""
        self.notes.update(values)

    def answers(self, model) -> Answers:
        """`model`'s classes on the evaluation sets (kept by the pipeline for the GoodNet)."""
        return classify(model, self._test, self._poisoned, self.batch_size)

    def stage(self, name: str, model=None, *, answers: Answers | None = None) -> dict[str, float]:
        """Score a model (or its answers) as stage `name`: `name/clean_acc` on the clean
        test set, `name/asr/<trigger>` on each poisoned set; logged, and returned."""
        answers = answers if answers is not None else self.answers(model)
        return self._logged_stage(name, stage_metrics(answers, self._test, self._poisoned, name))

    def stage_from(self, name: str, values: dict[str, float], how: str) -> dict[str, float]:
        """A stage scored otherwise (read off a curve): `values` keyed `clean_acc`, `asr/<t>`."""
        metrics = {f"{name}/{key}": float(v) for key, v in values.items()}
        shown = ", ".join(f"{key}={v:.4f}" for key, v in values.items())
        log.info("%s: %s (%s)", name, shown, how)
        return self._logged_stage(name, metrics)

    def _logged_stage(self, name: str, metrics: dict[str, float]) -> dict[str, float]:
        self.log(metrics)
        if name not in self.stages:
            self.stages.append(name)
        return metrics

    def score_each(self, per_set: Callable[[Dataset], np.ndarray]) -> dict[str, np.ndarray]:
        """`per_set(ds)` for each evaluation set, keyed `clean_acc` and `asr/<trigger>`:
        how a repair scores a series of models (a pruning curve) without seeing the sets."""
        scores = {"clean_acc": per_set(self._test)}
        scores.update({f"asr/{t}": per_set(ds) for t, ds in self._poisoned.items()})
        return scores
