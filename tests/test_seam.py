"""SEAM's mechanism on the two small nets of test_agnostic (without and with BatchNorm),
taught a five-class task here: forgetting with random labels takes the clean held-out
accuracy near chance and stops as soon as it is there; recovery with the true labels
brings it back, at the largest rate within the budget; the BadNet itself is untouched."""

import dataclasses

import mlflow
import numpy as np
import pytest
from test_agnostic import CLASSES, net, series, store  # noqa: F401 (fixtures)

from badnet_repair import data
from badnet_repair.defenses import budget
from badnet_repair.defenses.clean import CleanData
from badnet_repair.defenses.repairs import Case, Stage, seam
from badnet_repair.journal import Journal
from badnet_repair.network import training
from badnet_repair.network.predict import accuracy, correct

# every test over 3 s on 2 cores: each trains a net for hundreds of steps
pytestmark = pytest.mark.slow

SETTINGS = seam.Seam(
    batch_size=32,
    forget_lr=0.01,
    forget_steps=300,
    forget_until=1.5,  # 0.3 with five classes
    check_every=1,
    clip_norm=1.0,
    recover_steps=120,
    recover_lrs=[0.005, 0.01],
    momentum=0.9,
    weight_decay=5e-4,
    max_acc_drop=0.05,
    margin_se=1.0,
)
FLOOR = SETTINGS.forget_until / CLASSES


def task(shape: tuple, n: int, seed: int, name: str) -> data.Dataset:
    """Five classes, each a fixed random image (the same in every split) plus noise."""
    prototypes = np.random.default_rng(100).uniform(0, 1, (CLASSES, *shape))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = prototypes[y] + rng.normal(0, 0.3, (n, *shape))
    return data.Dataset(name, x.astype(np.float32), y)


@pytest.fixture
def case(net, store):  # noqa: F811
    """A Case over `net` once it has learnt the task, inside a real MLflow run."""
    uri, experiment = store
    mlflow.set_tracking_uri(uri)
    shape = net.input_shape[1:]
    train, holdout = task(shape, 320, 1, "train"), task(shape, 100, 2, "holdout")
    training.finetune(net, train, None, epochs=20, lr=0.01, batch_size=16)  # BN: 400 steps
    assert accuracy(net, holdout) >= 0.95
    everything = data.Dataset("validation", np.concatenate([train.x, holdout.x]), None)
    with mlflow.start_run(experiment_id=experiment):
        yield Case(net, "conv_b", CleanData(everything, train, holdout), Journal(), 0, 64)


def test_forgetting_takes_held_out_accuracy_near_chance_and_stops_as_soon_as_it_is(case):
    before = [w.copy() for w in case.badnet.get_weights()]
    forgotten = seam.forget(case, SETTINGS)
    reached = accuracy(forgotten, case.clean.holdout)
    steps = case.journal.metrics["seam/forget_steps"]
    assert reached <= FLOOR
    assert case.journal.metrics["seam/forgotten_val_acc"] == reached
    assert series("seam/forget/val_acc")[-1] == reached
    assert 1 <= steps < SETTINGS.forget_steps  # stopped by the rule, not by the bound
    # one step fewer, from the same seed, leaves it above the floor: it stopped at once
    shorter = dataclasses.replace(SETTINGS, forget_steps=steps - 1, forget_until=0.0)
    if steps > 1:
        assert accuracy(seam.forget(case, shorter), case.clean.holdout) > FLOOR
    for w, b in zip(case.badnet.get_weights(), before, strict=True):
        np.testing.assert_array_equal(w, b)  # the BadNet itself untouched


def test_forgetting_is_seeded(case):
    one, two = seam.forget(case, SETTINGS), seam.forget(case, SETTINGS)
    for a, b in zip(one.get_weights(), two.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    other = dataclasses.replace(case, seed=1)
    three = seam.forget(other, SETTINGS)
    pairs = zip(one.get_weights(), three.get_weights(), strict=True)
    assert any(not np.array_equal(a, b) for a, b in pairs)


def test_recovery_brings_the_held_out_accuracy_back_at_the_largest_rate_within_budget(case):
    repaired = seam.repair(case, SETTINGS)
    (stage,) = case.handed
    assert isinstance(stage, Stage) and stage.name == "forgotten"
    assert accuracy(stage.model, case.clean.holdout) <= FLOOR  # forgotten before recovery
    badnet = accuracy(case.badnet, case.clean.holdout)
    assert accuracy(repaired, case.clean.holdout) >= badnet - SETTINGS.max_acc_drop
    ladder = case.journal.notes["seam_ladder"]
    kept = case.journal.metrics["seam/lr"]
    right = correct(repaired, case.clean.holdout)
    assert budget.within_budget(
        case, right, SETTINGS.max_acc_drop, SETTINGS.margin_se, "kept", kept
    )
    # the strongest within: the ladder ran up to the kept rate and at most one past it
    tried = [float(v) for v in ladder]
    assert tried[: tried.index(kept) + 1] == [r for r in SETTINGS.recover_lrs if r <= kept]
    assert len(tried) == min(tried.index(kept) + 2, len(SETTINGS.recover_lrs))
