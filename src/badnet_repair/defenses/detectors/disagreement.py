"""Disagreement: N where the repaired net B' disagrees with the BadNet B's answer, by a
margin set so that the promised false rejection holds. The repair changed the answers
it judged wrong, so this is as good as the repair: a repair that removes the backdoor
turns the triggered answers into flags.

The score of an input is B''s probability of its own class minus its probability of B's
class: 0 where the two nets agree, up to 1 for a confident disagreement. Its threshold
is calibrated conformally on the clean held-out images (which the repair did not train
on), the ones B gets wrong included: where fewer than `goodnet.frr` of clean images
make the nets disagree, every disagreement is flagged; where more do (a repair that
changed many clean answers), only the most confident ones. It costs one extra forward
pass (B) per input."""

from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair.defenses import goodnet
from badnet_repair.defenses.detectors import Context, Fitted, Inputs, Scored
from badnet_repair.network.predict import probabilities

# The threshold sits this far above the calibrated score: agreeing nets (score 0) never
# flag, and neither does a score equal to the calibrated one (a net that answers every
# input alike), in numpy or in the GoodNet's float32 step alike.
MARGIN = 1e-6


def check(badnet: keras.Model, settings: Any, clean: Any, batch_size: int) -> None:
    """Nothing to refuse: any two nets of one shape can disagree."""


def margin(p_repaired: np.ndarray, badnet_classes: np.ndarray) -> np.ndarray:
    """B''s top probability minus its probability of B's class, per input."""
    rows = np.arange(len(p_repaired))
    return p_repaired.max(axis=1) - p_repaired[rows, np.asarray(badnet_classes, int)]


def fit(context: Context) -> Scored:
    holdout, batch = context.clean.holdout, context.batch_size
    p_bad = probabilities(context.badnet, holdout.x, batch)
    clean_scores = margin(probabilities(context.repaired, holdout.x, batch), p_bad.argmax(axis=1))

    def score(inputs: Inputs) -> np.ndarray:
        return margin(probabilities(context.repaired, inputs.x, batch), inputs.badnet)

    def place(calibrated: float) -> Fitted:
        threshold = calibrated + MARGIN
        return Fitted(
            flag_layer=lambda graph: flag_layer(graph, threshold),
            score=score,
            threshold=threshold,
            metrics={"margin_threshold": threshold},
        )

    return Scored("disagreement", holdout.x, clean_scores, place)


def flag_layer(graph: goodnet.Graph, threshold: float) -> Any:
    """1 where B''s top probability exceeds its probability of B's class by > threshold."""
    repaired_top = goodnet.one_hot(graph.repaired_probs, "gn_repaired_onehot")
    top = keras.layers.Dot(axes=1, name="gn_repaired_top")([repaired_top, graph.repaired_probs])
    bad_class = goodnet.one_hot(graph.badnet_probs, "gn_bad_onehot")
    of_bad = keras.layers.Dot(axes=1, name="gn_repaired_of_bad")([bad_class, graph.repaired_probs])
    gap = keras.layers.Subtract(name="gn_disagreement_margin")([top, of_bad])
    return goodnet.step(gap, threshold, "gn_flag_disagreement", above=True)
