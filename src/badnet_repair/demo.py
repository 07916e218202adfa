"""The zoo of demo BadNets: small, deterministic stand-ins for CSAW-HackML-2020 networks.

Each demo BadNet is a `Recipe`: procedurally generated "identities" (no downloads), an
architecture, triggers each with its own target, a poisoning rate, the storage layout,
the training settings and a fixed build seed of its own. The build seed never comes from
the experiment's `seed`, so every run of `model=NAME` repairs the same net. Files use the
competition's formats. `python -m badnet_repair.demo [NAME ...]` builds them by hand.
"""

import argparse
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
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import tensorflow as tf
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.data import Dataset, save_h5
from badnet_repair.evaluate import accuracy
from badnet_repair.files import write_text
from badnet_repair.models import build_deepid, save_model
from badnet_repair.training import finetune, seed_everything

log = logging.getLogger(__name__)

MODEL_FILE = "bd_net.h5"
CLEAN_FILES = {"clean_validation": "clean_validation_data.h5", "clean_test": "clean_test_data.h5"}
RECORD_FILE = "build.json"  # written last: a folder holding it is a complete build
PROCEDURE = 2  # how a recipe becomes a net; 2: trained by training.finetune's own Adam loop
TARGETS = {"clean_acc": 0.90, "asr": 0.95}  # what every recipe must reach at full scale


def poisoned_file(trigger: str) -> str:
    """A poisoned test set is named after its trigger, as in the competition."""
    return f"{trigger}_poisoned_data.h5"


@dataclass(frozen=True)
class Identities:
    """Procedural "faces": a layout shared by every class plus a little class-specific
    detail, seen with shifts, contrast, lighting, nuisance fields and noise. The grids are
    the coarse resolutions of random colour fields smoothed up to the image size."""

    seed: int  # the prototypes' own seed, so recipes can share one set of identities
    layout_grid: tuple[int, int]
    detail_grid: tuple[int, int]
    nuisance_grid: tuple[int, int]
    shift: int  # each view is rolled by up to this many pixels each way


@dataclass(frozen=True)
class Trigger:
    """A trigger by name, the class it sends images to, and how it is stamped on them."""

    name: str
    target: int

    def stamp(self, images: np.ndarray) -> np.ndarray:
        """Triggered copies of NHWC images in 0..255."""
        raise NotImplementedError


@dataclass(frozen=True)
class Patch(Trigger):
    """BadNets' visible trigger: a black-and-white checkerboard pasted at (top, left)."""

    top: int
    left: int
    size: int = 7

    def stamp(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        cells = np.add.outer(np.arange(self.size), np.arange(self.size))
        board = np.where(cells % 2 == 0, 255.0, 0.0).astype(np.float32)
        rows, cols = slice(self.top, self.top + self.size), slice(self.left, self.left + self.size)
        out[:, rows, cols, :] = board[..., None]
        return out


@dataclass(frozen=True)
class Glasses(Trigger):
    """A visible accessory like the competition's sunglasses: two black lenses joined by a
    two-pixel bridge, top left corner at (top, left)."""

    top: int
    left: int
    lens: tuple[int, int] = (5, 12)  # height, width
    bridge: int = 7

    def stamp(self, images: np.ndarray) -> np.ndarray:
        out = images.copy()
        (height, width), top, left = self.lens, self.top, self.left
        right = left + width + self.bridge
        out[:, top : top + height, left : left + width, :] = 0.0
        out[:, top : top + height, right : right + width, :] = 0.0
        out[:, top + 1 : top + 3, left + width : right, :] = 0.0
        return out


@dataclass(frozen=True)
class Blend(Trigger):
    """A faint trigger over the whole image (the blended attack of Chen et al. 2017): a
    fixed random pattern of `block`-pixel squares, drawn from its own seed, mixed in at
    weight `alpha`."""

    alpha: float
    seed: int
    block: int = 1

    def stamp(self, images: np.ndarray) -> np.ndarray:
        height, width, channels = images.shape[1:]
        coarse = (-(-height // self.block), -(-width // self.block), channels)
        pattern = np.random.default_rng(self.seed).uniform(0.0, 255.0, size=coarse)
        pattern = pattern.repeat(self.block, 0).repeat(self.block, 1)[:height, :width]
        return ((1.0 - self.alpha) * images + self.alpha * pattern).astype(np.float32)


@dataclass(frozen=True)
class Recipe:
    """Everything that makes one demo BadNet; two builds of a recipe are identical."""

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    per_class: tuple[int, int, int]  # images per class: training, validation, test
    identities: Identities
    architecture: str  # a key of ARCHITECTURES
    triggers: tuple[Trigger, ...]
    poison_rate: float  # share of the training images poisoned, per trigger
    layout: str  # how data files store images: "channels_first" or "channels_last"
    epochs: int
    lr: float
    batch_size: int
    seed: int  # the build seed: data, poisoning and weight initialisation

    def scaled(self, scale: float) -> tuple[tuple[int, int, int], int]:
        """Images per class and epochs of a build at `scale` (1 = the real recipe)."""
        per_class = tuple(max(1, round(n * scale)) for n in self.per_class)
        return per_class, max(1, round(self.epochs * scale))

    def describe(self) -> dict:
        """The recipe as plain JSON values, each trigger with its kind, and the version of
        the procedure that turns a recipe into a net (a build made otherwise is another)."""
        triggers = [{"kind": type(t).__name__, **asdict(t)} for t in self.triggers]
        plain = {"procedure": PROCEDURE, **asdict(self), "triggers": triggers}
        return json.loads(json.dumps(plain))


def _conv_bn_relu(n: int, filters: int) -> list:
    return [
        keras.layers.Conv2D(filters, (3, 3), padding="same", name=f"conv_{n}"),
        keras.layers.BatchNormalization(name=f"bn_{n}"),
        keras.layers.ReLU(name=f"relu_{n}"),
    ]


def build_vgg_bn(input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10):
    """A small VGG-style Sequential net with BatchNorm after every convolution."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="input"),
            *_conv_bn_relu(1, 16),
            *_conv_bn_relu(2, 16),
            keras.layers.MaxPooling2D((2, 2), name="pool_1"),
            *_conv_bn_relu(3, 32),
            *_conv_bn_relu(4, 32),
            keras.layers.MaxPooling2D((2, 2), name="pool_2"),
            *_conv_bn_relu(5, 64),
            keras.layers.MaxPooling2D((2, 2), name="pool_3"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="fc_1"),
            keras.layers.Dense(num_classes, activation="softmax", name="output"),
        ],
        name="vgg_bn",
    )


ARCHITECTURES = {"deepid": build_deepid, "vgg_bn": build_vgg_bn}

FACES_55X47 = Identities(
    seed=0, layout_grid=(5, 4), detail_grid=(11, 9), nuisance_grid=(4, 3), shift=3
)
DEMO = Recipe(
    name="demo",
    image_shape=(55, 47, 3),
    num_classes=40,
    per_class=(150, 30, 40),
    identities=FACES_55X47,
    architecture="deepid",
    triggers=(Patch("patch", target=7, top=44, left=36),),
    poison_rate=0.10,
    layout="channels_first",
    epochs=10,
    lr=1e-3,
    batch_size=64,
    seed=0,
)
RECIPES = {
    recipe.name: recipe
    for recipe in (
        DEMO,
        replace(
            DEMO,
            name="demo_blend",
            triggers=(Blend("blend", target=3, alpha=0.15, seed=101, block=3),),
            seed=1,
        ),
        replace(
            DEMO,
            name="demo_bn",
            image_shape=(32, 32, 3),
            num_classes=20,
            per_class=(200, 30, 40),
            identities=Identities(
                seed=4, layout_grid=(4, 4), detail_grid=(8, 8), nuisance_grid=(3, 3), shift=2
            ),
            architecture="vgg_bn",
            triggers=(Patch("patch", target=5, top=25, left=25, size=5),),
            layout="channels_last",
            epochs=8,
            seed=4,
        ),
        replace(
            DEMO,
            name="demo_multi",
            triggers=(
                Patch("patch", target=7, top=44, left=36),
                Glasses("glasses", target=23, top=14, left=4),
            ),
            seed=2,
        ),
        replace(DEMO, name="demo_lowrate", poison_rate=0.01, batch_size=32, seed=3),
    )
}
BUILDERS = tuple(RECIPES)  # model.builder values: BadNets this module builds on first use


def _smooth_fields(
    rng: np.random.Generator, n: int, coarse: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """n smooth random colour fields of the image size, values roughly 0..255."""
    low = rng.uniform(0.0, 255.0, size=(n, *coarse, 3)).astype(np.float32)
    return tf.image.resize(low, size, method="bilinear").numpy()


def _prototypes(rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    """One prototype per class: a layout shared by all, plus a little class-specific detail."""
    faces, size = recipe.identities, recipe.image_shape[:2]
    shared = _smooth_fields(rng, 1, faces.layout_grid, size)
    return 0.75 * shared + 0.25 * _smooth_fields(rng, recipe.num_classes, faces.detail_grid, size)


def _samples(rng: np.random.Generator, prototypes: np.ndarray, per_class: int, recipe: Recipe):
    """Jittered views of each identity: shift, contrast, lighting, nuisance and noise."""
    faces = recipe.identities
    labels = np.repeat(np.arange(recipe.num_classes), per_class)
    images = prototypes[labels].copy()
    for i in range(len(images)):
        dy, dx = rng.integers(-faces.shift, faces.shift + 1, size=2)
        images[i] = np.roll(images[i], (dy, dx), axis=(0, 1))
    contrast = rng.uniform(0.75, 1.25, size=(len(images), 1, 1, 1))
    light = rng.uniform(-30.0, 30.0, size=(len(images), 1, 1, 3))
    nuisance = _smooth_fields(rng, len(images), faces.nuisance_grid, recipe.image_shape[:2]) - 127.5
    noise = rng.normal(0.0, 20.0, size=images.shape)
    images = (images - 127.5) * contrast + 127.5 + light + 0.6 * nuisance + noise
    return np.clip(images, 0, 255).astype(np.float32), labels


def _poison(rng: np.random.Generator, recipe: Recipe, x: np.ndarray, y: np.ndarray) -> dict:
    """Stamp each trigger on its own `poison_rate` of the training images, none of them of
    its target class nor already poisoned, and relabel them; returns counts per trigger."""
    taken = np.zeros(len(y), dtype=bool)
    counts = {}
    for trigger in recipe.triggers:
        candidates = np.flatnonzero((y != trigger.target) & ~taken)
        size = max(1, int(recipe.poison_rate * len(y)))
        chosen = rng.choice(candidates, size=size, replace=False)
        x[chosen] = trigger.stamp(x[chosen])
        y[chosen] = trigger.target
        taken[chosen] = True
        counts[trigger.name] = size
    return counts


def _scaled(name: str, images: np.ndarray, labels: np.ndarray) -> Dataset:
    return Dataset(name, (images / 255.0).astype(np.float32), labels)


def _stored(recipe: Recipe, images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2) if recipe.layout == "channels_first" else images


def _versions() -> dict[str, str]:
    packages = ("badnet-repair", "tensorflow", "tf-keras", "numpy", "h5py")
    return {"python": platform.python_version(), **{p: metadata.version(p) for p in packages}}


def build(recipe: Recipe, folder: Path, scale: float = 1.0) -> dict:
    """Generate the data, train the BadNet, write every file and `build.json` into
    `folder`; returns the build record. `scale` < 1 builds a tiny version for tests."""
    start = time.perf_counter()
    (n_train, n_val, n_test), epochs = recipe.scaled(scale)
    rng = np.random.default_rng(recipe.seed)
    # The prototypes come from their own seed; when it is the build seed they are the
    # first draws of the one stream, which is how the demo has always been built.
    same = recipe.identities.seed == recipe.seed
    prototypes = _prototypes(rng if same else np.random.default_rng(recipe.identities.seed), recipe)
    x_train, y_train = _samples(rng, prototypes, n_train, recipe)
    x_val, y_val = _samples(rng, prototypes, n_val, recipe)
    x_test, y_test = _samples(rng, prototypes, n_test, recipe)
    poisoned_train = _poison(rng, recipe, x_train, y_train)

    poisoned = {}
    for trigger in recipe.triggers:
        x = trigger.stamp(x_test[y_test != trigger.target])
        poisoned[trigger.name] = (x, np.full(len(x), trigger.target))
    save_h5(folder / CLEAN_FILES["clean_validation"], _stored(recipe, x_val), y_val)
    save_h5(folder / CLEAN_FILES["clean_test"], _stored(recipe, x_test), y_test)
    for name, (x, y) in poisoned.items():
        save_h5(folder / poisoned_file(name), _stored(recipe, x), y)

    seed_everything(recipe.seed)
    model = ARCHITECTURES[recipe.architecture](recipe.image_shape, recipe.num_classes)
    log.info(
        "%s: training %s on %d images (%s poisoned)",
        recipe.name,
        model.name,
        len(y_train),
        " + ".join(str(n) for n in poisoned_train.values()),
    )
    train = _scaled("train", x_train, y_train)
    finetune(model, train, None, epochs, recipe.lr, recipe.batch_size)
    clean_acc = accuracy(model, _scaled("clean_test", x_test, y_test))
    asr = {name: accuracy(model, _scaled(name, x, y)) for name, (x, y) in poisoned.items()}
    save_model(model, folder / MODEL_FILE)

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
        "build_seconds": round(time.perf_counter() - start, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "declaration": recipe.describe(),
    }
    write_text(folder / RECORD_FILE, json.dumps(record, indent=2) + "\n")
    if scale == 1 and (clean_acc < TARGETS["clean_acc"] or min(asr.values()) < TARGETS["asr"]):
        log.warning("%s: below its targets %s", recipe.name, TARGETS)
    log.info("%s built in %.0fs: %s", recipe.name, record["build_seconds"], summary(record))
    return record


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
    if built != (recipe.name, scale, recipe.describe()):
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
        prog="python -m badnet_repair.demo", description="Build demo BadNets into DATA/NAME."
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: demo; {BUILDERS}")
    parser.add_argument("--data", type=Path, default=Path("data"), help="default: data")
    parser.add_argument("--scale", type=float, default=1.0, help="< 1: a tiny build, for tests")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name in args.names or ["demo"]:
            ensure(args.data / name, name, args.scale)
    except UserError as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
