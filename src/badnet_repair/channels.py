"""Per-channel masks on a plain tf_keras model, and channel pruning across layers.

Every convolution's output channels carry one mask value. With no BatchNorm after
it, the mask scales the conv's kernel and bias: for a ReLU (or linear) conv and a mask
>= 0 that is the same as scaling its output. A conv whose output feeds a
BatchNormalization is masked on the BN's output instead, by scaling gamma and beta (a
BN would normalise a mask on its input away). Masks are applied by writing the scaled
parameters into the model itself, so any architecture works (functional or
Sequential, branches, BN or not) and nothing but standard layers is ever built; the
gradient with respect to a mask follows from the parameters' gradients by the chain
rule (p = p0 * m, so dL/dm = sum of dL/dp * p0 over the channel's slice).
"""

from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras

from badnet_repair import UserError


@dataclass
class Unit:
    """The output channels of one conv: `scaled` is the layer whose parameters a mask
    scales (the conv, or the BN on its output); pruning zeroes them and the conv's."""

    conv: keras.layers.Layer
    scaled: keras.layers.Layer

    @property
    def name(self) -> str:
        return self.scaled.name

    @property
    def params(self) -> list[tf.Variable]:
        if self.scaled is self.conv:
            return [v for v in (self.conv.kernel, self.conv.bias) if v is not None]
        return [self.scaled.gamma, self.scaled.beta]

    @property
    def channels(self) -> int:
        return int(self.conv.kernel.shape[-1])


def _tensor(layer, which: str):
    """A layer's `input` or `output` tensor; None for a layer called more than once."""
    try:
        return getattr(layer, which)
    except (AttributeError, RuntimeError):
        return None


def units(model: keras.Model) -> list[Unit]:
    """Every Conv2D of `model` (top level, channels last), paired with the BatchNormalization
    that its output feeds, if any."""
    after = {
        id(tensor): layer
        for layer in model.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        and (tensor := _tensor(layer, "input")) is not None
    }
    found = []
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Conv2D):
            continue
        if layer.data_format != "channels_last":
            raise UserError(f"channel masks: conv {layer.name} is not channels-last")
        output = _tensor(layer, "output")
        bn = after.get(id(output)) if output is not None else None
        if bn is not None and (not bn.scale or not bn.center or list(bn.axis) != [3]):
            raise UserError(
                f"channel masks: BatchNormalization {bn.name} needs scale, center and the "
                "channel axis last"
            )
        found.append(Unit(layer, bn if bn is not None else layer))
    if not found:
        raise UserError(f"channel masks: model {model.name} has no Conv2D layer")
    return found


class Masks:
    """One mask in [0, 1] per channel of every unit of `model` (all 1 at first).

    `apply()` writes the masked parameters into the model, `gradients(param_grads)` turns
    the gradients of the loss with respect to `params` into gradients for `values`, and
    `restore()` writes the unmasked parameters back.
    """

    def __init__(self, model: keras.Model):
        self.units = units(model)
        self.params = [p for u in self.units for p in u.params]
        self._owner = [i for i, u in enumerate(self.units) for _ in u.params]
        self._original = [tf.constant(p.numpy()) for p in self.params]
        self.values = [
            tf.Variable(tf.ones(u.channels), name=f"mask_{u.name}", trainable=True)
            for u in self.units
        ]

    def apply(self) -> None:
        for p, p0, i in zip(self.params, self._original, self._owner, strict=True):
            p.assign(p0 * self.values[i])

    def restore(self) -> None:
        for p, p0 in zip(self.params, self._original, strict=True):
            p.assign(p0)

    def gradients(self, param_grads: list[tf.Tensor]) -> list[tf.Tensor]:
        grads = [tf.zeros_like(m) for m in self.values]
        for g, p0, i in zip(param_grads, self._original, self._owner, strict=True):
            per_channel = tf.reshape(g * p0, (-1, p0.shape[-1]))
            grads[i] = grads[i] + tf.reduce_sum(per_channel, axis=0)
        return grads

    def clip(self) -> None:
        for m in self.values:
            m.assign(tf.clip_by_value(m, 0.0, 1.0))

    def numpy(self) -> dict[str, np.ndarray]:
        return {u.name: m.numpy() for u, m in zip(self.units, self.values, strict=True)}


def zero_channels(model: keras.Model, selected: dict[str, np.ndarray]) -> int:
    """Zero the channels `selected[name]` (booleans) of each unit of `model`, in place: the
    conv's kernel and bias, and a BN's gamma and beta too, so the channel is exactly zero
    after it (nothing leaks through the BN's shift). Returns how many were zeroed."""
    total = 0
    for unit in units(model):
        off = np.asarray(selected.get(unit.name, ()), dtype=bool)
        if not off.any():
            continue
        layers = {id(unit.conv): unit.conv, id(unit.scaled): unit.scaled}
        for layer in layers.values():
            for var in layer.trainable_weights:
                if var.shape[-1] == unit.channels:
                    value = var.numpy()
                    value[..., off] = 0.0
                    var.assign(value)
        total += int(off.sum())
    return total
