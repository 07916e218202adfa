"""STRIP (Gao et al. 2019): a trigger dominates whatever it is superimposed on, so the
blends of a triggered input with clean images all get the same confident answer. The score
is minus the BadNet's mean prediction entropy over `goodnet.k` blends
((1 - alpha) * input + alpha * overlay, alpha = `goodnet.alpha`).

STRIP examines B, the net the attacker trained, not the repaired net: the repair weakens
the very dominance it looks for (on the demo, STRIP over B' flagged 3% of triggered inputs,
over B 36%, both at a 3% clean rejection rate). The overlays are `k` images of the clean
training split drawn with the run's seed (not of the held-out split: drawn from all the
validation images with the split's own seed, they were all held-out images, which the
GoodNet's other detectors then could not share for calibration); the threshold is set on
the other validation images, which B never learned from. Both depend on B and the split
alone, so a sweep over one BadNet and split sets them once. Cost: k + 2 forward passes
per input.
"""

import logging
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.defenses import goodnet
from badnet_repair.defenses.detectors import Context, Fitted, Inputs, Scored
from badnet_repair.network import models, topology
from badnet_repair.network.predict import probabilities

log = logging.getLogger(__name__)

MIN_CALIBRATION = 20  # clean images that the threshold is set on, at least


def check(badnet: keras.Model, settings: Any, clean: Any, batch_size: int) -> None:
    """Enough clean images for the overlays and the threshold, and a BadNet whose every
    layer can run over the blends (a symbolic trial, no weights computed)."""
    training, clean_images = len(clean.train), len(clean.validation)
    pool = min(training, clean_images - MIN_CALIBRATION)
    if not 1 <= settings.k <= pool:
        raise UserError(
            f"goodnet.k={settings.k}: expected 1 to {pool} for {training} clean training "
            f"images of {clean_images} (the overlays' pool; the threshold needs "
            f"{MIN_CALIBRATION} others)"
        )
    blends = keras.Input((settings.k, *models.input_shape(badnet)))
    topology.replay(badnet, blends, "trial_", distributed=True, logits=True)


def fit(context: Context) -> Scored:
    s, badnet = context.settings, context.badnet
    key = (s.k, s.alpha, context.seed)
    clean = context.clean
    overlays, calibration_x, entropies = context.memo.shared(
        ("strip", *key),
        lambda: draw(badnet, clean.train.x, clean.holdout.x, s.k, s.alpha, context.seed),
    )

    def score(inputs: Inputs) -> np.ndarray:
        def compute() -> np.ndarray:
            log.info(
                "STRIP: judging %d images of %s, %d blends each", len(inputs.x), inputs.name, s.k
            )
            return -mean_entropy(badnet, inputs.x, overlays, s.alpha)

        return context.memo.shared(("strip scores", inputs.name, *key), compute)

    def place(threshold: float) -> Fitted:
        return Fitted(
            flag_layer=lambda graph: flag_layer(graph, overlays, s.alpha, -threshold),
            score=score,
            threshold=threshold,
            metrics={"entropy_threshold": -threshold},
            parts={"overlays": overlays, "alpha": s.alpha, "entropies": entropies},
        )

    return Scored("strip", calibration_x, -entropies, place)


def blend(x: np.ndarray, overlays: np.ndarray, alpha: float) -> np.ndarray:
    """All k blends of each image: (n, k, H, W, C), `alpha` of each overlay."""
    return (1.0 - alpha) * x[:, None] + alpha * overlays[None]


def mean_entropy(
    model: keras.Model,
    x: np.ndarray,
    overlays: np.ndarray,
    alpha: float = 0.5,
    batch_size: int = 64,
) -> np.ndarray:
    """Mean prediction entropy of `model` over each image's blends with `overlays` (numpy)."""
    k, out = len(overlays), []
    for i in range(0, len(x), batch_size):
        blends = blend(x[i : i + batch_size], overlays, alpha).astype(np.float32)
        p = probabilities(model, blends.reshape(-1, *x.shape[1:]), 4096)
        h = -np.sum(p * np.log(np.maximum(p, np.finfo(np.float64).tiny)), axis=-1)
        out.append(h.reshape(-1, k).mean(axis=1))
    return np.concatenate(out) if out else np.empty(0)


def draw(
    model: keras.Model,
    pool_x: np.ndarray,
    other_x: np.ndarray,
    k: int = 32,
    alpha: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """STRIP's overlays (`k` of `pool_x`, drawn with `seed`) and the images its threshold
    may be calibrated on, `other_x` and the rest of `pool_x` (the overlays never judge
    themselves), with their mean entropies. Returns (overlays, the rest, entropies)."""
    order = np.random.default_rng(seed).permutation(len(pool_x))
    calibration_x = np.concatenate([other_x, pool_x[order[k:]]])
    overlays = pool_x[np.sort(order[:k])].astype(np.float32)
    log.info("STRIP: scoring %d clean images, %d blends each", len(calibration_x), k)
    return overlays, calibration_x, mean_entropy(model, calibration_x, overlays, alpha)


def flag_layer(graph: goodnet.Graph, overlays: np.ndarray, alpha: float, threshold: float) -> Any:
    """1 where the mean entropy of B over the blends of the input with `overlays` is below
    `threshold`."""
    k, size = len(overlays), int(np.prod(overlays.shape[1:]))
    flat = keras.layers.Flatten(name="gn_strip_flat")(graph.x)
    zero_layer = keras.layers.Dense(1, name="gn_strip_zero")
    zero = zero_layer(flat)
    goodnet.constant(zero_layer, [np.zeros((size, 1)), np.zeros(1)])
    stored = keras.layers.Dense(k * size, name="gn_strip_overlays")
    images = stored(zero)  # the overlays, pre-scaled by alpha, held in the bias
    goodnet.constant(stored, [np.zeros((1, k * size)), alpha * overlays.reshape(-1)])
    images = keras.layers.Reshape((k, size), name="gn_strip_overlays_k")(images)
    own = keras.layers.Rescaling(1.0 - alpha, name="gn_strip_input_scaled")(flat)
    own = keras.layers.RepeatVector(k, name="gn_strip_input_k")(own)
    blends = keras.layers.Add(name="gn_strip_blend")([own, images])
    blends = keras.layers.Reshape((k, *overlays.shape[1:]), name="gn_strip_blends")(blends)
    logits = topology.replay(graph.badnet, blends, "strip_", distributed=True, logits=True)
    p = keras.layers.Activation("softmax", name="gn_strip_probs")(logits)
    log_p = keras.layers.Activation("log_softmax", name="gn_strip_log_probs")(logits)
    p_log_p = keras.layers.Multiply(name="gn_strip_p_log_p")([p, log_p])
    p_log_p = keras.layers.Reshape((-1,), name="gn_strip_p_log_p_flat")(p_log_p)
    mean = keras.layers.Dense(1, name="gn_strip_mean_entropy")
    entropy = mean(p_log_p)
    goodnet.constant(mean, [np.full((p_log_p.shape[-1], 1), -1.0 / k), np.zeros(1)])
    return goodnet.step(entropy, threshold, "gn_flag_strip", above=False)
