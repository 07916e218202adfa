"""The run's inputs: the BadNet and its data sets, checked against each other and
against the config before any heavy work, and kept in memory for the next run over
the same files (the points of a sweep)."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import tf_keras as keras
from omegaconf import DictConfig

from badnet_repair import UserError, data, files
from badnet_repair.defenses.clean import CleanData, Memo
from badnet_repair.experiment.evaluate import Answers, classify
from badnet_repair.network import models, topology
from badnet_repair.zoo import builds

log = logging.getLogger(__name__)

MIN_HOLDOUT = 10  # clean held-out images; fewer make every choice on them noise


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

    def clean(self, holdout: float, seed: int) -> tuple[CleanData, Memo]:
        """The defender's data: the validation set and its seeded split; with it, what the
        repairs and detectors of every run on that split share (a value computed on one
        split is not another's)."""
        if (holdout, seed) not in self.splits:
            train, held = data.split(self.validation, holdout, seed)
            if len(held) < MIN_HOLDOUT or len(train) < MIN_HOLDOUT:
                raise UserError(
                    f"config key data.holdout={holdout}: {len(held)} held-out and "
                    f"{len(train)} training images of {len(self.validation)}; expected at "
                    f"least {MIN_HOLDOUT} of each (the repairs choose on the held-out part)"
                )
            clean = CleanData(self.validation, train, held)
            self.splits[(holdout, seed)] = clean, Memo()
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
    answers = classify(badnet, test, poisoned, cfg.eval_batch_size)
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


def check_present(cfg: DictConfig) -> None:
    """Every input file the run names exists (a demo build's files may come later)."""
    paths = [cfg.model.file, cfg.data.clean_validation, cfg.data.clean_test]
    paths += list(cfg.data.poisoned.values())
    built = Path(cfg.model.file).parent if cfg.model.builder else None
    source = f"published at {cfg.data.source}" if cfg.data.source else None
    require_inputs([f for f in paths if Path(f).parent != built], source)


def build_if_needed(cfg: DictConfig) -> None:
    """Build a demo BadNet on first use, then require every input; and the defender's
    data apart from the test set."""
    paths = [cfg.model.file, cfg.data.clean_validation, cfg.data.clean_test]
    paths += list(cfg.data.poisoned.values())
    if cfg.model.builder:
        built = Path(cfg.model.file).parent
        builds.ensure(built, cfg.model.builder, cfg.model.build_scale)
        require_inputs(paths, f"not among the files the {cfg.model.builder} build made in {built}")
    require_separate(cfg.data.clean_validation, cfg.data.clean_test)
