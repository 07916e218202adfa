"""The zoo's clean twins (each zoo recipe with its training set not poisoned) and the
held-back BadNets: what sets them apart, and which sweep runs each. The images are
generated for real at a tiny scale; the held nets are built and trained tiny."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from badnet_repair.network import models
from badnet_repair.zoo import builds as demo
from badnet_repair.zoo import recipes as zoo

ROOT = Path(__file__).resolve().parents[1]
TINY_SCALE = 0.02
PAIRS = list(zip(zoo.ZOO, zoo.TWINS, strict=True))


@pytest.mark.parametrize(("badnet", "twin"), PAIRS, ids=[t.name for t in zoo.TWINS])
def test_a_twin_is_its_badnets_recipe_with_nothing_poisoned(badnet, twin):
    assert twin == replace(badnet, name=f"{badnet.name}_clean", poison_rate=0.0)
    assert (twin.identities, twin.seed, twin.triggers) == (
        badnet.identities,
        badnet.seed,
        badnet.triggers,
    )
    images, poisoned = demo.generate(twin, TINY_SCALE), demo.generate(badnet, TINY_SCALE)
    assert set(images.poisoned_train.values()) == {0}
    assert sum(poisoned.poisoned_train.values()) > 0
    # The same validation, test and poisoned test images: the twin's "ASR" is measured on
    # exactly the images its BadNet's ASR is.
    for mine, theirs in ((images.validation, poisoned.validation), (images.test, poisoned.test)):
        for a, b in zip(mine, theirs, strict=True):
            np.testing.assert_array_equal(a, b)
    assert images.poisoned.keys() == poisoned.poisoned.keys()
    for name, (x, y) in images.poisoned.items():
        np.testing.assert_array_equal(x, poisoned.poisoned[name][0])
        np.testing.assert_array_equal(y, poisoned.poisoned[name][1])
    # The training sets differ exactly in the BadNet's poisoned images: the twin holds them
    # unstamped, with their true labels.
    (x, y), (x_bad, y_bad) = images.train, poisoned.train
    changed = np.flatnonzero(y != y_bad)
    assert len(changed) == sum(poisoned.poisoned_train.values())
    for trigger in twin.triggers:
        rows = changed[y_bad[changed] == trigger.target]
        assert len(rows) == poisoned.poisoned_train[trigger.name]
        np.testing.assert_array_equal(x_bad[rows], trigger.stamp(x[rows]))
    untouched = np.setdiff1d(np.arange(len(y)), changed)
    np.testing.assert_array_equal(x[untouched], x_bad[untouched])


@pytest.mark.parametrize("recipe", zoo.HELD, ids=[r.name for r in zoo.HELD])
def test_a_held_net_builds_tiny_without_batchnorm_and_with_a_trigger_of_its_own(tmp_path, recipe):
    folder = demo.ensure(tmp_path / recipe.name, recipe.name, TINY_SCALE)
    record = json.loads((folder / demo.RECORD_FILE).read_text())
    assert record["recipe"] == recipe.name and record["scale"] == TINY_SCALE
    assert set(record["asr"]) == {t.name for t in recipe.triggers}
    assert all(n > 0 for n in record["images"]["poisoned_train"].values())
    net = models.load_model(folder / demo.MODEL_FILE)
    assert net.input_shape[1:] == recipe.image_shape
    assert net.output_shape[-1] == recipe.num_classes
    assert not [layer for layer in net.layers if "Normalization" in type(layer).__name__]
    zoo_triggers = {t for r in zoo.ZOO for t in r.triggers}
    assert not zoo_triggers & set(recipe.triggers)


def test_the_held_nets_are_a_deepid_and_another_architecture():
    architectures = {(r.architecture, r.image_shape) for r in zoo.HELD}
    assert ("deepid", (55, 47, 3)) in architectures and len(architectures) == len(zoo.HELD)
    assert "vgg_bn" not in {r.architecture for r in zoo.HELD}


def swept_models(experiment: str) -> list[str]:
    """The models an experiment's sweep runs, as Hydra expands its `model` parameter."""
    params = OmegaConf.load(ROOT / "conf" / "experiment" / f"{experiment}.yaml").hydra.sweeper
    override = OverridesParser.create().parse_override(f"model={params.params.model}")
    options = sorted(path.stem for path in (ROOT / "conf" / "model").glob("*.yaml"))
    value = override.value()
    return sorted(value.filter(options) if hasattr(value, "filter") else value.list)


@pytest.mark.parametrize(
    ("experiment", "recipes"), [("zoo", zoo.ZOO), ("twins", zoo.TWINS), ("held", zoo.HELD)]
)
def test_each_sweep_runs_its_own_nets_in_its_own_experiment(experiment, recipes):
    assert swept_models(experiment) == sorted(r.name for r in recipes)
    cfg = OmegaConf.load(ROOT / "conf" / "experiment" / f"{experiment}.yaml")
    assert cfg.tracking.experiment == experiment and cfg.sweep.leaderboard is True
    for recipe in recipes:
        model = OmegaConf.load(ROOT / "conf" / "model" / f"{recipe.name}.yaml").model
        assert (model.name, model.builder) == (recipe.name, recipe.name)


def test_shaped_identities_are_the_layout_with_grey_ellipses_of_each_class():
    """demo_shapes's classes differ in shape alone: each prototype is the layout every
    class shares, except where its own ellipses are painted in one grey (dark or light)."""
    shapes = zoo.RECIPES["demo_shapes"]
    faces = shapes.identities
    assert isinstance(faces, zoo.ShapedIdentities) and faces.marks == 3
    assert shapes == replace(zoo.DEMO, name="demo_shapes", identities=faces, seed=8)
    prototypes = zoo.prototypes(np.random.default_rng(faces.seed), shapes)
    rng = np.random.default_rng(faces.seed)  # the layout is the stream's first draw
    layout = 0.75 * zoo._smooth_fields(rng, 1, faces.layout_grid, shapes.image_shape[:2])[0]
    marked = [np.any(face != layout, axis=-1) for face in prototypes]
    for face, where in zip(prototypes, marked, strict=True):
        assert 0.01 < where.mean() < 0.5  # a few ellipses, not the whole face
        assert set(np.unique(face[where])) <= {25.0, 230.0}  # grey: no colour of its own
    assert len({where.tobytes() for where in marked}) == shapes.num_classes  # all differ
