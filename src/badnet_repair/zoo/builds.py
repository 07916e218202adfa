"""Building the demo BadNets (the zoo's recipes, `badnet_repair.zoo.recipes`) into files.

A build turns a recipe into the competition's files and a trained net, deterministically
from the recipe's own build seed, never the experiment's `seed`, so every run of
`model=NAME` repairs the same net. It writes into a temporary folder renamed into place,
and a `build.json` record last. `python -m badnet_repair.zoo.builds [NAME ...]` builds by hand.

Training is deterministic on one machine but not across CPUs, so the zoo's trained nets
ship with the project (`zoo/trained/NAME.h5`, beside the build record they came from):
a full-scale build generates the images and copies the shipped net, and every machine
repairs the same weights. `--ship` stores a folder's net as the shipped one.
"""

import argparse
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

import numpy as np

from badnet_repair import UserError
from badnet_repair.data import Dataset, save_h5
from badnet_repair.files import write_text
from badnet_repair.network.models import load_model, save_model
from badnet_repair.network.predict import accuracy
from badnet_repair.network.training import finetune, seed_everything
from badnet_repair.zoo.recipes import (
    ARCHITECTURES,
    BUILDERS,
    RECIPES,
    Recipe,
    poison,
    prototypes,
    samples,
)

log = logging.getLogger(__name__)

MODEL_FILE = "bd_net.h5"
CLEAN_FILES = {"clean_validation": "clean_validation_data.h5", "clean_test": "clean_test_data.h5"}
RECORD_FILE = "build.json"  # written last: a folder holding it is a complete build
PROCEDURE = 2  # how a recipe becomes a net; 2: trained by training.finetune's own Adam loop
TARGETS = {"clean_acc": 0.90, "asr": 0.95}  # what every BadNet must reach at full scale
TRAINED = Path(__file__).resolve().parent / "trained"  # the zoo's nets, shipped


def poisoned_file(trigger: str) -> str:
    """A poisoned test set is named after its trigger, as in the competition."""
    return f"{trigger}_poisoned_data.h5"


def _scaled(name: str, images: np.ndarray, labels: np.ndarray) -> Dataset:
    return Dataset(name, (images / 255.0).astype(np.float32), labels)


def _stored(recipe: Recipe, images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2) if recipe.layout == "channels_first" else images


def _versions() -> dict[str, str]:
    packages = ("badnet-repair", "tensorflow", "tf-keras", "numpy", "h5py")
    return {"python": platform.python_version(), **{p: metadata.version(p) for p in packages}}


class Images(NamedTuple):
    """A build's images (NHWC, 0..255) and labels, before any file or net is made."""

    train: tuple[np.ndarray, np.ndarray]  # poisoned as the recipe says
    validation: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    poisoned: dict[str, tuple[np.ndarray, np.ndarray]]  # per trigger: stamped test images
    poisoned_train: dict[str, int]  # per trigger: training images stamped and relabelled


def generate(recipe: Recipe, scale: float = 1.0) -> Images:
    """Every image of a build, from the recipe's own seeds alone. The training set is
    poisoned after the test set is drawn, so a clean twin (poison rate 0) shares its
    BadNet's validation, test and poisoned test images, and its unpoisoned training set."""
    n_train, n_val, n_test = recipe.scaled(scale)[0]
    rng = np.random.default_rng(recipe.seed)
    # The prototypes come from their own seed; when it is the build seed they are the
    # first draws of the one stream, which is how the demo has always been built.
    same = recipe.identities.seed == recipe.seed
    faces = prototypes(rng if same else np.random.default_rng(recipe.identities.seed), recipe)
    x_train, y_train = samples(rng, faces, n_train, recipe)
    validation = samples(rng, faces, n_val, recipe)
    x_test, y_test = samples(rng, faces, n_test, recipe)
    poisoned_train = poison(rng, recipe, x_train, y_train)
    poisoned = {}
    for trigger in recipe.triggers:
        x = trigger.stamp(x_test[y_test != trigger.target])
        poisoned[trigger.name] = (x, np.full(len(x), trigger.target))
    return Images((x_train, y_train), validation, (x_test, y_test), poisoned, poisoned_train)


def build(recipe: Recipe, folder: Path, scale: float = 1.0) -> dict:
    """Generate the data, train the BadNet, write every file and `build.json` into
    `folder`; returns the build record. `scale` < 1 builds a tiny version for tests."""
    start = time.perf_counter()
    epochs = recipe.scaled(scale)[1]
    images = generate(recipe, scale)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = images[:3]
    poisoned, poisoned_train = images.poisoned, images.poisoned_train
    save_h5(folder / CLEAN_FILES["clean_validation"], _stored(recipe, x_val), y_val)
    save_h5(folder / CLEAN_FILES["clean_test"], _stored(recipe, x_test), y_test)
    for name, (x, y) in poisoned.items():
        save_h5(folder / poisoned_file(name), _stored(recipe, x), y)

    digests = _digests(folder, recipe)
    shipped = _shipped(recipe, digests) if scale == 1 else None
    if shipped:
        shutil.copyfile(TRAINED / f"{recipe.name}.h5", folder / MODEL_FILE)
        model = load_model(folder / MODEL_FILE)
    else:
        seed_everything(recipe.seed)
        model = ARCHITECTURES[recipe.architecture](recipe.image_shape, recipe.num_classes)
        log.info(
            "%s: training %s on %d images (%s poisoned)",
            recipe.name,
            model.name,
            len(y_train),
            " + ".join(str(n) for n in poisoned_train.values()),
        )
        finetune(
            model, _scaled("train", x_train, y_train), None, epochs, recipe.lr, recipe.batch_size
        )
        save_model(model, folder / MODEL_FILE)
    clean_acc = accuracy(model, _scaled("clean_test", x_test, y_test))
    asr = {name: accuracy(model, _scaled(name, x, y)) for name, (x, y) in poisoned.items()}

    record = {
        "recipe": recipe.name,
        "build_seed": recipe.seed,
        "scale": scale,
        "clean_acc": clean_acc,
        "asr": asr,
        "images": {
            "train": len(y_train),
            "poisoned_train": poisoned_train,
            "validation": len(y_val),
            "test": len(y_test),
            "poisoned_test": {name: len(y) for name, (_, y) in poisoned.items()},
        },
        "epochs": epochs,
        "weights": f"shipped: zoo/trained/{recipe.name}.h5, trained {shipped['built']}"
        if shipped
        else "trained in this build",
        "data_sha256": digests,
        "build_seconds": round(time.perf_counter() - start, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "declaration": declaration(recipe),
    }
    write_text(folder / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    asr_low = recipe.poison_rate > 0 and min(asr.values()) < TARGETS["asr"]  # twins: no target
    if scale == 1 and (clean_acc < TARGETS["clean_acc"] or asr_low):
        log.warning("%s: below its targets %s", recipe.name, TARGETS)
    log.info("%s built in %.0fs: %s", recipe.name, record["build_seconds"], summary(record))
    return record


def _digests(folder: Path, recipe: Recipe) -> dict[str, str]:
    """SHA-256 of each data file: the images a shipped net was measured on."""
    files = [f for f in expected_files(recipe) if f != MODEL_FILE]
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in files}


def _shipped(recipe: Recipe, digests: dict[str, str]) -> dict | None:
    """The shipped net's build record, if one ships for this recipe as it is now."""
    record_path = TRAINED / f"{recipe.name}.json"
    if not record_path.is_file() or not (TRAINED / f"{recipe.name}.h5").is_file():
        return None
    record = json.loads(record_path.read_text())
    if record["declaration"] != declaration(recipe):
        log.warning("%s: the shipped net is of another recipe: training one here", recipe.name)
        return None
    if record["data_sha256"] != digests:
        log.warning(
            "%s: this machine generates other images than those the shipped net was "
            "measured on (%s): its scores here may differ from the documented ones",
            recipe.name,
            ", ".join(f for f in digests if digests[f] != record["data_sha256"].get(f)),
        )
    log.info("%s: using the shipped net (%s)", recipe.name, summary(record))
    return record


def ship(folder: Path, recipe: Recipe) -> None:
    """Store the full-scale build in `folder` as the recipe's shipped net."""
    record = json.loads((folder / RECORD_FILE).read_text())
    if (record["scale"], record["declaration"]) != (1, declaration(recipe)):
        raise UserError(f"{folder}: not a full-scale build of this version's {recipe.name}")
    record["data_sha256"] = _digests(folder, recipe)
    TRAINED.mkdir(exist_ok=True)
    shutil.copyfile(folder / MODEL_FILE, TRAINED / f"{recipe.name}.h5")
    write_text(TRAINED / f"{recipe.name}.json", json.dumps(record, indent=2) + "\n")
    log.info("%s: shipped the net of %s (%s)", recipe.name, folder, summary(record))


def declaration(recipe: Recipe) -> dict:
    """What a build record holds of its recipe: the recipe, and the procedure that turned
    it into a net (a build made otherwise is another net)."""
    return {"procedure": PROCEDURE, **recipe.describe()}


def summary(record: dict) -> str:
    """A build's measured figures in one phrase."""
    asr = ", ".join(f"{name} {value:.4f}" for name, value in record["asr"].items())
    return f"build seed {record['build_seed']}, clean accuracy {record['clean_acc']:.4f}, ASR {asr}"


def expected_files(recipe: Recipe) -> list[str]:
    return [MODEL_FILE, *CLEAN_FILES.values(), *(poisoned_file(t.name) for t in recipe.triggers)]


def _checked(folder: Path, recipe: Recipe, scale: float) -> Path:
    """An existing folder, used only if it is a complete build of this recipe at `scale`."""
    delete = f"delete {folder} to rebuild it"
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        missing = [f for f in expected_files(recipe) if not (folder / f).is_file()]
        if missing:
            raise UserError(
                f"{folder}: not a complete {recipe.name} build (no {', '.join(missing)}); {delete}"
            )
        log.warning(
            "%s: a %s build from before build records (no %s): its seed is that of the run "
            "that first needed it, not known; %s with build seed %d",
            folder,
            recipe.name,
            RECORD_FILE,
            delete,
            recipe.seed,
        )
        return folder
    try:
        record = json.loads(record_path.read_text())
        built = (record["recipe"], record["scale"], record["declaration"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{record_path}: unreadable build record ({e}); {delete}") from None
    if built != (recipe.name, scale, declaration(recipe)):
        raise UserError(
            f"{folder}: holds a build of {built[0]} at scale {built[1]}, not of this "
            f"version's {recipe.name} recipe at scale {scale}; {delete}"
        )
    log.info("%s: using the %s build in %s (%s)", recipe.name, recipe.name, folder, summary(record))
    return folder


_PARTIAL = re.compile(r"-build-(\d+)@(.+)-[^-]+$")


def _remove_abandoned(folder: Path) -> None:
    """Delete partial builds left in `folder`'s parent by dead processes on this host."""
    for partial in folder.parent.glob(f".{folder.name}-build-*"):
        found = _PARTIAL.search(partial.name)
        if not found or found[2] != socket.gethostname():
            continue
        try:
            os.kill(int(found[1]), 0)
        except ProcessLookupError:
            log.info("removing %s, a build interrupted before it finished", partial)
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass  # another user's process, alive


def ensure(folder: str | Path, recipe: str = "demo", scale: float = 1.0) -> Path:
    """Build the named demo BadNet into `folder` once, and say which build is used.

    The build happens in a temporary sibling folder renamed into place at the end, so an
    interrupted build never leaves a folder that looks finished, and two processes racing
    to build it both end up with one complete copy.
    """
    if recipe not in RECIPES:
        raise UserError(f"demo BadNet {recipe!r}: expected one of {', '.join(BUILDERS)}")
    folder, chosen = Path(folder), RECIPES[recipe]
    if folder.is_dir():
        return _checked(folder, chosen, scale)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(folder)
    prefix = f".{folder.name}-build-{os.getpid()}@{socket.gethostname()}-"
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        log.info("building the demo BadNet %s into %s (first use only)", recipe, folder)
        build(chosen, work, scale)
        try:
            os.rename(work, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _checked(folder, chosen, scale)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m badnet_repair.zoo.builds", description="Build demo BadNets into DATA/NAME."
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: demo; {BUILDERS}")
    parser.add_argument("--data", type=Path, default=Path("data"), help="default: data")
    parser.add_argument("--scale", type=float, default=1.0, help="< 1: a tiny build, for tests")
    parser.add_argument("--ship", action="store_true", help="store each build's net as shipped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in args.names or ["demo"]:
            ensure(args.data / name, name, args.scale)
            if args.ship:
                ship(args.data / name, RECIPES[name])
    except UserError as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
