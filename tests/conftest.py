"""Shared fixtures: the demo BadNet is built once per test session (about a minute)."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import badnet_repair  # noqa: F401  (selects tf_keras before TensorFlow loads)
from badnet_repair import data
from badnet_repair.experiment import config, inputs
from badnet_repair.network import models
from badnet_repair.zoo import builds as demo
from badnet_repair.zoo import recipes as zoo

ROOT = config.project_root()
SHARED = Path(ROOT).parent / "shared" / "csaw-hackml-2020"

config.register()

# Tiny settings per repair for end-to-end tests; a repair without an entry runs at its defaults.
TINY = {
    "fine_pruning": ["finetune.epochs=1"],
    "magnitude": ["finetune.epochs=1"],
    "finetune": ["finetune.epochs=1"],
    "neural_cleanse": [
        "neural_cleanse.screen_rounds=1",
        "neural_cleanse.candidates=2",
        "neural_cleanse.references=4",
        "neural_cleanse.rounds=2",
        "neural_cleanse.round_batches=2",
        "finetune.epochs=1",
    ],
    "ft_sam": ["ft_sam.steps=5", "ft_sam.lrs=[0.01]"],
    "rnp": ["rnp.unlearn_steps=5", "rnp.mask_steps=5", "rnp.max_acc_drop=0.5"],
    "sau": ["sau.steps=3", "sau.eps=[0.05]", "sau.pgd_steps=2"],
}


@pytest.fixture(autouse=True)
def no_cached_badnet():
    """Every test starts with no BadNet cached in this process (sweep points share one),
    so that no result depends on which tests ran before it."""
    inputs._baseline.clear()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A fresh build per session; BADNET_REPAIR_TEST_DATA=DIR keeps one in DIR/demo across
    sessions while developing (the build is seeded, so it is the same demo)."""
    parent = os.environ.get("BADNET_REPAIR_TEST_DATA")
    folder = Path(parent) if parent else tmp_path_factory.mktemp("data")
    return demo.ensure(folder / "demo", "demo")


@pytest.fixture(scope="session")
def demo_model(demo_dir):
    return models.load_model(demo_dir / demo.MODEL_FILE)


@pytest.fixture(scope="session")
def demo_data(demo_dir):
    """(validation, test, poisoned) of the demo, as the pipeline loads them."""
    recipe = zoo.RECIPES["demo"]
    files = [*demo.CLEAN_FILES.values(), demo.poisoned_file("patch")]
    names = ("clean_validation", "clean_test", "poisoned_test")
    return tuple(
        data.load_h5(demo_dir / file, recipe.image_shape, recipe.num_classes, 1 / 255, name)
        for file, name in zip(files, names, strict=True)
    )


def compose_config(tmp_path, demo_dir, *overrides: str):
    """The run's config as Hydra composes it, with every location under `tmp_path`."""
    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                f"paths.root={tmp_path}",
                f"paths.data={demo_dir.parent}",
                f"paths.output_dir={tmp_path}/out",
                *overrides,
            ],
        )
