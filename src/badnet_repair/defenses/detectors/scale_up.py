"""SCALE-UP (Guo et al., ICLR 2023): amplifying a triggered input's pixels keeps the
BadNet's answer, as the trigger survives amplification and still dominates, while a clean
input's answer drifts. Each input is copied with its pixel values multiplied by each of
`goodnet.scale_up_factors` and clipped to the valid range [0, `goodnet.pixel_max`]; its
score is the scaled prediction consistency (SPC), the share of copies on which B answers
what it answers on the input. A high SPC flags it.

With `goodnet.scale_up_classwise` (the paper's data-limited variant) the SPC is
normalised by the clean SPC of the class B answers, (SPC - mean_y) / std_y, with the
mean and standard deviation per class from one half of the clean validation images and
the threshold set on the other half.

It examines B alone (no repaired net), so every clean validation image may set the
threshold (B never learned from them), and a sweep over one BadNet sets it once. Cost:
one forward pass of B per factor and one on the input: 6 at the default 5 factors.
"""

import logging
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.defenses import goodnet, variants
from badnet_repair.defenses.detectors import Context, Fitted, Inputs, Scored
from badnet_repair.network import models
from badnet_repair.network.predict import predict_classes

log = logging.getLogger(__name__)

MIN_CALIBRATION = 20  # clean images that the threshold is set on, at least
MIN_CLASS = 2  # clean images of a class that its own mean and std are taken from, at least


def check(badnet: keras.Model, settings: Any, clean: Any, batch_size: int) -> None:
    """Factors above 1 and enough clean images for the threshold (half of them with
    `scale_up_classwise`)."""
    factors = list(settings.scale_up_factors)
    if not factors or min(factors) <= 1:
        raise UserError(
            f"goodnet.scale_up_factors={factors}: expected a non-empty list of factors above 1"
        )
    usable = len(clean.validation) // (2 if settings.scale_up_classwise else 1)
    if usable < MIN_CALIBRATION:
        raise UserError(
            f"goodnet.detector=scale_up: {usable} clean images for its threshold, "
            f"expected at least {MIN_CALIBRATION}"
        )
    variants.check_range(clean.validation.x, float(settings.pixel_max), "scale_up")


def amplify(factors: list[float], high: float) -> variants.Copies:
    """The copies: x times each factor, clipped to [0, high]."""

    def make(x: Any, layers: variants.Layers) -> list[Any]:
        out = []
        for i, factor in enumerate(factors):
            scaled = keras.layers.Rescaling(float(factor), name=layers.name(f"times_{i}"))(x)
            out.append(layers.clip(scaled, high, f"times_{i}"))
        return out

    return make


def consistency(on_copies: np.ndarray, on_input: np.ndarray) -> np.ndarray:
    """SPC: the share of each input's copies given its own class, (n, m) and (n,) -> (n,)."""
    agree = np.asarray(on_copies) == np.asarray(on_input)[:, None]
    return agree.sum(axis=1) / agree.shape[1]


def class_statistics(
    spc: np.ndarray, classes: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The clean SPC's mean and std per class; a class with fewer than MIN_CLASS images
    takes the pooled ones, and no std is below the pooled std's floor (one factor's worth
    of the SPC, 1/m, where all clean SPCs agree), so no score divides by zero."""
    pooled_mean, pooled_std = float(np.mean(spc)), float(np.std(spc))
    mean, std = np.full(num_classes, pooled_mean), np.full(num_classes, pooled_std)
    for y in range(num_classes):
        own = spc[classes == y]
        if len(own) >= MIN_CLASS:
            mean[y], std[y] = own.mean(), own.std()
    return mean, std


def fit(context: Context) -> Scored:
    s, badnet = context.settings, context.badnet
    factors, high = [float(f) for f in s.scale_up_factors], float(s.pixel_max)
    classwise = bool(s.scale_up_classwise)
    key = ("scale_up", tuple(factors), high, classwise, context.seed)
    copier = variants.copies_model(badnet, amplify(factors, high), "scale_up_")

    def spc_of(x: np.ndarray, on_input: np.ndarray) -> np.ndarray:
        on_copies = variants.classes_of_copies(badnet, copier, x, context.batch_size)
        return consistency(on_copies, on_input)

    floor = 1.0 / len(factors)
    clean_x = context.clean.validation.x
    learned = context.memo.shared(
        key, lambda: learn(badnet, spc_of, clean_x, classwise, floor, context.seed)
    )
    mean, std = learned["mean"], learned["std"]

    def score(inputs: Inputs) -> np.ndarray:
        def compute() -> np.ndarray:
            log.info("SCALE-UP: judging %d images of %s", len(inputs.x), inputs.name)
            spc = spc_of(inputs.x, inputs.badnet)
            return normalise(spc, inputs.badnet, mean, std, floor) if classwise else spc

        return context.memo.shared(("scale_up scores", variants.content(inputs.x), *key), compute)

    def place(threshold: float) -> Fitted:
        # B's SPC must exceed cut_y (per class) to be flagged: the threshold undone
        cuts = np.full_like(mean, threshold)
        if classwise:
            cuts = mean + threshold * np.maximum(std, floor)
        return Fitted(
            flag_layer=lambda graph: flag_layer(graph, factors, high, cuts * len(factors)),
            score=score,
            threshold=threshold,
            metrics={"threshold": threshold},
            parts={"mean": mean, "std": std},
        )

    return Scored("scale_up", learned["x"], learned["scores"], place)


def normalise(
    spc: np.ndarray, classes: np.ndarray, mean: np.ndarray, std: np.ndarray, floor: float
) -> np.ndarray:
    """(SPC - mean_y) / std_y for the class y B answers, std floored at `floor`."""
    classes = np.asarray(classes, int)
    return (spc - mean[classes]) / np.maximum(std[classes], floor)


def learn(
    badnet: keras.Model,
    spc_of: Any,
    clean_x: np.ndarray,
    classwise: bool,
    floor: float,
    seed: int,
) -> dict[str, Any]:
    """The clean SPCs the threshold is calibrated on (all clean images; with `classwise`,
    the per-class statistics from a seeded half, and the normalised scores of the other
    half, `x`)."""
    classes = predict_classes(badnet, clean_x)
    spc = spc_of(clean_x, classes)
    n_classes = models.num_classes(badnet)
    if not classwise:
        mean, std = np.zeros(n_classes), np.ones(n_classes)
        return dict(mean=mean, std=std, scores=spc, x=clean_x)
    order = np.random.default_rng(seed).permutation(len(clean_x))
    stats, held = order[: len(order) // 2], order[len(order) // 2 :]
    mean, std = class_statistics(spc[stats], classes[stats], n_classes)
    scores = normalise(spc[held], classes[held], mean, std, floor)
    return dict(mean=mean, std=std, scores=scores, x=clean_x[held])


def flag_layer(graph: goodnet.Graph, factors: list[float], high: float, cuts: np.ndarray) -> Any:
    """1 where the number of copies given B's class on the input exceeds cuts[y], the
    count that the threshold stands for on B's class y, decided half way between whole
    counts (floor(cut) + 0.5), so no float near-tie can differ from the numpy rule."""
    agree = variants.agreement(graph, amplify(factors, high), "scale_up_")
    count = variants.dense(agree, np.ones((len(factors), 1)), np.zeros(1), "gn_scale_up_count")
    on_input = goodnet.one_hot(graph.badnet_probs, "gn_scale_up_class")
    whole = np.floor(np.asarray(cuts, np.float64) + 1e-6) + 0.5
    cut = variants.dense(on_input, whole[:, None], np.zeros(1), "gn_scale_up_cut")
    excess = keras.layers.Subtract(name="gn_scale_up_excess")([count, cut])
    return goodnet.step(excess, 0.0, "gn_flag_scale_up")
