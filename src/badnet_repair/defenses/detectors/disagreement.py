"""Disagreement: N where the BadNet and the repaired net answer differently. The repair
changed exactly the answers it judged wrong, so this is as good as the repair: a repair
that removes the backdoor turns the triggered answers, and only those, into flags. It
has no score of its own and costs one extra forward pass (B) per input."""

from typing import Any

import tf_keras as keras

from badnet_repair.defenses import goodnet
from badnet_repair.defenses.detectors import Context, Fitted, Inputs

SCORED = False  # a rule: its false rejection is measured, not promised


def check(badnet: keras.Model, settings: Any, clean: Any, batch_size: int) -> None:
    """Nothing to refuse: any two nets of one shape can disagree."""


def fit(context: Context) -> Fitted:
    return Fitted("disagreement", flag_layer=flag_layer, rule=disagree)


def disagree(inputs: Inputs):
    return inputs.badnet != inputs.repaired


def flag_layer(graph: goodnet.Graph) -> Any:
    """1 where argmax B differs from argmax B' (hard one-hots, then their dot product)."""
    agree = keras.layers.Dot(axes=1, name="gn_agreement")(
        [
            goodnet.one_hot(graph.badnet_probs, "gn_bad_onehot"),
            goodnet.one_hot(graph.repaired_probs, "gn_repaired_onehot"),
        ]
    )
    return goodnet.step(agree, 0.5, "gn_flag_disagreement", above=False)
