"""The one place where models are scored on the evaluation sets (the clean test set and
the poisoned sets), as stages of a run: the BadNet, whatever a repair handed back, the
repaired net, the GoodNet.

Repairs and detectors never see these sets: they hand back nets (`repairs.Stage`,
`repairs.Series`) that are scored here after the repair has returned, and log what they
measured on clean data to the run's `Journal`, which this report writes to as well.
"""

import logging

import numpy as np

from badnet_repair import plots
from badnet_repair.data import Dataset
from badnet_repair.defenses.clean import Memo
from badnet_repair.defenses.repairs import Series, Stage
from badnet_repair.experiment.evaluate import Answers, classify, stage_metrics
from badnet_repair.journal import Journal

log = logging.getLogger(__name__)


class Report:
    def __init__(
        self, test: Dataset, poisoned: dict[str, Dataset], batch_size: int, journal: Journal
    ):
        self._test, self._poisoned, self.batch_size = test, poisoned, batch_size
        self.journal = journal
        self.triggers = list(poisoned)
        self.stages: list[str] = []  # in the order they were scored, for stages.png

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

    def handed(self, handed: list[Stage | Series], memo: Memo) -> None:
        """Score what a repair handed back, in order; a series once per BadNet (`memo`)."""
        for item in handed:
            if isinstance(item, Stage):
                self.stage(item.name, item.model)
            else:
                self._series(item, memo)

    def _series(self, series: Series, memo: Memo) -> None:
        scored = memo.shared(("scored", series.key), lambda: self._score_each(series))
        self.journal.curves({f"{series.name}/{key}": values for key, values in scored.items()})
        at = {key: values[series.at] for key, values in scored.items()}
        self.stage_from(series.stage, at, series.how)
        figure = plots.curve_plot({**series.own, **scored}, series.at, series.title)
        self.journal.figure(figure, series.figure)

    def _score_each(self, series: Series) -> dict[str, np.ndarray]:
        scores = {"clean_acc": series.accuracy_on(self._test)}
        scores.update({f"asr/{t}": series.accuracy_on(ds) for t, ds in self._poisoned.items()})
        return scores

    def _logged_stage(self, name: str, metrics: dict[str, float]) -> dict[str, float]:
        self.journal.log(metrics)
        if name not in self.stages:
            self.stages.append(name)
        return metrics
