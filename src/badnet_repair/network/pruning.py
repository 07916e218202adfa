"""Pruning methods. Each returns a `Pruned`: the net to evaluate and fine-tune, what keeps
the pruning in force while it trains, and how to export a plain model.

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
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.network import topology
from badnet_repair.network.predict import any_batch

log = logging.getLogger(__name__)


@dataclass
class Pruned:
    """A pruned net, and how training keeps the pruning in force: `hold` multiplies
    variables by fixed masks after every step, `after_epoch` runs after each epoch."""

    model: keras.Model
    layer: str
    channels_pruned: list[int]
    sparsity: float
    hold: list[tuple[tf.Variable, np.ndarray]] = field(default_factory=list)
    after_epoch: Callable[[], None] | None = None
    unwrap: Callable[[keras.Model], keras.Model] | None = None

    def export(self) -> keras.Model:
        """The pruned net as a plain tf_keras model (tfmot's pruning wrappers removed)."""
        return self.unwrap(self.model) if self.unwrap else self.model


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy, so the BadNet itself is never modified."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


ACTIVATIONS = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
)


@dataclass(frozen=True)
class Channels:
    """Where the output channels of one prunable layer live. `layer` computes them; `norm`
    is a BatchNormalization right after it, if any, whose shift would keep a channel alive
    after its kernel and bias are zeroed, so it is zeroed too; `output` is the layer whose
    output is the channels' activation: what clean images are ranked on, and what the
    pruning curve masks."""

    layer: str
    norm: str | None
    output: str

    def variables(self, model: keras.Model) -> list[tuple[tf.Variable, int]]:
        """Every variable a channel lives in, with the axis of its channels: the layer's
        kernel and bias and, after a BatchNormalization, its scale, shift and moving mean
        (zeroed, they make the channel output exactly the activation of zero)."""
        layer = model.get_layer(self.layer)
        found = [(layer.kernel, kernel_axis(layer))]
        found += [(layer.bias, -1)] if layer.use_bias else []
        if self.norm is not None:
            norm = model.get_layer(self.norm)
            found += [(v, -1) for v in (norm.gamma, norm.beta, norm.moving_mean) if v is not None]
        return found


def channels_of(model: keras.Model, layer: str) -> Channels:
    """The channels of `layer`, following it through a BatchNormalization and a separate
    activation layer (conv -> BN -> ReLU) where it has no activation of its own."""
    _, inbound = topology.graph(model)

    def single_next(name: str, kinds) -> str | None:
        after = topology.consumers(inbound, name)
        if len(after) == 1 and isinstance(model.get_layer(after[0]), kinds):
            return after[0]
        return None

    output, norm = layer, None
    if model.get_layer(layer).get_config().get("activation") in (None, "linear"):
        norm = single_next(layer, keras.layers.BatchNormalization)
        if norm is not None:
            axis = np.atleast_1d(model.get_layer(norm).axis).tolist()
            if axis not in ([-1], [len(model.get_layer(norm).input_shape) - 1]):
                raise UserError(
                    f"model.layer={layer!r}: BatchNormalization {norm} normalises axis {axis}, "
                    "not the channels"
                )
        output = single_next(norm or layer, ACTIVATIONS) or norm or layer
    return Channels(layer, norm, output)


def fill_value(model: keras.Model, channels: Channels) -> float:
    """What a removed channel outputs: the activation of zero (0 for ReLU)."""
    out = model.get_layer(channels.output)
    if channels.output == channels.layer:
        return float(out.activation(tf.zeros(1))[0])
    if channels.output == channels.norm:
        return 0.0
    return float(out(tf.zeros((1, 1)))[0, 0])


def mean_activations(model: keras.Model, layer: str, x: np.ndarray, batch_size: int = 512):
    """Mean activation of each output channel (unit) of `layer` over the images `x`, read
    after its BatchNormalization and activation where those are separate layers."""
    output = channels_of(model, layer).output
    probe = keras.Model(model.inputs, model.get_layer(output).output)

    @tf.function(input_signature=[any_batch(model)], autograph=False)
    def channel_sums(batch):
        out = probe(batch, training=False)
        return tf.reduce_sum(tf.reshape(out, (-1, out.shape[-1])), axis=0)

    total = sum(channel_sums(x[i : i + batch_size]).numpy() for i in range(0, len(x), batch_size))
    positions = len(x) * int(np.prod(probe.output_shape[1:-1]))
    return total / positions


def kernel_axis(layer) -> int:
    """The kernel axis of output channels: the last, but the one before for a transposed
    convolution, whose kernel is (height, width, outputs, inputs)."""
    return -2 if isinstance(layer, keras.layers.Conv2DTranspose) else -1


def zero_channels(model: keras.Model, channels: Channels, indices: np.ndarray) -> None:
    """Remove output channels `indices`: zero them in every variable they live in
    (`Channels.variables`), so each outputs exactly the activation of zero."""
    for variable, axis in channels.variables(model):
        values = variable.numpy()
        np.moveaxis(values, axis, -1)[..., indices] = 0.0
        variable.assign(values)


def zeroed_channels(layer) -> list[int]:
    """Output channels whose kernel and bias are entirely zero."""
    kernel, *rest = layer.get_weights()
    kernel = np.moveaxis(kernel, kernel_axis(layer), -1)
    dead = np.all(kernel.reshape(-1, kernel.shape[-1]) == 0, axis=0)
    if rest:
        dead &= rest[0] == 0
    return [int(c) for c in np.flatnonzero(dead)]


def channel_masks(
    model: keras.Model, channels: Channels, indices: np.ndarray
) -> list[tuple[tf.Variable, np.ndarray]]:
    """The variables `zero_channels` zeroes, each with a 0/1 mask that zeroes them again:
    multiplied in after every training step, they keep the removed channels removed."""
    masks = []
    for variable, axis in channels.variables(model):
        mask = np.ones(variable.shape, np.float32)
        np.moveaxis(mask, axis, -1)[..., indices] = 0.0
        masks.append((variable, mask))
    return masks


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
    indices = np.sort(np.asarray(order)[:k])
    pruned = copy_model(model)
    channels = channels_of(pruned, layer)
    zero_channels(pruned, channels, indices)
    log.info("activation pruning: %d of %d channels of %s zeroed", k, len(order), layer)
    return Pruned(
        model=pruned,
        layer=layer,
        channels_pruned=[int(c) for c in indices],
        sparsity=k / len(order),
        hold=channel_masks(pruned, channels, indices),
    )


def magnitude_prune(model: keras.Model, layer: str, sparsity: float) -> Pruned:
    """tfmot low-magnitude pruning of every prunable layer at a constant target sparsity.

    The first mask update runs now (step 0), so the pruned net can be evaluated before
    fine-tuning. In training each wrapper advances its own step and, at frequency 1,
    recomputes its mask at every step; the masks are applied to the weights after every
    epoch.
    """
    import tensorflow_model_optimization as tfmot  # 2 s to import: only this method needs it

    schedule = tfmot.sparsity.keras.ConstantSparsity(sparsity, begin_step=0, frequency=1)
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
        after_epoch=lambda: [w.pruning_obj.weight_mask_op() for w in wrappers],
        unwrap=tfmot.sparsity.keras.strip_pruning,
    )
