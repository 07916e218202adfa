"""Input-level detectors that judge an input by the BadNet's class on altered copies of it
(SCALE-UP's amplified copies, TeCo's corrupted ones): the copies as standard Keras layers,
so that one builder serves both the numpy scoring and the GoodNet's flag, which then
cannot disagree on what a copy is. The copies are deterministic: any noise is drawn once,
from the run's seed, and held in layer weights."""

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.defenses import goodnet
from badnet_repair.network import models, topology
from badnet_repair.network.predict import predict_classes

# copies(x, layers) -> the altered copies of the images x (batch, H, W, C), as tensors
Copies = Callable[[Any, "Layers"], list[Any]]


class Layers:
    """Fresh layer names under one prefix, and constants held in layer weights."""

    def __init__(self, x: Any, prefix: str):
        self.prefix, self.shape = prefix, tuple(int(d) for d in x.shape[1:])
        flat = keras.layers.Flatten(name=self.name("flat"))(x)
        zero = keras.layers.Dense(1, name=self.name("zero"))
        self.zero = zero(flat)  # (batch, 1) zeros, the input of every constant
        goodnet.constant(zero, [np.zeros((int(np.prod(self.shape)), 1)), np.zeros(1)])

    def name(self, what: str) -> str:
        return f"{self.prefix}{what}"

    def constant(self, values: np.ndarray, what: str) -> Any:
        """`values` (the image shape) as a tensor (batch, H, W, C), held in a bias."""
        size = int(np.prod(self.shape))
        layer = keras.layers.Dense(size, name=self.name(f"{what}_bias"))
        out = layer(self.zero)
        goodnet.constant(layer, [np.zeros((1, size)), np.reshape(values, -1)])
        return keras.layers.Reshape(self.shape, name=self.name(what))(out)

    def clip(self, t: Any, high: float, what: str) -> Any:
        """`t` clipped to the valid pixel range [0, high]."""
        return keras.layers.ReLU(max_value=high, name=self.name(f"{what}_clip"))(t)


def check_range(clean_x: np.ndarray, high: float, who: str) -> None:
    """Refuse clean images outside [0, `high`]: the copies are clipped to that range."""
    low, top = float(np.min(clean_x)), float(np.max(clean_x))
    if low < -1e-6 or top > high + 1e-6:
        raise UserError(
            f"goodnet.detector={who}: clean pixel values span [{low:.4g}, {top:.4g}], "
            f"outside [0, goodnet.pixel_max={high:g}] (set pixel_max to 255 x data.scale)"
        )


def stack(copies: list[Any], shape: tuple[int, ...], name: str) -> Any:
    """The copies as one tensor (batch, m, H, W, C)."""
    each = [keras.layers.Reshape((1, *shape), name=f"{name}_{i}")(c) for i, c in enumerate(copies)]
    return each[0] if len(each) == 1 else keras.layers.Concatenate(axis=1, name=name)(each)


def copies_model(badnet: keras.Model, make: Copies, prefix: str) -> keras.Model:
    """A model from images to their copies (batch, m, H, W, C), for numpy scoring."""
    shape = models.input_shape(badnet)
    x = keras.Input(shape)
    return keras.Model(x, stack(make(x, Layers(x, prefix)), shape, f"{prefix}copies"))


def classes_of_copies(
    badnet: keras.Model, copier: keras.Model, x: np.ndarray, batch_size: int, chunk: int = 128
) -> np.ndarray:
    """The BadNet's class on every copy of every image: (n, m), by exact argmax."""
    out = []
    for i in range(0, len(x), chunk):
        copies = copier(x[i : i + chunk], training=False).numpy()
        n, m = copies.shape[:2]
        flat = copies.reshape(n * m, *copies.shape[2:])
        out.append(predict_classes(badnet, flat, batch_size).reshape(n, m))
    return np.concatenate(out) if out else np.empty((0, copier.output_shape[1]), np.int64)


def agreement(graph: goodnet.Graph, make: Copies, prefix: str) -> Any:
    """Inside the GoodNet: 1 where the BadNet's class on a copy is its class on the input,
    (batch, m)."""
    layers = Layers(graph.x, f"gn_{prefix}")
    copies = stack(make(graph.x, layers), layers.shape, layers.name("copies"))
    scores = topology.replay(graph.badnet, copies, f"{prefix}bad_", distributed=True)
    on_copies = goodnet.one_hot(scores, layers.name("copies_onehot"))
    on_input = goodnet.one_hot(graph.badnet_probs, layers.name("input_onehot"))
    return keras.layers.Dot(axes=(2, 1), name=layers.name("agree"))([on_copies, on_input])


def content(x: np.ndarray) -> tuple:
    """A memo key for images: their shape and a hash of their bytes (one name may be
    given to other images)."""
    return (x.shape, hashlib.sha1(np.ascontiguousarray(x)).hexdigest())


def dense(t: Any, kernel: np.ndarray, bias: np.ndarray, name: str) -> Any:
    """A fixed linear map of `t` (batch, d): t @ kernel + bias."""
    layer = keras.layers.Dense(np.shape(kernel)[1], name=name)
    out = layer(t)
    goodnet.constant(layer, [np.asarray(kernel), np.asarray(bias)])
    return out


def count_above(count: Any, cut: float, name: str) -> Any:
    """1 where the whole number `count` (batch, 1) exceeds `cut`, decided at floor(cut) +
    0.5, half way between two whole numbers: no float near-tie."""
    return goodnet.step(count, float(np.floor(cut + 1e-6)) + 0.5, name)
