"""GoodNet: the BadNet B and its repaired net B' in one model that answers N ("poisoned")
when a detector flags the input, else B''s class (N = B's number of classes).

Detectors:
- `disagreement`: B and B' predict different classes (the repair changed the answer);
- `strip`: STRIP (Gao et al. 2019). A trigger dominates whatever it is superimposed on, so
  blends of a poisoned input with clean images all get the same confident answer: low mean
  prediction entropy of B, the net the attacker trained (STRIP looks for the backdoor's
  dominance, which the repair weakens: on the demo, STRIP over B' flagged 3% of poisoned
  inputs, over B 36%, both at a 3% clean rejection rate). The threshold is the `frr`
  quantile of clean entropies;
- `both`: flagged by either.

The GoodNet's output is (batch, N + 1) and its argmax is the answer. It is built from
standard Keras layers only, constants (the clean overlay images, the threshold) held in
layer weights, so a plain TensorFlow install loads the saved `.h5` without this package
and without running any code stored in the file. Its own layers are named `gn_*`, the
copies of B and B' inside it `bad_*`, `repaired_*` and `strip_*`, so no name collides.
Hard decisions are made of smooth layers: argmax as a softmax of probabilities scaled by
1e9, a step as a sigmoid of a difference scaled by 1e8; they only differ from the exact
rule on float near-ties.
"""

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError, models

log = logging.getLogger(__name__)

DETECTORS = ("disagreement", "strip", "both")
ONE_HOT_SCALE = 1e9  # probabilities 1 float32 ulp apart still differ by > 30 after scaling
STEP_SCALE = 1e8  # any nonzero float32 difference of entropies saturates the sigmoid


@dataclass
class GoodNet:
    """The combined model and what was chosen to build it (for logging and checks)."""

    model: keras.Model
    detector: str
    num_classes: int
    threshold: float | None = None  # STRIP: a mean entropy below it means poisoned
    overlays: np.ndarray | None = None  # STRIP: the k clean images superimposed (scaled NHWC)
    alpha: float = 0.5  # STRIP: blend = (1 - alpha) * input + alpha * overlay
    clean_entropies: np.ndarray | None = None  # STRIP: of the clean images it was set on


def _constant(layer: keras.layers.Layer, weights: list[np.ndarray]) -> keras.layers.Layer:
    """Freeze a layer already called on its input and give it fixed weights."""
    layer.set_weights([np.asarray(w, dtype=np.float32) for w in weights])
    layer.trainable = False
    return layer


MIN_CALIBRATION = 20  # clean images that STRIP's threshold is set on, at least


def check(badnet: keras.Model, detector: str, k: int, clean: int) -> None:
    """Refuse, before any work, a BadNet the GoodNet could not be built from: an output
    that is neither probabilities nor raw scores, too few clean images for STRIP, or a
    layer that cannot run over STRIP's blends (a trial build with placeholder settings)."""
    models.output_kind(badnet)
    if detector in ("strip", "both"):
        check_strip(k, clean)
        placeholder = np.zeros((1, *models.input_shape(badnet)), np.float32)
        build_goodnet(badnet, badnet, detector, calibration=(placeholder, 0.0, None))


def check_strip(k: int, clean: int) -> None:
    """STRIP draws `k` overlays from `clean` images and sets its threshold on the others:
    check the counts before any work."""
    pool = clean - MIN_CALIBRATION
    if not 1 <= k <= pool:
        raise UserError(
            f"goodnet.k={k}: expected 1 to {pool} for {clean} clean images "
            f"(the threshold needs {MIN_CALIBRATION} others)"
        )


def _step(t, threshold: float, name: str, above: bool = True):
    """A sharp 0/1 step: 1 where `t` (batch, 1) is above `threshold` (below if not `above`)."""
    sign = 1.0 if above else -1.0
    shift = keras.layers.Dense(1, name=f"{name}_diff")
    diff = shift(t)
    _constant(shift, [np.full((1, 1), sign), np.array([-sign * threshold])])
    sharp = keras.layers.Rescaling(STEP_SCALE, name=f"{name}_sharp")(diff)
    return keras.layers.Activation("sigmoid", name=name)(sharp)


def probabilities(model: keras.Model, x: Any, prefix: str) -> Any:
    """`model` replayed on `x`, with a softmax over its scores where it has none of its own."""
    out = models.replay(model, x, prefix)
    if models.output_kind(model) == "linear":
        out = keras.layers.Softmax(name=f"gn_{prefix}probs")(out)
    return out


def _disagreement_flag(x, badnet: keras.Model, probs_repaired):
    """1 where argmax B differs from argmax B' (hard one-hots, then their dot product)."""
    probs_bad = probabilities(badnet, x, "bad_")

    def one_hot(p, name: str):
        scaled = keras.layers.Rescaling(ONE_HOT_SCALE, name=f"{name}_scaled")(p)
        return keras.layers.Activation("softmax", name=name)(scaled)

    agree = keras.layers.Dot(axes=1, name="gn_agreement")(
        [one_hot(probs_bad, "gn_bad_onehot"), one_hot(probs_repaired, "gn_repaired_onehot")]
    )
    return _step(agree, 0.5, "gn_flag_disagreement", above=False)


def _strip_flag(x, badnet: keras.Model, overlays: np.ndarray, alpha: float, threshold: float):
    """1 where the mean entropy of B over the blends of `x` with `overlays` is below threshold."""
    k, size = len(overlays), int(np.prod(overlays.shape[1:]))
    flat = keras.layers.Flatten(name="gn_strip_flat")(x)
    zero_layer = keras.layers.Dense(1, name="gn_strip_zero")
    zero = zero_layer(flat)
    _constant(zero_layer, [np.zeros((size, 1)), np.zeros(1)])
    stored = keras.layers.Dense(k * size, name="gn_strip_overlays")
    images = stored(zero)  # the overlays, pre-scaled by alpha, held in the bias
    _constant(stored, [np.zeros((1, k * size)), alpha * overlays.reshape(-1)])
    images = keras.layers.Reshape((k, size), name="gn_strip_overlays_k")(images)
    own = keras.layers.Rescaling(1.0 - alpha, name="gn_strip_input_scaled")(flat)
    own = keras.layers.RepeatVector(k, name="gn_strip_input_k")(own)
    blends = keras.layers.Add(name="gn_strip_blend")([own, images])
    blends = keras.layers.Reshape((k, *overlays.shape[1:]), name="gn_strip_blends")(blends)
    logits = models.replay(badnet, blends, "strip_", distributed=True, logits=True)
    p = keras.layers.Activation("softmax", name="gn_strip_probs")(logits)
    log_p = keras.layers.Activation("log_softmax", name="gn_strip_log_probs")(logits)
    p_log_p = keras.layers.Multiply(name="gn_strip_p_log_p")([p, log_p])
    p_log_p = keras.layers.Reshape((-1,), name="gn_strip_p_log_p_flat")(p_log_p)
    mean = keras.layers.Dense(1, name="gn_strip_mean_entropy")
    entropy = mean(p_log_p)
    _constant(mean, [np.full((p_log_p.shape[-1], 1), -1.0 / k), np.zeros(1)])
    return _step(entropy, threshold, "gn_flag_strip", above=False)


def predict_probs(model: keras.Model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Forward passes in batches, without Keras predict's overhead."""
    out = [
        model(x[i : i + batch_size], training=False).numpy() for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out)


def blend(x: np.ndarray, overlays: np.ndarray, alpha: float) -> np.ndarray:
    """All k blends of each image: (n, k, H, W, C), `alpha` of each overlay."""
    return (1.0 - alpha) * x[:, None] + alpha * overlays[None]


def strip_entropy(
    model: keras.Model,
    x: np.ndarray,
    overlays: np.ndarray,
    alpha: float = 0.5,
    batch_size: int = 64,
) -> np.ndarray:
    """Mean prediction entropy of `model` over each image's blends with `overlays` (numpy)."""
    k, scores = len(overlays), models.output_kind(model) == "linear"
    out = []
    for i in range(0, len(x), batch_size):
        blends = blend(x[i : i + batch_size], overlays, alpha).astype(np.float32)
        p = predict_probs(model, blends.reshape(-1, *x.shape[1:]), 4096).astype(np.float64)
        if scores:
            p = np.exp(p - p.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
        h = -np.sum(p * np.log(np.maximum(p, np.finfo(np.float64).tiny)), axis=-1)
        out.append(h.reshape(-1, k).mean(axis=1))
    return np.concatenate(out) if out else np.empty(0)


def calibrate_strip(
    model: keras.Model,
    clean_x: np.ndarray,
    k: int = 32,
    frr: float = 0.05,
    alpha: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, float, np.ndarray]:
    """STRIP's overlays (`k` of `clean_x`, drawn with `seed`) and its threshold: the `frr`
    quantile of `model`'s mean entropies on the rest of `clean_x`, so the overlays never
    judge themselves. Returns (overlays, threshold, those clean entropies)."""
    if not 0.0 < frr < 1.0:
        raise UserError(f"goodnet frr={frr}: expected in (0, 1)")
    if not 0.0 < alpha < 1.0:
        raise UserError(f"goodnet alpha={alpha}: expected in (0, 1)")
    check_strip(k, len(clean_x))
    order = np.random.default_rng(seed).permutation(len(clean_x))
    calibration_x = clean_x[order[k:]]
    overlays = clean_x[np.sort(order[:k])].astype(np.float32)
    log.info(
        "STRIP: setting the threshold on %d clean images, %d blends each",
        len(calibration_x),
        k,
    )
    entropies = strip_entropy(model, calibration_x, overlays, alpha)
    return overlays, float(np.quantile(entropies, frr)), entropies


def build_goodnet(
    badnet: keras.Model,
    repaired: keras.Model,
    detector: str = "both",
    clean_x: np.ndarray | None = None,
    *,
    k: int = 32,
    frr: float = 0.05,
    alpha: float = 0.5,
    seed: int = 0,
    calibration: tuple[np.ndarray, float, np.ndarray] | None = None,
) -> GoodNet:
    """Combine B and B' into a GoodNet with the given detector; neither model is modified.

    STRIP examines B and needs `clean_x`, the defender's clean images scaled like the
    model's inputs: `k` of them are the overlays, the others set the threshold (see
    `calibrate_strip`), so that a share `frr` of clean images is answered N. A
    `calibration` that `calibrate_strip` returned for B is reused instead (it depends on
    B only, so a sweep over one BadNet calibrates once).
    """
    if detector not in DETECTORS:
        raise UserError(f"goodnet detector {detector!r}: expected one of {', '.join(DETECTORS)}")
    shape, n = models.input_shape(repaired), models.num_classes(repaired)
    if models.input_shape(badnet) != shape or models.num_classes(badnet) != n:
        raise UserError(
            f"goodnet: BadNet {badnet.input_shape} -> {models.num_classes(badnet)} classes and "
            f"repaired net {repaired.input_shape} -> {n} classes differ"
        )
    strip = detector in ("strip", "both")
    overlays = threshold = entropies = None
    if strip and calibration is not None:
        overlays, threshold, entropies = calibration
    elif strip:
        if clean_x is None:
            raise UserError("goodnet detector strip: needs clean images to calibrate on")
        overlays, threshold, entropies = calibrate_strip(badnet, clean_x, k, frr, alpha, seed)
    x = keras.Input(shape=shape, name="input")
    probs = probabilities(repaired, x, "repaired_")
    flags = []
    if detector in ("disagreement", "both"):
        flags.append(_disagreement_flag(x, badnet, probs))
    if strip:
        flags.append(_strip_flag(x, badnet, overlays, alpha, threshold))
    flag = flags[0] if len(flags) == 1 else keras.layers.Maximum(name="gn_flag_either")(flags)
    keep_layer = keras.layers.Dense(1, name="gn_keep")
    keep = keep_layer(flag)
    _constant(keep_layer, [np.full((1, 1), -1.0), np.ones(1)])  # 1 - flag
    answer = keras.layers.Multiply(name="gn_kept")([probs, keep])
    out = keras.layers.Concatenate(name="gn_output")([answer, flag])
    model = keras.Model(x, out, name=f"goodnet_{detector}")
    model.trainable = False
    return GoodNet(model, detector, n, threshold, overlays, alpha, entropies)


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
