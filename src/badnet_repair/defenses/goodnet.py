"""GoodNet: the BadNet B and its repaired net B' in one model that answers N ("poisoned")
when any of its detectors flags the input, else B''s class (N = B's number of classes).
The detectors themselves are in `badnet_repair.defenses.detectors`.

The GoodNet's output is (batch, N + 1) and its argmax is the answer. It is built from
standard Keras layers only, constants (a detector's images, its threshold) held in layer
weights, so a plain TensorFlow install loads the saved `.h5` without this package and
without running any code stored in the file. Its own layers are named `gn_*`, the copies
of B and B' inside it `bad_*` and `repaired_*` (and a detector's copies its own prefix),
so no name collides. Hard decisions are made of smooth layers: argmax as a softmax of
probabilities scaled by 1e9, a step as a sigmoid of a difference scaled by 1e8; they
only differ from the exact rule on float near-ties.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.network import models, topology

log = logging.getLogger(__name__)

ONE_HOT_SCALE = 1e9  # probabilities 1 float32 ulp apart still differ by > 30 after scaling
STEP_SCALE = 1e8  # any nonzero float32 difference of scores saturates the sigmoid


@dataclass
class GoodNet:
    model: keras.Model
    detectors: list[str]
    num_classes: int


def constant(layer: keras.layers.Layer, weights: list[np.ndarray]) -> keras.layers.Layer:
    """Freeze a layer already called on its input and give it fixed weights."""
    layer.set_weights([np.asarray(w, dtype=np.float32) for w in weights])
    layer.trainable = False
    return layer


def step(t: Any, threshold: float, name: str, above: bool = True) -> Any:
    """A sharp 0/1 step: 1 where `t` (batch, 1) is above `threshold` (below if not `above`)."""
    sign = 1.0 if above else -1.0
    shift = keras.layers.Dense(1, name=f"{name}_diff")
    diff = shift(t)
    constant(shift, [np.full((1, 1), sign), np.array([-sign * threshold])])
    sharp = keras.layers.Rescaling(STEP_SCALE, name=f"{name}_sharp")(diff)
    return keras.layers.Activation("sigmoid", name=name)(sharp)


def one_hot(probs: Any, name: str) -> Any:
    """The argmax of `probs` as a hard one-hot vector."""
    scaled = keras.layers.Rescaling(ONE_HOT_SCALE, name=f"{name}_scaled")(probs)
    return keras.layers.Activation("softmax", name=name)(scaled)


def probabilities(model: keras.Model, x: Any, prefix: str) -> Any:
    """`model` replayed on `x`, with a softmax over its scores where it has none of its own."""
    out = topology.replay(model, x, prefix)
    if topology.output_kind(model) == "linear":
        out = keras.layers.Softmax(name=f"gn_{prefix}probs")(out)
    return out


class Graph:
    """What detectors build their flags from, each part made once: the input, the
    repaired net's probabilities and, when a detector asks, the BadNet's."""

    def __init__(self, badnet: keras.Model, repaired: keras.Model):
        self.badnet, self.repaired = badnet, repaired
        self.x = keras.Input(shape=models.input_shape(repaired), name="input")
        self.repaired_probs = probabilities(repaired, self.x, "repaired_")
        self._badnet_probs = None

    @property
    def badnet_probs(self) -> Any:
        if self._badnet_probs is None:
            self._badnet_probs = probabilities(self.badnet, self.x, "bad_")
        return self._badnet_probs


def build_goodnet(badnet: keras.Model, repaired: keras.Model, detectors: list) -> GoodNet:
    """Combine B and B' with fitted detectors (`detectors.fit`) into one GoodNet: N where
    any detector flags the input. Neither model is modified."""
    shape, n = models.input_shape(repaired), models.num_classes(repaired)
    if models.input_shape(badnet) != shape or models.num_classes(badnet) != n:
        raise UserError(
            f"goodnet: BadNet {badnet.input_shape} -> {models.num_classes(badnet)} classes and "
            f"repaired net {repaired.input_shape} -> {n} classes differ"
        )
    graph = Graph(badnet, repaired)
    flags = [detector.flag_layer(graph) for detector in detectors]
    flag = flags[0] if len(flags) == 1 else keras.layers.Maximum(name="gn_flag_any")(flags)
    keep_layer = keras.layers.Dense(1, name="gn_keep")
    keep = keep_layer(flag)
    constant(keep_layer, [np.full((1, 1), -1.0), np.ones(1)])  # 1 - flag
    answer = keras.layers.Multiply(name="gn_kept")([graph.repaired_probs, keep])
    out = keras.layers.Concatenate(name="gn_output")([answer, flag])
    names = [d.name for d in detectors]
    model = keras.Model(graph.x, out, name="goodnet_" + "_".join(names))
    model.trainable = False
    return GoodNet(model, names, n)


def blends_per_input(model: keras.Model) -> int:
    """STRIP's k for a GoodNet that holds overlays, else 0: each input costs k + 2 passes."""
    try:
        return int(model.get_layer("gn_strip_overlays_k").get_config()["target_shape"][0])
    except ValueError:
        return 0


def save_goodnet(model: keras.Model, path: str | Path) -> Path:
    """One self-contained model file (`.h5`), loadable by plain TensorFlow."""
    return models.save_model(model, path)


def load_goodnet(path: str | Path) -> keras.Model:
    """Load a saved GoodNet, refusing files whose layers would run stored code."""
    model = models.load_model(path)
    if len(model.outputs) != 1 or len(model.output_shape) != 2 or model.output_shape[-1] < 2:
        raise UserError(f"goodnet file {path}: expected one output of shape (batch, N + 1)")
    return model
