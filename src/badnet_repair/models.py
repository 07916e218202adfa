"""Model files: the DeepID architecture, safe loading of untrusted files, atomic saving.

BadNets are made by attackers. A legacy `.h5` model file can carry Python bytecode in a
`Lambda` layer that tf_keras runs while loading, so the file's config is read and checked
before tf_keras ever sees it.
"""

import json
import warnings
import zipfile
from pathlib import Path

import h5py
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.files import atomic

UNSAFE_LAYERS = {"Lambda", "TFOpLambda", "SlicingOpLambda"}


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


def _layer_classes(node) -> list[tuple[str, str]]:
    """Every (class_name, layer name) pair anywhere in a Keras model config."""
    found = []
    if isinstance(node, dict):
        if "class_name" in node:
            cfg = node.get("config")
            name = cfg.get("name", "?") if isinstance(cfg, dict) else "?"
            found.append((str(node["class_name"]), str(name)))
        for value in node.values():
            found.extend(_layer_classes(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_layer_classes(value))
    return found


def read_model_config(path: Path) -> dict | None:
    """The architecture stored in a model file, without loading it; None for weights only."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return json.loads(z.read("config.json"))
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                return None
            return json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"model file {path}: not a Keras .h5 or .keras model file ({e})") from None


def check_safe(config: dict, path: Path) -> None:
    """Refuse layers that execute embedded or unknown code when loaded."""
    for class_name, layer in _layer_classes(config):
        if class_name in UNSAFE_LAYERS:
            raise UserError(
                f"model file {path}: layer '{layer}' is a {class_name}, which runs code stored in "
                "the file; refused (set model.allow_unsafe=true only if you trust the file)"
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
    except (ValueError, OSError, TypeError) as e:
        raise UserError(f"model file {path}: could not be loaded ({e})") from None


def input_shape(model) -> tuple[int, int, int]:
    shape = tuple(model.input_shape[1:])
    if len(shape) != 3 or None in shape:
        raise UserError(f"model input {model.input_shape}: expected images (H, W, C)")
    return shape  # type: ignore[return-value]


def num_classes(model) -> int:
    return int(model.output_shape[-1])


def prunable_layer(model, name: str | None):
    """The named Conv2D or Dense layer, or by default the last Conv2D layer."""
    kinds = (keras.layers.Conv2D, keras.layers.Dense)
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
    return layer


def save_model(model, path: str | Path) -> Path:
    """Save a full tf_keras model file (legacy .h5 for the competition, or .keras) atomically."""
    with atomic(path) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*HDF5 file via `model.save\\(\\)`")
        model.save(str(tmp))
    return Path(path)
