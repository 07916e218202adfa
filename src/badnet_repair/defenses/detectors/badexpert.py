"""BaDExpert (Xie et al., ICLR 2024): a backdoor expert E, B fine-tuned on clean images
with deliberately wrong labels (y + 1) mod N, forgets the normal task but keeps the
backdoor, as no triggered image ever tells it otherwise; an auxiliary model M' keeps
the normal task and has lost the backdoor. M' is the run's repaired net B' where the
repair has an FT-SAM step, else B repaired by FT-SAM for the detector alone
(`goodnet.auxiliary=auto`): with a repair that leaves the backdoor in, such as
fine-pruning on these nets, M' = B' answers the target too and the score fails on half
the zoo (docs/goodnet.md). On an input where B
answers y, a = E's probability of y and b = M''s: a triggered input has a high, b low;
a clean one the reverse. The score is the authors' default ('triangle'),
-min(2b / max(a, 1e-8), (1 - a) / max(0.5 - b, 1e-8)), flagged above a conformal
threshold calibrated on every clean held-out image (on the class B answers, right or
wrong, as on any new input), together with the GoodNet's other detectors.

E stops as soon as its accuracy on the clean held-out images falls below
`goodnet.expert_stop_acc`, checked after every step, or when its epochs end. The paper
trains one epoch with Adam at 1e-4 (batch 128, 2,000 images, BatchNorm ResNets); on our
small nets that leaves E a copy of B (held-out accuracy 0.99 on the demo) and the score
then merely reads B's confidence (demo_bn: 59% detected). A gentle 3e-4 for 2 epochs of
batch 32 keeps the backdoor and mostly forgets (0.25-0.5 held-out accuracy), hence the
defaults. E (and a fine-tuned M') depend on B alone, so the points of a sweep over one
BadNet train them once. Cost: two extra forward passes per input (B and E; M' = B' is
the GoodNet's own answer), one more with an M' of its own, whose FT-SAM run costs what
the repair does (about two minutes on the demo, 2 cores).
"""

import hashlib
import logging
from typing import Any

import numpy as np
import tf_keras as keras

from badnet_repair import UserError
from badnet_repair.data import Dataset
from badnet_repair.defenses import goodnet
from badnet_repair.defenses.budget import NoneWithinBudget
from badnet_repair.defenses.clean import Memo
from badnet_repair.defenses.detectors import Context, Fitted, Inputs, Scored
from badnet_repair.defenses.repairs import Case
from badnet_repair.defenses.repairs import ft_sam as ft_sam_repair
from badnet_repair.journal import Journal
from badnet_repair.network import models
from badnet_repair.network.predict import accuracy, predict_classes, probabilities
from badnet_repair.network.pruning import copy_model
from badnet_repair.network.training import finetune, seed_everything

log = logging.getLogger(__name__)

EPS = 1e-8  # the authors' guard on both divisions
MIN_CALIBRATION = 20  # clean held-out images the threshold is set on, at least
AUXILIARY = "goodnet/badexpert/auxiliary/"  # where an own auxiliary's training is logged


def check(badnet: keras.Model, settings: Any, clean: Any, batch_size: int) -> None:
    """Any classifier will do, with enough clean held-out images to set the threshold on."""
    if len(clean.holdout) < MIN_CALIBRATION:
        raise UserError(
            f"goodnet.detector=badexpert: {len(clean.holdout)} clean held-out images, "
            f"expected at least {MIN_CALIBRATION} for its threshold (raise data.holdout, or "
            "leave it out: goodnet.detector=disagreement)"
        )


def auxiliary_kind(settings: Any, repair_steps: Any = ()) -> str:
    """`goodnet.auxiliary` as a plain string (an enum in the config, a string in tests),
    `auto` resolved: `repaired` where the run's repair has an FT-SAM step, else `ft_sam`."""
    kind = str(getattr(settings.auxiliary, "value", settings.auxiliary))
    if kind == "auto":
        return "repaired" if "ft_sam" in repair_steps else "ft_sam"
    return kind


def triangle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The authors' default score: high where E agrees with B (a) and M' does not (b)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return -np.minimum(2.0 * b / np.maximum(a, EPS), (1.0 - a) / np.maximum(0.5 - b, EPS))


def train_expert(
    badnet: keras.Model, clean: Any, settings: Any, seed: int
) -> tuple[keras.Model, dict[str, float]]:
    """E: a copy of B trained on the clean training split relabelled (y + 1) mod N, until
    its held-out accuracy (true labels) falls below `expert_stop_acc` or the epochs end."""
    n, s = models.num_classes(badnet), settings
    shifted = Dataset(f"{clean.train.name}_shifted", clean.train.x, (clean.train.y + 1) % n)
    expert, seen = copy_model(badnet), {"steps": 0.0, "holdout_acc": 1.0}

    def forgotten(steps: int) -> bool:
        seen["steps"], seen["holdout_acc"] = float(steps), accuracy(expert, clean.holdout)
        return seen["holdout_acc"] < s.expert_stop_acc

    seed_everything(seed)
    finetune(
        expert,
        shifted,
        None,
        s.expert_epochs,
        s.expert_lr,
        s.expert_batch_size,
        seed=seed,
        stop=forgotten,
    )
    stopped = seen["holdout_acc"] < s.expert_stop_acc
    log.info(
        "BaDExpert: the expert's held-out clean accuracy is %.4f after %d steps (%s %g)",
        seen["holdout_acc"],
        seen["steps"],
        "stopped below" if stopped else "its epochs ended above the stop at",
        s.expert_stop_acc,
    )
    return expert, {f"expert_{k}": v for k, v in seen.items()}


def train_auxiliary(badnet: keras.Model, clean: Any, settings: Any, seed: int) -> keras.Model:
    """M' for `goodnet.auxiliary=finetuned`: B fine-tuned on the true labels."""
    aux = copy_model(badnet)
    seed_everything(seed)
    finetune(
        aux,
        clean.train,
        clean.holdout,
        settings.aux_epochs,
        settings.aux_lr,
        settings.expert_batch_size,
        seed=seed,
    )
    return aux


def train_ft_sam_auxiliary(
    badnet: keras.Model, clean: Any, ft_sam: Any, seed: int, batch_size: int
) -> keras.Model | None:
    """M' for `goodnet.auxiliary=ft_sam`: B repaired by FT-SAM at `ft_sam`'s settings, as
    the repair would, its series logged to the active run under `AUXILIARY` (apart from
    the repair's: they are not in metrics.json); None where no learning rate keeps
    FT-SAM's budget."""
    log.info("BaDExpert: repairing a copy of B with FT-SAM for its auxiliary model")
    case = Case(badnet, "", clean, Journal(AUXILIARY), seed, batch_size, Memo())
    seed_everything(seed)
    try:
        return ft_sam_repair.repair(case, ft_sam=ft_sam)
    except NoneWithinBudget as declined:
        log.warning("BaDExpert: no FT-SAM auxiliary (%s); the repaired net B' is used", declined)
        return None


def fit(context: Context) -> Scored:
    s, clean, badnet = context.settings, context.clean, context.badnet
    held = clean.holdout
    answered = predict_classes(badnet, held.x, context.batch_size)
    expert_key = (s.expert_lr, s.expert_epochs, s.expert_batch_size, s.expert_stop_acc)
    expert_key = ("badexpert expert", *expert_key, context.seed)
    expert, metrics = context.memo.shared(
        expert_key, lambda: train_expert(badnet, clean, s, context.seed)
    )
    kind = auxiliary_kind(s, context.repair_steps)
    if kind == "repaired":
        aux, aux_key = context.repaired, None
    elif kind == "ft_sam":
        if context.ft_sam is None:
            raise UserError("goodnet.auxiliary=ft_sam: the run has no ft_sam settings")
        aux_key = ("badexpert ft_sam auxiliary", repr(context.ft_sam), context.seed)
        aux = context.memo.shared(
            aux_key,
            lambda: train_ft_sam_auxiliary(
                badnet, clean, context.ft_sam, context.seed, context.batch_size
            ),
        )
        if aux is None:
            aux, aux_key = context.repaired, None
    else:
        aux_key = (
            "badexpert auxiliary",
            s.aux_lr,
            s.aux_epochs,
            s.expert_batch_size,
            context.seed,
        )
        aux = context.memo.shared(aux_key, lambda: train_auxiliary(badnet, clean, s, context.seed))
    own = Memo()  # B''s probabilities: one repaired net per run, not shared

    def probs(model: keras.Model, key: tuple | None, x: np.ndarray) -> np.ndarray:
        """`model`'s probabilities on `x`, computed once per content of `x`."""
        content = (x.shape, hashlib.sha1(np.ascontiguousarray(x)).hexdigest())
        compute = lambda: probabilities(model, x, context.batch_size)  # noqa: E731
        return (own if key is None else context.memo).shared((key, content), compute)

    def ab(inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
        rows = np.arange(len(inputs.x))
        p_expert = probs(expert, expert_key, inputs.x)
        p_aux = probs(aux, aux_key, inputs.x)
        return p_expert[rows, inputs.badnet], p_aux[rows, inputs.badnet]

    def score(inputs: Inputs) -> np.ndarray:
        return triangle(*ab(inputs))

    a, b = ab(Inputs(held.name, held.x, answered, answered))
    calibration_scores = triangle(a, b)
    log.info(
        "BaDExpert: scored %d clean held-out images (median a %.3f, b %.3f)",
        len(held),
        np.median(a),
        np.median(b),
    )

    def place(threshold: float) -> Fitted:
        return Fitted(
            flag_layer=lambda graph: flag_layer(graph, expert, aux, threshold),
            score=score,
            threshold=threshold,
            metrics={
                **metrics,
                "auxiliary_is_repaired": float(aux is context.repaired),
                "threshold": threshold,
            },
            parts={"expert": expert, "auxiliary": aux},
        )

    return Scored("badexpert", held.x, calibration_scores, place)


def flag_layer(
    graph: goodnet.Graph, expert: keras.Model, aux: keras.Model, threshold: float
) -> Any:
    """1 where the score of E and M' on the class B answers is above `threshold`."""
    label = goodnet.one_hot(graph.badnet_probs, "gn_badexpert_bad_onehot")
    p_expert = goodnet.probabilities(expert, graph.x, "expert_")
    if aux is graph.repaired:
        p_aux = graph.repaired_probs
    else:
        p_aux = goodnet.probabilities(aux, graph.x, "aux_")
    a = keras.layers.Dot(axes=1, name="gn_badexpert_a")([label, p_expert])
    b = keras.layers.Dot(axes=1, name="gn_badexpert_b")([label, p_aux])
    return score_above(a, b, threshold)


def score_above(a: Any, b: Any, threshold: float) -> Any:
    """1 where triangle(a, b) > `threshold`, for tensors a, b (batch, 1), without dividing
    (no standard layer divides): with c = -threshold (>= 0, as every score is <= 0),
    score > threshold <=> min(A, B) < c <=> 2b < c max(a, eps) or 1 - a < c max(0.5 - b,
    eps), the divisors being positive: max(d1, d2) > 0 for d1 = (c max(a, eps) - 2b) / eps
    and d2 = (c max(0.5 - b, eps) - (1 - a)) / eps. Each difference is taken at the scale
    of a and b (1 - a is exact near a = 1, where triggered inputs are) and the maxima by
    a Maximum layer, exactly; the 1 / eps lets even d = c saturate the step."""
    ab = keras.layers.Concatenate(name="gn_badexpert_ab")([a, b])
    terms = (
        ("bases", [[1.0, 0.0], [0.0, -1.0]], [0.0, 0.5]),  # a, 0.5 - b
        ("eps", [[0.0, 0.0], [0.0, 0.0]], [EPS, EPS]),
        ("sides", [[0.0, -1.0], [2.0, 0.0]], [0.0, 1.0]),  # 2b, 1 - a
    )
    out = {}
    for name, kernel, bias in terms:
        layer = keras.layers.Dense(2, name=f"gn_badexpert_{name}")
        out[name] = layer(ab)
        goodnet.constant(layer, [np.array(kernel), np.array(bias)])
    guarded = keras.layers.Maximum(name="gn_badexpert_guarded")([out["bases"], out["eps"]])
    parts = keras.layers.Concatenate(name="gn_badexpert_parts")([guarded, out["sides"]])
    c, sides = -float(threshold), []
    for i, kernel in enumerate(([c, 0.0, -1.0, 0.0], [0.0, c, 0.0, -1.0])):
        side = keras.layers.Dense(1, name=f"gn_badexpert_d{i + 1}")
        sides.append(side(parts))
        goodnet.constant(side, [np.array(kernel)[:, None] / EPS, np.zeros(1)])
    either = keras.layers.Maximum(name="gn_badexpert_either")(sides)
    return goodnet.step(either, 0.0, "gn_flag_badexpert")
