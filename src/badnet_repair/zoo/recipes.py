"""The recipes of the demo BadNets: procedurally generated "identities" (no downloads),
triggers (`triggers`) each with its own target, architectures, the six recipes of the zoo, their
clean twins and the held-back nets. A recipe is declarative; `builds` turns one into
files and a trained net.
"""

import json
from dataclasses import asdict, dataclass, replace

import numpy as np
import tensorflow as tf
import tf_keras as keras

from badnet_repair.network import models
from badnet_repair.zoo.triggers import Blend, Glasses, Patch, Solid, Trigger


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
class ShapedIdentities(Identities):
    """Identities told apart by shape, not faint colour: each class is the shared layout
    with `marks` grey ellipses (dark or light, hard-edged) of its own place, size and tilt,
    and no colour detail of its own (`detail_grid` is not read). Built to ask whether the
    small universal triggers Neural Cleanse finds for every class of the colour-detail
    demos come from their data."""

    marks: int = 3


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
        """The recipe as plain JSON values, each trigger with its kind."""
        triggers = [{"kind": type(t).__name__, **asdict(t)} for t in self.triggers]
        return json.loads(json.dumps({**asdict(self), "triggers": triggers}))


def _conv(n: int, filters: int, batchnorm: bool) -> list:
    if not batchnorm:
        return [
            keras.layers.Conv2D(
                filters, (3, 3), padding="same", activation="relu", name=f"conv_{n}"
            )
        ]
    return [
        keras.layers.Conv2D(filters, (3, 3), padding="same", name=f"conv_{n}"),
        keras.layers.BatchNormalization(name=f"bn_{n}"),
        keras.layers.ReLU(name=f"relu_{n}"),
    ]


def _vgg(input_shape: tuple[int, int, int], num_classes: int, batchnorm: bool, name: str):
    """A small VGG-style Sequential net: 5 convolutions, 16-16-32-32-64 filters, each with
    BatchNorm and ReLU or (without BatchNorm) its own ReLU, 3 max-poolings, dense 128."""
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="input"),
            *_conv(1, 16, batchnorm),
            *_conv(2, 16, batchnorm),
            keras.layers.MaxPooling2D((2, 2), name="pool_1"),
            *_conv(3, 32, batchnorm),
            *_conv(4, 32, batchnorm),
            keras.layers.MaxPooling2D((2, 2), name="pool_2"),
            *_conv(5, 64, batchnorm),
            keras.layers.MaxPooling2D((2, 2), name="pool_3"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="fc_1"),
            keras.layers.Dense(num_classes, activation="softmax", name="output"),
        ],
        name=name,
    )


def build_vgg_bn(input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10):
    """The VGG-style net with BatchNorm after every convolution (`demo_bn`)."""
    return _vgg(input_shape, num_classes, batchnorm=True, name="vgg_bn")


def build_vgg(input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10):
    """The same net without BatchNorm: a second architecture that is not DeepID and has
    no normalisation statistics for a repair to lean on."""
    return _vgg(input_shape, num_classes, batchnorm=False, name="vgg")


ARCHITECTURES = {**models.ARCHITECTURES, "vgg_bn": build_vgg_bn, "vgg": build_vgg}

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
DEMO_BN = replace(
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
)
ZOO = (
    DEMO,
    replace(
        DEMO,
        name="demo_blend",
        triggers=(Blend("blend", target=3, alpha=0.15, seed=101, block=3),),
        seed=1,
    ),
    DEMO_BN,
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
    # Added after the defaults were fixed (never tuned on): the demo's trigger and net on
    # identities that differ in shape (`ShapedIdentities`).
    replace(
        DEMO,
        name="demo_shapes",
        identities=ShapedIdentities(
            seed=8, layout_grid=(5, 4), detail_grid=(11, 9), nuisance_grid=(4, 3), shift=3
        ),
        seed=8,
    ),
)
# Each zoo net built again from the same recipe, seed and identities without poisoning
# its training set: its poisoned test files, the same as its BadNet's, measure what the
# trigger alone does to a clean net (the baseline of ASR and of detectors' flag rates).
TWINS = tuple(replace(recipe, name=f"{recipe.name}_clean", poison_rate=0.0) for recipe in ZOO)
# BadNets whose recipes were chosen by someone other than whoever tuned the defaults, and
# kept out of that tuning: the defaults' test on nets they were not fitted to.
HELD = (
    replace(
        DEMO,
        name="held_1",
        identities=replace(FACES_55X47, seed=5),
        triggers=(Solid("trigger", target=17, top=4, left=6, size=(5, 5), colour=(255, 215, 0)),),
        poison_rate=0.08,
        seed=5,
    ),
    replace(
        DEMO_BN,
        name="held_2",
        identities=replace(DEMO_BN.identities, seed=6),
        architecture="vgg",
        triggers=(Solid("trigger", target=12, top=13, left=1, size=(4, 3), colour=(0, 230, 255)),),
        epochs=10,
        seed=6,
    ),
)
RECIPES = {recipe.name: recipe for recipe in (*ZOO, *TWINS, *HELD)}
ZOO_NAMES = tuple(recipe.name for recipe in ZOO)  # the zoo sweep's nets (+experiment=zoo)
BUILDERS = tuple(RECIPES)  # model.builder values: BadNets this module builds on first use


def _smooth_fields(
    rng: np.random.Generator, n: int, coarse: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """n smooth random colour fields of the image size, values roughly 0..255."""
    low = rng.uniform(0.0, 255.0, size=(n, *coarse, 3)).astype(np.float32)
    return tf.image.resize(low, size, method="bilinear").numpy()


def prototypes(rng: np.random.Generator, recipe: Recipe) -> np.ndarray:
    """One prototype per class: a layout shared by all, plus a little class-specific
    colour detail, or (`ShapedIdentities`) class-specific grey ellipses."""
    faces, size = recipe.identities, recipe.image_shape[:2]
    shared = _smooth_fields(rng, 1, faces.layout_grid, size)
    if isinstance(faces, ShapedIdentities):
        return _with_marks(rng, np.repeat(0.75 * shared, recipe.num_classes, axis=0), faces.marks)
    return 0.75 * shared + 0.25 * _smooth_fields(rng, recipe.num_classes, faces.detail_grid, size)


def _with_marks(rng: np.random.Generator, images: np.ndarray, marks: int) -> np.ndarray:
    """Each image with `marks` ellipses painted over it in one grey (dark or light): centres
    in the middle 70% of each side, half-axes 2.5 pixels to a fifth of that side, any tilt."""
    height, width = images.shape[1:3]
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    for image in images:
        for _ in range(marks):
            cy, cx = rng.uniform(0.15, 0.85, size=2) * (height, width)
            ry, rx = rng.uniform(2.5, 0.2 * height), rng.uniform(2.5, 0.2 * width)
            tilt, tone = rng.uniform(0.0, np.pi), rng.choice([25.0, 230.0])
            dy, dx = rows - cy, cols - cx
            along = (dy * np.cos(tilt) + dx * np.sin(tilt)) / ry
            across = (dx * np.cos(tilt) - dy * np.sin(tilt)) / rx
            image[along**2 + across**2 <= 1.0] = tone
    return images


def samples(rng: np.random.Generator, prototypes: np.ndarray, per_class: int, recipe: Recipe):
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
    mixed = np.empty(images.shape, np.float32)
    # a few hundred images at a time: the same values (each is its own pixel's sum), without
    # whole-set float64 temporaries (half a gigabyte each for the demo's training set)
    for part in (slice(i, i + 256) for i in range(0, len(images), 256)):
        shifted = (images[part] - 127.5) * contrast[part] + 127.5 + light[part]
        mixed[part] = np.clip(shifted + 0.6 * nuisance[part] + noise[part], 0, 255)
    return mixed, labels


def poison(rng: np.random.Generator, recipe: Recipe, x: np.ndarray, y: np.ndarray) -> dict:
    """Stamp each trigger on its own `poison_rate` of the training images, none of them of
    its target class nor already poisoned, and relabel them; returns counts per trigger.
    A clean twin's rate, 0, poisons nothing."""
    if recipe.poison_rate == 0:
        return {trigger.name: 0 for trigger in recipe.triggers}
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
