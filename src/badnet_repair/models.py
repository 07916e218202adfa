"""Model files: the DeepID architecture, safe loading of untrusted files, atomic saving.

BadNets are made by attackers. A legacy `.h5` model file can carry Python bytecode in a
`Lambda` layer that tf_keras runs while loading, so the file's config is read and checked
before tf_keras ever sees it.
"""

import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import h5py
import tf_keras as keras
from tf_keras.src.engine.functional import _should_skip_first_node

from badnet_repair import UserError
from badnet_repair.files import atomic

log = logging.getLogger(__name__)

# Classes whose deserialization runs Python bytecode stored in the file.
UNSAFE_CLASSES = {"Lambda", "TFOpLambda", "SlicingOpLambda", "__lambda__"}
# Serialized objects may name a module that tf_keras imports; only Keras's own are allowed.
SAFE_MODULES = ("keras", "tf_keras", "builtins")


def build_deepid(input_shape: tuple[int, int, int] = (55, 47, 3), num_classes: int = 1283):
    """The CSAW-HackML-2020 DeepID network, with the competition's layer names."""
    x = inp = keras.Input(shape=input_shape, name="input")
    x = keras.layers.Conv2D(20, (4, 4), activation="relu", name="conv_1")(x)
    x = keras.layers.MaxPooling2D((2, 2), name="pool_1")(x)
    x = keras.layers.Conv2D(40, (3, 3), activation="relu", name="conv_2")(x)
    x = keras.layers.MaxPooling2D((2, 2), name="pool_2")(x)
    x = keras.layers.Conv2D(60, (3, 3), activation="relu", name="conv_3")(x)
    pool_3 = keras.layers.MaxPooling2D((2, 2), name="pool_3")(x)
    fc_1 = keras.layers.Dense(160, name="fc_1")(keras.layers.Flatten(name="flatten_1")(pool_3))
    x = keras.layers.Conv2D(80, (2, 2), activation="relu", name="conv_4")(pool_3)
    fc_2 = keras.layers.Dense(160, name="fc_2")(keras.layers.Flatten(name="flatten_2")(x))
    x = keras.layers.Add(name="add_1")([fc_1, fc_2])
    x = keras.layers.Activation("relu", name="activation_1")(x)
    out = keras.layers.Dense(num_classes, activation="softmax", name="output")(x)
    return keras.Model(inputs=inp, outputs=out, name="deepid")


ARCHITECTURES = {"deepid": build_deepid}


def _objects(config: Any) -> list[tuple[str, str, Any]]:
    """(class_name, name, module) of every serialized object anywhere in a model config.

    The whole tree is walked, not only `layers`: tf_keras also deserializes objects held
    under `layer`, `cell`, `backward_layer`, old-style Sequential lists and so on.
    """
    found, stack = [], [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "class_name" in node:
                inner = node.get("config")
                name = inner.get("name", "?") if isinstance(inner, dict) else "?"
                found.append((str(node["class_name"]), str(name), node.get("module")))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def _known_classes() -> set[str]:
    """Classes tf_keras itself defines that a model config may name, and its model classes."""
    namespaces = (
        keras.layers,
        keras.initializers,
        keras.regularizers,
        keras.constraints,
        keras.mixed_precision,
    )
    known = {
        name for space in namespaces for name, obj in vars(space).items() if isinstance(obj, type)
    }
    return (known | {"Functional", "Sequential", "Model", "function"}) - UNSAFE_CLASSES


def _is_keras_archive(path: Path) -> bool:
    """tf_keras's own rule: the zip reader only for a `.keras` name; anything else is HDF5."""
    return path.suffix == ".keras" and zipfile.is_zipfile(path)


def read_model_config(path: Path) -> dict | None:
    """The architecture stored in a model file, without loading it; None for weights only.

    The format is chosen exactly as tf_keras will choose it, so the config checked here
    is the one tf_keras would load (a file can be both a zip and an HDF5 file).
    """
    try:
        if _is_keras_archive(path):
            with zipfile.ZipFile(path) as z:
                config = json.loads(z.read("config.json"))
        else:
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
                if raw is None:
                    return None
                config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (OSError, KeyError, ValueError, TypeError, RecursionError) as e:
        raise UserError(f"model file {path}: not a Keras .h5 or .keras model file ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"model file {path}: malformed model config")
    return config


def check_safe(config: dict, path: Path) -> None:
    """Refuse objects that execute embedded code (Lambda) or unknown (custom) code when
    loaded, and modules other than Keras's own, anywhere in the config."""
    opt_in = "refused (set model.allow_unsafe=true only if you trust the file)"
    known = _known_classes()
    loaded = {k: v for k, v in config.items() if k != "compile_config"}  # compile=False drops it
    for class_name, name, module in _objects(loaded):
        if class_name in UNSAFE_CLASSES:
            raise UserError(
                f"model file {path}: layer '{name}' is a {class_name}, which runs code stored "
                f"in the file; {opt_in}"
            )
        if class_name not in known:
            raise UserError(
                f"model file {path}: layer '{name}' is of unknown class {class_name!r} "
                f"(custom code); {opt_in}"
            )
        if module is not None and (
            not isinstance(module, str) or module.split(".")[0] not in SAFE_MODULES
        ):
            raise UserError(
                f"model file {path}: object '{name}' ({class_name}) names module {module!r}, "
                f"which loading would import; {opt_in}"
            )


def _weights_num_classes(path: Path) -> int:
    """Output units of a DeepID weights file (`output/output/kernel:0`)."""
    with h5py.File(path, "r") as f:
        try:
            return int(f["output"]["output"]["kernel:0"].shape[-1])
        except KeyError:
            raise UserError(
                f"model file {path}: weights-only file without an 'output' layer; "
                "check model.architecture"
            ) from None


def load_model(path: str | Path, architecture: str | None = None, allow_unsafe: bool = False):
    """Load a full model file, or a weights-only file into a named architecture."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model file {path} (model.file): not found")
    config = read_model_config(path)
    if config is None:
        if architecture is None:
            raise UserError(
                f"model file {path} holds weights only: set model.architecture "
                f"(one of {', '.join(ARCHITECTURES)})"
            )
        if architecture not in ARCHITECTURES:
            raise UserError(
                f"model.architecture={architecture!r}: expected one of {list(ARCHITECTURES)}"
            )
        model = ARCHITECTURES[architecture](num_classes=_weights_num_classes(path))
        try:
            model.load_weights(str(path))
        except (ValueError, OSError) as e:
            raise UserError(f"model file {path}: weights do not fit {architecture} ({e})") from None
        return model
    if not allow_unsafe:
        check_safe(config, path)
    try:
        return keras.models.load_model(str(path), compile=False, safe_mode=not allow_unsafe)
    except Exception as e:  # noqa: BLE001 - an attacker-made file can fail in any way
        raise UserError(f"model file {path}: could not be loaded ({e})") from None


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


def output_kind(model: keras.Model) -> str:
    """'softmax' for a classifier that outputs probabilities, 'linear' for one that outputs
    raw scores (a softmax is then put over them wherever probabilities are needed);
    anything else is refused."""
    name = functional_config(model)["output_layers"][0][0]
    layer = model.get_layer(name)
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


def input_shape(model) -> tuple[int, int, int]:
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise UserError(f"model input {model.input_shape}: expected images (H, W, C)")
    return shape  # type: ignore[return-value]


def num_classes(model) -> int:
    return int(model.output_shape[-1])


def prunable_layer(model, name: str | None):
    """The named Conv2D (or transposed Conv2D) or Dense layer, or by default the last
    Conv2D layer. The output layer is refused: its channels are the classes, and a
    removed class would still take part in the softmax."""
    kinds = (keras.layers.Conv2D, keras.layers.Dense)
    _, inbound = graph(model)
    output = functional_config(model)["output_layers"][0][0]
    if isinstance(model.get_layer(output), (keras.layers.Softmax, keras.layers.Activation)):
        output = inbound[output][0]  # the layer whose units a separate softmax reads
    if name is None:
        convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
        if not convs:
            raise UserError("model.layer: the model has no Conv2D layer; name a Dense layer")
        return convs[-1]
    try:
        layer = model.get_layer(name)
    except ValueError:
        names = ", ".join(layer.name for layer in model.layers if isinstance(layer, kinds))
        raise UserError(f"model.layer={name!r}: no such layer; prunable layers: {names}") from None
    if not isinstance(layer, kinds):
        raise UserError(
            f"model.layer={name!r}: a {type(layer).__name__}, expected a Conv2D or Dense layer"
        )
    if name == output:
        raise UserError(
            f"model.layer={name!r}: the output layer cannot be pruned (its units are the classes)"
        )
    return layer


def save_model(model, path: str | Path) -> Path:
    """Save a full tf_keras model file (legacy .h5 for the competition, or .keras) atomically.

    tf_keras warns that .h5 is legacy, and that an uncompiled model (a GoodNet) has no
    compiled metrics: neither matters here, so neither is shown.
    """
    tf_log = logging.getLogger("tensorflow")
    level = tf_log.level
    with atomic(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HDF5 file via `model.save\\(\\)`")
        tf_log.setLevel(logging.ERROR)
        try:
            model.save(str(tmp))
        finally:
            tf_log.setLevel(level)
    return Path(path)
