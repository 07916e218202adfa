"""Per-channel masks on a plain tf_keras model, across every convolution (and, asked
for, every hidden Dense layer: its units are channels too).

Every conv's output channels carry one mask value. With no BatchNorm after it, the mask
scales the conv's kernel and bias: for a ReLU (or linear) conv and a mask >= 0 that is
the same as scaling its output. A conv whose output feeds a BatchNormalization
(`pruning.channels_of`) is masked on the BN's output instead, by scaling gamma and beta
(a BN would normalise a mask on its input away). Masks are applied by writing the
scaled parameters into the model itself, so any architecture works (branches, BN or
not) and nothing but standard layers is ever built; the gradient with respect to a mask
follows from the parameters' gradients by the chain rule (p = p0 * m, so dL/dm is the
sum of dL/dp * p0 over the channel's slice).
"""

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.network import topology
from badnet_repair.network.pruning import Channels, channels_of, kernel_axis, zero_channels


@dataclass
class Unit:
    """The output channels of one conv (or hidden Dense layer, in `conv` too); `scaled` is
    the layer whose parameters a mask scales: the conv, or the BatchNormalization on its
    output."""

    channels: Channels
    conv: keras.layers.Layer
    scaled: keras.layers.Layer

    @property
    def name(self) -> str:
        return self.scaled.name

    @property
    def size(self) -> int:
        return int(self.conv.kernel.shape[kernel_axis(self.conv)])

    def params(self) -> list[tuple[tf.Variable, int]]:
        """The scaled variables, each with the axis of its channels."""
        if self.scaled is self.conv:
            found = [(self.conv.kernel, kernel_axis(self.conv))]
            return found + ([(self.conv.bias, -1)] if self.conv.use_bias else [])
        return [(self.scaled.gamma, -1), (self.scaled.beta, -1)]


def units(model: keras.Model, dense: bool = False) -> list[Unit]:
    """Every convolution of `model`, with the BatchNormalization on its output, if any;
    with `dense`, every Dense layer but the classifier too (its units are the classes)."""
    kinds = (keras.layers.Conv2D, keras.layers.Dense) if dense else keras.layers.Conv2D
    classes = topology.classifier(model) if dense else None
    found = []
    for layer in model.layers:
        if not isinstance(layer, kinds) or layer.name == classes:
            continue
        channels = channels_of(model, layer.name)
        scaled = model.get_layer(channels.norm) if channels.norm else layer
        if scaled is not layer and (scaled.gamma is None or scaled.beta is None):
            raise UserError(
                f"channel masks: BatchNormalization {scaled.name} needs its scale and shift"
            )
        found.append(Unit(channels, layer, scaled))
    if not found:
        raise UserError(f"channel masks: model {model.name} has no convolution")
    return found


def _along(values: tf.Tensor, axis: int, rank: int) -> tf.Tensor:
    """Per-channel `values` shaped to broadcast along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return tf.reshape(values, shape)


class Masks:
    """One mask in [0, 1] per channel of every unit of `model` (all 1 at first; hidden
    Dense layers' units too with `dense`).

    `apply()` writes the masked parameters into the model (`scale(multipliers)` any other
    per-channel multipliers), `gradients(param_grads)` turns the gradients of the loss
    with respect to `params` into gradients for the multipliers, and `restore()` writes
    the unmasked parameters back.
    """

    def __init__(self, model: keras.Model, dense: bool = False):
        self.units = units(model, dense)
        owned = [(i, p, axis) for i, u in enumerate(self.units) for p, axis in u.params()]
        self.params = [p for _, p, _ in owned]
        self._owner = [(i, axis) for i, _, axis in owned]
        self._original = [tf.constant(p.numpy()) for p in self.params]
        self.values = [
            tf.Variable(tf.ones(u.size), name=f"mask_{u.name}", trainable=True) for u in self.units
        ]

    def apply(self) -> None:
        self.scale(self.values)

    def scale(self, multipliers: list) -> None:
        """Write the parameters scaled by `multipliers`, one tensor per unit like `values`."""
        for p, p0, (i, axis) in zip(self.params, self._original, self._owner, strict=True):
            p.assign(p0 * _along(multipliers[i], axis, p0.shape.rank))

    def restore(self) -> None:
        for p, p0 in zip(self.params, self._original, strict=True):
            p.assign(p0)

    def gradients(self, param_grads: list[tf.Tensor]) -> list[tf.Tensor]:
        grads = [tf.zeros_like(m) for m in self.values]
        for g, p0, (i, axis) in zip(param_grads, self._original, self._owner, strict=True):
            others = [a for a in range(p0.shape.rank) if a != axis % p0.shape.rank]
            grads[i] = grads[i] + tf.reduce_sum(g * p0, axis=others)
        return grads

    def clip(self) -> None:
        for m in self.values:
            m.assign(tf.clip_by_value(m, 0.0, 1.0))

    def numpy(self) -> dict[str, np.ndarray]:
        return {u.name: m.numpy() for u, m in zip(self.units, self.values, strict=True)}


def prune(model: keras.Model, selected: dict[str, np.ndarray], dense: bool = False) -> int:
    """Remove the channels `selected[name]` (booleans) of each unit of `model`, in place,
    as fine-pruning does (`pruning.zero_channels`): the conv's kernel and bias, and a BN's
    scale, shift and moving mean too, so nothing leaks through the BN's shift. Returns how
    many were removed. `dense`: hidden Dense layers' units may be selected too."""
    total = 0
    for unit in units(model, dense):
        off = np.flatnonzero(np.asarray(selected.get(unit.name, ()), dtype=bool))
        if len(off):
            zero_channels(model, unit.channels, off)
            total += len(off)
    return total
