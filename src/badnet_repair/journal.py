"""What a run records besides scores: metrics, per-step series, figures, tables, tags and
notes, logged to the active MLflow run and kept for `metrics.json`.

A repair or detector writes what it measured on clean data here. It holds no data set,
so nothing written through it can have read the test or poisoned sets.
"""

import time
from collections.abc import Sequence
from typing import Any

import mlflow
from mlflow.entities import Metric

from badnet_repair import plots


class Journal:
    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix  # before every name written through this journal
        self.metrics: dict[str, float] = {}  # results: metrics.json, sweep tables, objective
        self.series: set[str] = set()  # names logged per step (a series' last value is no result)
        self.notes: dict[str, Any] = {}

    def prefixed(self, prefix: str) -> "Journal":
        """A view writing into this journal's run and records with every name under
        `prefix`: a chain's steps (`fine_pruning/`) log the same names without clashing."""
        view = Journal(self.prefix + prefix)
        view.metrics, view.series, view.notes = self.metrics, self.series, self.notes
        return view

    def _named(self, values: dict[str, Any]) -> dict[str, Any]:
        return {self.prefix + name: value for name, value in values.items()}

    def log(self, metrics: dict[str, float]) -> None:
        """Results of the run, logged once each."""
        metrics = self._named(metrics)
        mlflow.log_metrics(metrics)
        self.metrics.update(metrics)

    def step(self, step: int, values: dict[str, float]) -> None:
        """One step of per-step series (an epoch's loss and held-out accuracy)."""
        values = self._named(values)
        mlflow.log_metrics(values, step=step)
        self.series.update(values)

    def curves(self, values: dict[str, Sequence[float]]) -> None:
        """Whole series at once: value i of each at step i, in batches of 1,000."""
        values = self._named(values)
        now = int(time.time() * 1000)
        metrics = [
            Metric(name, float(value), now, step)
            for name, series in values.items()
            for step, value in enumerate(series)
        ]
        run_id = mlflow.active_run().info.run_id
        for i in range(0, len(metrics), 1000):
            mlflow.MlflowClient().log_batch(run_id, metrics=metrics[i : i + 1000])
        self.series.update(values)

    def figure(self, figure, name: str) -> None:
        mlflow.log_figure(figure, self.prefix + name)
        plots.close(figure)

    def text(self, text: str, name: str) -> None:
        """A text artifact of the run (a table as CSV, ...)."""
        mlflow.log_text(text, self.prefix + name)

    def tags(self, tags: dict[str, str]) -> None:
        """Short facts to filter runs by in the UI (`neural_cleanse.flagged`: `7`)."""
        mlflow.set_tags(self._named(tags))

    def note(self, **values: Any) -> None:
        """Facts for metrics.json beside the metrics (which channels were pruned, ...)."""
        self.notes.update(self._named(values))
