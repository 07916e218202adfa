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

from badnet_repair import UserError
from badnet_repair.files import atomic
from badnet_repair.network import topology

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
    output = topology.classifier(model)
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
