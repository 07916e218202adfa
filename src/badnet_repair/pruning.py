"""Pruning methods. Each returns a `Pruned`: the net to evaluate and fine-tune, the
callbacks that keep the pruning in force while it trains, and how to export a plain model.

- `activation`: fine-pruning as published (Liu, Dolan-Gavitt, Garg 2018). Backdoor
  neurons tend to stay dormant on clean inputs, so the channels of one layer with the
  lowest mean activation on clean data are removed (zeroed) first.
- `magnitude`: tensorflow-model-optimization's `prune_low_magnitude` over the whole
  model, as the seed project did; pruning continues during fine-tuning.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

log = logging.getLogger(__name__)


@dataclass
class Pruned:
    model: keras.Model
    layer: str
    channels_pruned: list[int]
    sparsity: float
    callbacks: list = field(default_factory=list)
    unwrap: Callable[[keras.Model], keras.Model] | None = None

    def export(self) -> keras.Model:
        """The pruned net as a plain tf_keras model (tfmot's pruning wrappers removed)."""
        return self.unwrap(self.model) if self.unwrap else self.model


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy, so the BadNet itself is never modified."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def mean_activations(model: keras.Model, layer: str, x: np.ndarray, batch_size: int = 512):
    """Mean output of each channel (unit) of `layer` over the images `x`."""
    probe = keras.Model(model.inputs, model.get_layer(layer).output)
    spec = tf.TensorSpec((None, *x.shape[1:]), tf.float32)

    @tf.function(input_signature=[spec])
    def channel_sums(batch):
        out = probe(batch, training=False)
        return tf.reduce_sum(tf.reshape(out, (-1, out.shape[-1])), axis=0)

    total = sum(channel_sums(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size))
    positions = len(x) * int(np.prod(probe.output_shape[1:-1]))
    return total / positions


def zero_channels(layer, channels: np.ndarray) -> None:
    """Zero the kernel and bias of the given output channels (or Dense units)."""
    kernel, *rest = layer.get_weights()
    kernel[..., channels] = 0.0
    if rest:
        rest[0][channels] = 0.0
    layer.set_weights([kernel, *rest])


def zeroed_channels(layer) -> list[int]:
    """Output channels whose kernel and bias are entirely zero."""
    kernel, *rest = layer.get_weights()
    dead = np.all(kernel.reshape(-1, kernel.shape[-1]) == 0, axis=0)
    if rest:
        dead &= rest[0] == 0
    return [int(c) for c in np.flatnonzero(dead)]


class KeepChannelsPruned(keras.callbacks.Callback):
    """Re-zero pruned channels after every training batch, so fine-tuning cannot revive them."""

    def __init__(self, layer: str, channels: np.ndarray):
        super().__init__()
        self.layer_name, self.channels = layer, np.asarray(channels, dtype=np.int64)

    def on_train_batch_end(self, batch, logs=None):
        zero_channels(self.model.get_layer(self.layer_name), self.channels)


def rank_channels(
    model: keras.Model, layer: str, x_clean: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """`layer`'s channels ordered by mean activation on clean images, least active first."""
    return np.argsort(mean_activations(model, layer, x_clean, batch_size), kind="stable")


def channel_count(sparsity: float, channels: int) -> int:
    """How many of `channels` a fixed `sparsity` prunes (rounded down)."""
    return int(np.floor(sparsity * channels + 1e-9))


def activation_prune(model: keras.Model, layer: str, order: np.ndarray, k: int) -> Pruned:
    """Zero the first `k` channels of `order` (the least active on clean images)."""
    channels = np.sort(np.asarray(order)[:k])
    pruned = copy_model(model)
    zero_channels(pruned.get_layer(layer), channels)
    log.info("activation pruning: %d of %d channels of %s zeroed", k, len(order), layer)
    return Pruned(
        model=pruned,
        layer=layer,
        channels_pruned=[int(c) for c in channels],
        sparsity=k / len(order),
        callbacks=[KeepChannelsPruned(layer, channels)],
    )


def magnitude_prune(model: keras.Model, layer: str, sparsity: float, frequency: int) -> Pruned:
    """tfmot low-magnitude pruning of every prunable layer at a constant target sparsity.

    The first mask update runs now (step 0), so the pruned net can be evaluated before
    fine-tuning; `UpdatePruningStep` keeps updating masks every `frequency` steps after.
    """
    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=frequency)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(copy_model(model), pruning_schedule=schedule)
    wrappers = [w for w in wrapped.layers if hasattr(w, "pruning_obj")]
    for w in wrappers:
        w.pruning_step.assign(0)
        w.pruning_obj.conditional_mask_update()
        w.pruning_obj.weight_mask_op()
    unwrapped = tfmot.sparsity.keras.strip_pruning(wrapped)
    kernels = [w.layer.kernel.numpy() for w in wrappers if hasattr(w.layer, "kernel")]
    achieved = float(sum((k == 0).sum() for k in kernels) / sum(k.size for k in kernels))
    channels = zeroed_channels(unwrapped.get_layer(layer))
    log.info(
        "magnitude pruning: %d kernels at %.1f%% weight sparsity; %d channels of %s all zero",
        len(kernels),
        100 * achieved,
        len(channels),
        layer,
    )
    return Pruned(
        model=wrapped,
        layer=layer,
        channels_pruned=channels,
        sparsity=achieved,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
        unwrap=tfmot.sparsity.keras.strip_pruning,
    )
