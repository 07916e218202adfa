"""TeCo (Liu et al., CVPR 2023): a BadNet is about as robust to every kind of image
corruption on a clean input, but on a triggered one some corruptions break the trigger
at once and others never do. For each corruption type in `goodnet.teco_corruptions` the
input is corrupted at severities 1 to 5; its flip severity is the first at which B's
answer differs from its answer on the input (6 if none does), and its score is the
standard deviation of the flip severities across the types. A large spread flags it.

The paper uses the 15 ImageNet-C types; here six that standard Keras layers can express
(so the GoodNet file stays plain Keras): gaussian and impulse noise, gaussian blur,
pixelate, contrast and brightness (see `CORRUPTIONS`). Noise is drawn once per type from
the run's seed and scaled by the severity, so every input gets the same noise and the
detector is deterministic. It examines B alone: every clean validation image may set the
threshold, and a sweep over one BadNet sets it once. Cost: 5 forward passes of B per
type and one on the input, 31 at the default six types.
"""

import logging
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.defenses import goodnet, variants
from badnet_repair.defenses.detectors import Context, Fitted, Inputs, Scored
from badnet_repair.network.predict import predict_classes

log = logging.getLogger(__name__)

MIN_CALIBRATION = 20  # clean images that the threshold is set on, at least
LEVELS = 5  # severities per corruption type; a type whose answer never flips scores 6
# Severities 1-5. Noise, contrast and brightness take ImageNet-C's values (fractions of
# the pixel range, resolution-free); blur and pixelate, ImageNet-C's for 224-pixel images,
# are scaled down to the zoo's 32-55 pixel faces (blur sigma and block in pixels).
SEVERITY = {
    "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],  # noise std
    "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],  # share of values set to 0 or max
    "gaussian_blur": [0.5, 1.0, 1.5, 2.0, 3.0],  # kernel sigma
    "pixelate": [2, 3, 4, 5, 6],  # block side
    "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],  # contrast kept around each channel's mean
    "brightness": [0.1, 0.2, 0.3, 0.4, 0.5],  # added to every value
}


def check(badnet: keras.Model, settings: Any, clean: Any, batch_size: int) -> None:
    """Known corruption types, at least two (a spread needs two), enough clean images."""
    chosen = list(settings.teco_corruptions)
    unknown = [c for c in chosen if c not in SEVERITY]
    if unknown or len(set(chosen)) < 2:
        raise UserError(
            f"goodnet.teco_corruptions={chosen}: expected two or more of {', '.join(SEVERITY)}"
        )
    if len(clean.validation) < MIN_CALIBRATION:
        raise UserError(
            f"goodnet.detector=teco: {len(clean.validation)} clean images for its threshold, "
            f"expected at least {MIN_CALIBRATION}"
        )
    variants.check_range(clean.validation.x, float(settings.pixel_max), "teco")


def noise(x: Any, layers: variants.Layers, kind: str, high: float, rng: Any) -> list[Any]:
    """Gaussian noise (one standard normal draw, times each std) or impulse noise (one
    uniform draw u: 0 where u < a/2, `high` where a/2 <= u < a), clipped."""
    out = []
    if kind == "gaussian_noise":
        drawn = layers.constant(rng.standard_normal(layers.shape), "gauss")
        for i, std in enumerate(SEVERITY[kind]):
            scaled = keras.layers.Rescaling(std * high, name=layers.name(f"gauss_{i}"))(drawn)
            added = keras.layers.Add(name=layers.name(f"gauss_add_{i}"))([x, scaled])
            out.append(layers.clip(added, high, f"gauss_{i}"))
        return out
    u = rng.uniform(size=layers.shape)
    for i, amount in enumerate(SEVERITY[kind]):
        keep = layers.constant((u >= amount).astype(np.float32), f"impulse_keep_{i}")
        salt = (u >= amount / 2) & (u < amount)
        salt = layers.constant(salt.astype(np.float32) * high, f"impulse_salt_{i}")
        kept = keras.layers.Multiply(name=layers.name(f"impulse_kept_{i}"))([x, keep])
        out.append(keras.layers.Add(name=layers.name(f"impulse_{i}"))([kept, salt]))
    return out


def coverage(length: int, kernel: np.ndarray) -> np.ndarray:
    """How much of a 1-d `kernel` centred on each of `length` positions lies inside."""
    r = len(kernel) // 2
    return np.array([kernel[max(0, r - i) : r + length - i].sum() for i in range(length)])


def blur(x: Any, layers: variants.Layers, sigma: float, i: int) -> Any:
    """Gaussian blur, renormalised at the border (zero padding would darken it)."""
    h, w, c = layers.shape
    r = int(np.ceil(3 * sigma))
    g = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    g /= g.sum()
    name = layers.name(f"blur_{i}")
    # a Conv2D mapping each channel to itself (Keras 3 cannot load tf_keras's Depthwise)
    conv = keras.layers.Conv2D(c, 2 * r + 1, padding="same", use_bias=False, name=name)
    blurred = conv(x)
    kernel = np.zeros((2 * r + 1, 2 * r + 1, c, c))
    kernel[:, :, np.arange(c), np.arange(c)] = np.outer(g, g)[:, :, None]
    goodnet.constant(conv, [kernel])
    cover = np.outer(coverage(h, g), coverage(w, g))
    fix = layers.constant(np.repeat((1.0 / cover)[:, :, None], c, axis=2), f"blur_fix_{i}")
    return keras.layers.Multiply(name=layers.name(f"blur_fixed_{i}"))([blurred, fix])


def pixelate(x: Any, layers: variants.Layers, block: int, i: int) -> Any:
    """Each block x block tile replaced by its mean (tiles aligned as TensorFlow's 'same'
    pooling pads, partial tiles averaging their own pixels)."""
    h, w, _ = layers.shape
    pad = [(-(-n // block) - 1) * block + block - n for n in (h, w)]
    name = layers.name(f"pixelate_{i}")
    pooled = keras.layers.AveragePooling2D(block, padding="same", name=f"{name}_pool")(x)
    grown = keras.layers.UpSampling2D(block, name=f"{name}_grow")(pooled)
    crop = tuple((p // 2, p - p // 2) for p in pad)
    return keras.layers.Cropping2D(crop, name=name)(grown)


def photometric(x: Any, layers: variants.Layers, kind: str, high: float) -> list[Any]:
    """Contrast (c x + (1 - c) mean per channel) or brightness (x + b high), clipped."""
    h, w, _ = layers.shape
    out = []
    if kind == "contrast":
        mean = keras.layers.GlobalAveragePooling2D(keepdims=True, name=layers.name("mean"))(x)
        mean = keras.layers.UpSampling2D((h, w), name=layers.name("mean_image"))(mean)
    for i, level in enumerate(SEVERITY[kind]):
        name = layers.name(f"{kind}_{i}")
        if kind == "contrast":
            own = keras.layers.Rescaling(level, name=f"{name}_own")(x)
            rest = keras.layers.Rescaling(1.0 - level, name=f"{name}_mean")(mean)
            changed = keras.layers.Add(name=f"{name}_sum")([own, rest])
        else:
            changed = keras.layers.Rescaling(1.0, offset=level * high, name=f"{name}_sum")(x)
        out.append(layers.clip(changed, high, f"{kind}_{i}"))
    return out


def corrupt(kinds: list[str], high: float, seed: int) -> variants.Copies:
    """The copies: each type in `kinds` at severities 1-5, type by type."""

    def make(x: Any, layers: variants.Layers) -> list[Any]:
        out = []
        for t, kind in enumerate(kinds):
            rng = np.random.default_rng([seed, t])
            if kind.endswith("noise"):
                out += noise(x, layers, kind, high, rng)
            elif kind in ("contrast", "brightness"):
                out += photometric(x, layers, kind, high)
            else:
                spatial = blur if kind == "gaussian_blur" else pixelate
                out += [spatial(x, layers, level, i) for i, level in enumerate(SEVERITY[kind])]
        return out

    return make


def flip_severities(on_copies: np.ndarray, on_input: np.ndarray) -> np.ndarray:
    """(n, types) first severity at which B's class differs from `on_input`, 6 if none;
    `on_copies` (n, types * 5) lists each type's severities 1-5 in turn."""
    same = (
        np.asarray(on_copies).reshape(len(on_input), -1, LEVELS)
        == np.asarray(on_input)[:, None, None]
    )
    return 1 + np.cumprod(same, axis=2).sum(axis=2)


def spread(severities: np.ndarray) -> np.ndarray:
    """The standard deviation across types, from whole numbers only (sqrt(T sum s^2 -
    (sum s)^2) / T): inputs of equal spread get bit-equal scores."""
    s = np.asarray(severities, np.int64)
    t = s.shape[1]
    return np.sqrt(t * (s * s).sum(axis=1) - s.sum(axis=1) ** 2) / t


def fit(context: Context) -> Scored:
    s, badnet = context.settings, context.badnet
    kinds, high = [str(k) for k in s.teco_corruptions], float(s.pixel_max)
    key = ("teco", tuple(kinds), high, context.seed)
    copier = variants.copies_model(badnet, corrupt(kinds, high, context.seed), "teco_")

    def scores_of(x: np.ndarray, on_input: np.ndarray) -> np.ndarray:
        on_copies = variants.classes_of_copies(badnet, copier, x, context.batch_size)
        return spread(flip_severities(on_copies, on_input))

    clean_x = context.clean.validation.x

    def learn() -> np.ndarray:
        log.info("TeCo: scoring %d clean images", len(clean_x))
        return scores_of(clean_x, predict_classes(badnet, clean_x, context.batch_size))

    clean_scores = context.memo.shared(key, learn)

    def score(inputs: Inputs) -> np.ndarray:
        def compute() -> np.ndarray:
            log.info("TeCo: judging %d images of %s", len(inputs.x), inputs.name)
            return scores_of(inputs.x, inputs.badnet)

        return context.memo.shared(("teco scores", variants.content(inputs.x), *key), compute)

    def place(threshold: float) -> Fitted:
        return Fitted(
            flag_layer=lambda graph: flag_layer(graph, kinds, high, context.seed, threshold),
            score=score,
            threshold=threshold,
            metrics={"threshold": threshold},
        )

    return Scored("teco", clean_x, clean_scores, place)


def flag_layer(
    graph: goodnet.Graph, kinds: list[str], high: float, seed: int, threshold: float
) -> Any:
    """1 where the spread of the flip severities exceeds `threshold`, compared as whole
    numbers: T^2 var = T sum s^2 - (sum s)^2 against T^2 threshold^2."""
    agree = variants.agreement(graph, corrupt(kinds, high, seed), "teco_")
    t = len(kinds)
    prefix, total = None, []
    for level in range(LEVELS):  # the leading run of agreeing severities, per type
        pick = np.zeros((t * LEVELS, t))
        pick[np.arange(t) * LEVELS + level, np.arange(t)] = 1.0
        same = variants.dense(agree, pick, np.zeros(t), f"gn_teco_level_{level}")
        if prefix is not None:
            same = keras.layers.Multiply(name=f"gn_teco_run_{level}")([prefix, same])
        prefix = same
        total.append(same)
    runs = keras.layers.Add(name="gn_teco_runs")(total)
    sev = keras.layers.Rescaling(1.0, offset=1.0, name="gn_teco_severities")(runs)
    squares = keras.layers.Multiply(name="gn_teco_squares")([sev, sev])
    sums = keras.layers.Concatenate(name="gn_teco_both")([sev, squares])
    kernel = np.zeros((2 * t, 2))
    kernel[:t, 0], kernel[t:, 1] = 1.0, 1.0
    sums = variants.dense(sums, kernel, np.zeros(2), "gn_teco_sums")  # sum s, sum s^2
    first = variants.dense(sums, np.array([[1.0], [0.0]]), np.zeros(1), "gn_teco_sum")
    second = variants.dense(sums, np.array([[0.0], [float(t)]]), np.zeros(1), "gn_teco_t_sumsq")
    square_of_sum = keras.layers.Multiply(name="gn_teco_sum_squared")([first, first])
    var = keras.layers.Subtract(name="gn_teco_t2_var")([second, square_of_sum])
    return variants.count_above(var, t * t * threshold * threshold, "gn_flag_teco")
