"""The pruning curve in one pass: accuracy after removing k = 0, 1, ..., C channels of one
layer, in rank order, for every k.

Removing channels of the pruned layer only changes what comes after it, so the layer's
output is computed once per batch. When the layers right after it are linear in each
channel (pooling, then Dense or Conv2D before their activations, as in DeepID), removing
channel c subtracts c's own contribution from their pre-activations: the pre-activations
for k + 1 follow from those for k, and only the network after that first nonlinearity is
rerun per k. Other architectures fall back to rerunning the tail after the layer per k,
or, where the tail also reads something computed before the layer (DeepID's conv_4 and
fc_1 feed an Add with the other branch), the whole network per k.
"""

import logging
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from badnet_repair.data import Dataset
from badnet_repair.network import topology
from badnet_repair.network.pruning import Channels, channels_of, copy_model, fill_value

log = logging.getLogger(__name__)

POOLING = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)
LAST = "channels_last"


def _shared_layers(model: keras.Model) -> bool:
    """Whether a layer is called more than once (its inputs would be merged in the graph)."""
    layers = topology.functional_config(model)["layers"]
    return any(len(spec["inbound_nodes"]) > 1 for spec in layers)


class _Evaluator:
    """The loop every path shares: for k = 0..C, predict and count correct answers, then
    remove channel `order[k]`. A path says how a batch starts, how it is predicted and how
    a channel is removed; by default a mask `keep` (0 for removed channels) is the state."""

    def _prepare(self, x):
        return x

    def _start(self, x, channels):
        return self._prepare(x), tf.ones([channels], tf.float32)

    def _predict(self, state):
        raise NotImplementedError

    def _remove(self, state, channel):
        prepared, keep = state
        return prepared, tf.tensor_scatter_nd_update(keep, [[channel]], [0.0])

    @tf.function(reduce_retracing=True, autograph=False)
    def counts(self, x, y, order):
        channels = tf.shape(order)[0]

        def correct(state):
            pred = tf.argmax(self._predict(state), axis=-1, output_type=tf.int32)
            return tf.reduce_sum(tf.cast(pred == y, tf.int32))

        def remove_next(k, state, result):
            return k + 1, self._remove(state, order[k]), result.write(k, correct(state))

        start = (tf.constant(0), self._start(x, channels), tf.TensorArray(tf.int32, channels + 1))
        _, state, result = tf.while_loop(lambda k, *_: k < channels, remove_next, start)
        return result.write(channels, correct(state)).stack()


class _Tail(_Evaluator):
    """Accuracy for every k by rerunning the network after the channels' activation, the
    removed channels set to what a removed channel outputs."""

    def __init__(self, model: keras.Model, channels: Channels, tail: keras.Model):
        self.head = keras.Model(model.inputs, model.get_layer(channels.output).output)
        self.tail = tail
        self.fill = fill_value(model, channels)

    @staticmethod
    def build(model: keras.Model, channels: Channels) -> "_Tail | None":
        """None where the rest of the network also reads tensors from before the layer."""
        try:
            tail = keras.Model(model.get_layer(channels.output).output, model.output)
        except ValueError:
            return None
        return _Tail(model, channels, tail)

    def _prepare(self, x):
        return self.head(x, training=False)

    def _predict(self, state):
        out, keep = state
        return self.tail(out * keep + self.fill * (1.0 - keep), training=False)


class _Whole(_Evaluator):
    """Accuracy for every k by zeroing channels in a copy of the whole network (any model),
    in every variable they live in (`Channels.variables`), as `pruning.zero_channels` does."""

    def __init__(self, model: keras.Model, channels: Channels):
        self.model = copy_model(model)
        self.variables = channels.variables(self.model)
        self.originals = [tf.constant(v.numpy()) for v, _ in self.variables]

    def _predict(self, state):
        x, keep = state
        for (variable, axis), original in zip(self.variables, self.originals, strict=True):
            if axis == -2:  # a transposed kernel: channels on the second-to-last axis
                variable.assign(original * keep[:, None])
            else:
                variable.assign(original * keep)
        return self.model(x, training=False)


class _LinearTail(_Evaluator):
    """Accuracy for every k by updating the first linear layers after the pruned one."""

    def __init__(
        self,
        model: keras.Model,
        pooled: str,
        consumers: list[str],
        rest: list[str],
        inbound: dict[str, list[str]],
    ):
        self.head = keras.Model(model.inputs, model.get_layer(pooled).output)
        self.model, self.inbound, self.rest = model, inbound, rest
        self.linear = []
        for name in consumers:
            layer = model.get_layer(name)
            if isinstance(layer, keras.layers.Flatten):
                dense = model.get_layer(topology.consumers(inbound, name)[0])
                h, w, c = self.head.output_shape[1:]
                kernel = tf.reshape(dense.kernel, (h * w, c, -1))
                self.linear.append(("flatten_dense", dense, kernel))
            elif isinstance(layer, keras.layers.Dense):
                self.linear.append(("dense", layer, layer.kernel))
            else:
                self.linear.append(("conv", layer, layer.kernel))

    @staticmethod
    def build(model: keras.Model, channels: Channels) -> "_LinearTail | None":
        """The fast path, or None where the model's structure does not allow it."""
        order, inbound = topology.graph(model)
        if fill_value(model, channels) != 0.0 or _shared_layers(model):
            return None
        pooled = channels.output
        while (
            len(nxt := topology.consumers(inbound, pooled)) == 1
            and isinstance(model.get_layer(nxt[0]), POOLING)
            and model.get_layer(nxt[0]).data_format == LAST
        ):
            pooled = nxt[0]
        linear, firsts = topology.consumers(inbound, pooled), []
        image = len(model.get_layer(pooled).output_shape) == 4
        for name in linear:
            obj = model.get_layer(name)
            if isinstance(obj, keras.layers.Flatten) and image and obj.data_format == LAST:
                after = topology.consumers(inbound, name)
                if len(after) != 1 or not isinstance(model.get_layer(after[0]), keras.layers.Dense):
                    return None
                firsts.append(after[0])
            elif (
                isinstance(obj, keras.layers.Dense)
                and len(model.get_layer(pooled).output_shape) == 2
            ):
                firsts.append(name)
            elif (
                image
                and type(obj) is keras.layers.Conv2D
                and obj.data_format == LAST
                and obj.groups == 1
            ):
                firsts.append(name)
            else:
                return None
        done = set(firsts)
        rest = []
        for name in order[order.index(pooled) + 1 :]:
            if name in done or name in linear:
                continue
            sources = inbound[name]
            if sources and all(s in done for s in sources):
                done.add(name)
                rest.append(name)
            elif any(s in done for s in sources):
                return None  # mixes in something computed before the pruned layer
        if not rest or rest[-1] != order[-1] or len(model.outputs) != 1:
            return None
        tail = _LinearTail(model, pooled, linear, rest, inbound)
        tail.firsts = firsts
        return tail

    def _preactivations(self, pooled):
        out = []
        for kind, layer, kernel in self.linear:
            if kind == "conv":
                z = tf.nn.conv2d(
                    pooled,
                    kernel,
                    layer.strides,
                    layer.padding.upper(),
                    dilations=layer.dilation_rate,
                )
            elif kind == "flatten_dense":
                z = tf.matmul(tf.reshape(pooled, (tf.shape(pooled)[0], -1)), layer.kernel)
            else:
                z = tf.matmul(pooled, kernel)
            out.append(z + layer.bias if layer.use_bias else z)
        return out

    def _contributions(self, pooled, channel):
        out = []
        for kind, layer, kernel in self.linear:
            if kind == "conv":
                part = tf.gather(pooled, [channel], axis=-1)
                out.append(
                    tf.nn.conv2d(
                        part,
                        tf.gather(kernel, [channel], axis=2),
                        layer.strides,
                        layer.padding.upper(),
                        dilations=layer.dilation_rate,
                    )
                )
            elif kind == "flatten_dense":
                part = tf.reshape(tf.gather(pooled, channel, axis=-1), (tf.shape(pooled)[0], -1))
                out.append(tf.matmul(part, tf.gather(kernel, channel, axis=1)))
            else:
                out.append(tf.gather(pooled, [channel], axis=-1) @ tf.gather(kernel, [channel]))
        return out

    def _rest(self, preacts):
        values = {
            name: layer.activation(z)
            for name, (_, layer, _), z in zip(self.firsts, self.linear, preacts, strict=True)
        }
        for name in self.rest:
            sources = [values[s] for s in self.inbound[name]]
            values[name] = self.model.get_layer(name)(sources if len(sources) > 1 else sources[0])
        return values[self.rest[-1]]

    def _start(self, x, channels):
        pooled = self.head(x, training=False)
        return pooled, self._preactivations(pooled)

    def _predict(self, state):
        return self._rest(state[1])

    def _remove(self, state, channel):
        pooled, preacts = state
        removed = self._contributions(pooled, channel)
        return pooled, [z - r for z, r in zip(preacts, removed, strict=True)]


PATHS = {_LinearTail: "linear-update", _Tail: "tail-rerun", _Whole: "whole-net rerun"}


def evaluator_for(model: keras.Model, layer: str) -> _Evaluator:
    """The fastest path the model's structure allows for `layer`'s curve."""
    channels = channels_of(model, layer)
    return (
        _LinearTail.build(model, channels)
        or _Tail.build(model, channels)
        or _Whole(model, channels)
    )


class PruningCurve:
    """Accuracy after removing the first k channels of `order` from `layer`, k = 0..C, on
    any data set. The evaluator is chosen once and its compiled `counts` shared by every
    set (traced for the first batch's size, then once more for any other size)."""

    def __init__(self, model: keras.Model, layer: str, order: np.ndarray, batch_size: int = 512):
        self.evaluator = evaluator_for(model, layer)
        self.layer, self.batch_size = layer, batch_size
        self.order = tf.constant(np.asarray(order), tf.int32)

    def on(self, ds: Dataset) -> np.ndarray:
        """Accuracy on `ds` at each k (index k)."""
        start = time.perf_counter()
        total = np.zeros(int(self.order.shape[0]) + 1, np.int64)
        for i in range(0, len(ds), self.batch_size):
            y = tf.constant(ds.y[i : i + self.batch_size], tf.int32)
            total += self.evaluator.counts(ds.x[i : i + self.batch_size], y, self.order).numpy()
        log.info(
            "pruning curve of %s: %d points on %d images of %s (%s path, %.1fs)",
            self.layer,
            len(total),
            len(ds),
            ds.name,
            PATHS[type(self.evaluator)],
            time.perf_counter() - start,
        )
        return total / len(ds)


def pruning_curve(
    model: keras.Model,
    layer: str,
    order: np.ndarray,
    datasets: dict[str, Dataset],
    batch_size: int = 512,
) -> dict[str, np.ndarray]:
    """Accuracy on each data set after removing the first k channels of `order`, k = 0..C
    (index k)."""
    curve = PruningCurve(model, layer, order, batch_size)
    return {name: curve.on(ds) for name, ds in datasets.items()}


def channels_within(val_curve: np.ndarray, max_drop: float, start: float | None = None) -> int:
    """The most channels prunable, in order, before validation accuracy first falls more
    than `max_drop` below `start` (by default the unpruned net's: the fine-pruning
    stopping rule); 0 when the unpruned net is already below."""
    start = val_curve[0] if start is None else start
    ok = val_curve >= start - max_drop - 1e-12
    return max(int(np.argmin(ok)) - 1, 0) if not ok.all() else len(val_curve) - 1
