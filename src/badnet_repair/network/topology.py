"""A model's layer graph, whatever the shape it was written in: which layers read which,
what its output is, and how to replay it layer by layer on new inputs. Functional and
Sequential models and nested sub-models all become one flat functional graph here, so
every stage (the pruning curve, channel pruning, the GoodNet) walks one kind of model.
"""

import logging
from typing import Any

import tf_keras as keras
from tf_keras.src.engine.functional import _should_skip_first_node

from badnet_repair import UserError

log = logging.getLogger(__name__)

ELEMENTWISE_MERGES = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
)


def functional_view(model: keras.Model) -> keras.Model:
    """`model` as a functional model over the same layers (a Sequential model's own config
    lists its layers only, without the graph that joins them)."""
    if isinstance(model, keras.Sequential):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    return model


def functional_config(model: keras.Model) -> dict:
    """`model`'s functional config: layers with their inbound nodes, input and output."""
    config = functional_view(model).get_config()
    if "input_layers" not in config:
        raise UserError(f"model {model.name}: not a functional or Sequential Keras model")
    if len(config["input_layers"]) != 1 or len(config["output_layers"]) != 1:
        raise UserError(f"model {model.name}: expected one input and one output")
    return config


def graph(model: keras.Model) -> tuple[list[str], dict[str, list[str]]]:
    """Layer names in topological order and each layer's inbound layer names."""
    layers = functional_config(model)["layers"]
    inbound = {
        spec["name"]: [entry[0] for node in spec["inbound_nodes"] for entry in node]
        for spec in layers
    }
    return [spec["name"] for spec in layers], inbound


def consumers(inbound: dict[str, list[str]], name: str) -> list[str]:
    """The layers that read `name`'s output."""
    return [layer for layer, sources in inbound.items() if name in sources]


def classifier(model: keras.Model) -> str:
    """The layer whose units are the classes: the output layer, or the one a separate
    softmax (or activation) layer at the output reads."""
    _, inbound = graph(model)
    output = functional_config(model)["output_layers"][0][0]
    if isinstance(model.get_layer(output), (keras.layers.Softmax, keras.layers.Activation)):
        output = inbound[output][0]
    return output


def output_kind(model: keras.Model) -> str:
    """'softmax' for a classifier that outputs probabilities, 'linear' for one that outputs
    raw scores (a softmax is then put over them wherever probabilities are needed);
    anything else is refused."""
    name = functional_config(model)["output_layers"][0][0]
    layer = model.get_layer(name)
    while isinstance(layer, keras.layers.Wrapper):  # a pruning wrapper, TimeDistributed
        layer = layer.layer
    activation = layer.get_config().get("activation")
    if activation == "softmax" or isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if activation in (None, "linear"):
        return "linear"
    raise UserError(
        f"model {model.name}: the output layer {layer.name} has activation {activation!r}; "
        "expected softmax probabilities or linear scores"
    )


def replay(
    model: keras.Model, x: Any, prefix: str = "", *, distributed: bool = False, logits: bool = False
) -> Any:
    """Rebuild `model`'s layer graph on tensor `x` from fresh layers named `prefix + name`,
    with copied weights: one flat graph of standard layers. A nested model's layers are
    replayed in place, named `prefix + model name + "_" + layer name`.

    `distributed` wraps every single-input layer in TimeDistributed, so `x` may carry an
    extra axis (the k blends of STRIP). `logits` drops a final softmax, for entropies.
    """
    model = functional_view(model)
    config = functional_config(model)
    tensors: dict[tuple[str, int, int], Any] = {tuple(config["input_layers"][0]): x}
    out_key = tuple(config["output_layers"][0])
    drop_softmax = logits and output_kind(model) == "softmax"
    for entry in config["layers"]:  # functional configs list layers in topological order
        layer = model.get_layer(entry["name"])
        if isinstance(layer, keras.layers.InputLayer):
            continue
        call = None  # one fresh layer per layer, called once per node (shared layers)
        skipped = int(_should_skip_first_node(layer))  # a nested model's own first node
        for node_index, node in enumerate(entry["inbound_nodes"], start=skipped):
            inputs = [tensors[(n[0], n[1], n[2])] for n in node]
            kwargs = node[0][3] if node and len(node[0]) > 3 else {}
            key = (layer.name, node_index, 0)
            final = drop_softmax and key == out_key
            if isinstance(layer, keras.Model):
                inner = f"{prefix}{layer.name}_"
                tensors[key] = replay(layer, inputs[0], inner, distributed=distributed)
                continue
            if final and isinstance(layer, (keras.layers.Softmax, keras.layers.Activation)):
                tensors[key] = inputs[0]
                continue
            built = call is not None
            if not built:
                call = _fresh(layer, prefix, len(inputs), distributed, final)
            out = call(inputs if len(inputs) > 1 else inputs[0], **kwargs)
            if not built:
                call.set_weights(layer.get_weights())
            for i, tensor in enumerate(out if isinstance(out, (list, tuple)) else [out]):
                tensors[(layer.name, node_index, i)] = tensor
    return tensors[out_key]


def _fresh(layer, prefix: str, inputs: int, distributed: bool, linear: bool):
    """A new layer configured like `layer` (named `prefix + name`, its activation dropped if
    `linear`), wrapped to run over an extra blend axis if `distributed`."""
    config = {**layer.get_config(), "name": prefix + layer.name}
    if linear:
        config["activation"] = "linear"
    if not distributed:
        return type(layer).from_config(config)
    if inputs == 1:
        return keras.layers.TimeDistributed(type(layer).from_config(config), name=config["name"])
    if isinstance(layer, keras.layers.Concatenate):  # a non-negative axis moves by one
        axis = layer.axis + 1 if layer.axis >= 0 else layer.axis
        return type(layer).from_config({**config, "axis": axis})
    if isinstance(layer, ELEMENTWISE_MERGES):
        return type(layer).from_config(config)
    raise UserError(
        f"model layer {layer.name} ({type(layer).__name__}) cannot be applied to STRIP's blends"
    )


def normalize(model: keras.Model) -> keras.Model:
    """The same network as one flat functional model, which every stage can walk: a
    Sequential model, or one holding nested models, is rebuilt layer by layer with the
    same weights (a nested model's layers named `<model>_<layer>`); a flat functional
    model is returned as it is."""
    for layer in _all_layers(model):
        if getattr(layer, "data_format", None) == "channels_first":
            raise UserError(
                f"model {model.name}: layer {layer.name} is channels-first, which TensorFlow "
                "cannot run on a CPU (its convolutions are channels-last only); save the "
                "model channels-last"
            )
    flat = not isinstance(model, keras.Sequential) and not any(
        isinstance(layer, keras.Model) for layer in model.layers
    )
    if flat:
        functional_config(model)  # one input, one output
        return model
    x = keras.Input(shape=model.input_shape[1:], name="input")
    rebuilt = keras.Model(x, replay(model, x), name=model.name)
    log.info(
        "model %s rebuilt as one flat functional model (%d layers)", model.name, len(rebuilt.layers)
    )
    return rebuilt


def _all_layers(model: keras.Model) -> list:
    """Every layer, those of nested models too."""
    found = []
    for layer in model.layers:
        found += _all_layers(layer) if isinstance(layer, keras.Model) else [layer]
    return found
