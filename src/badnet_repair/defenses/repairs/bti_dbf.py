"""BTI-DBF(U), backdoor trigger inversion by decoupling benign features, unlearning variant
(Xu, Huang, Li, Qin and Ren, ICLR 2024). No target class and no BatchNorm are needed.

Per round (`bti_dbf.rounds`), on the clean training split:

1. decouple: a soft mask m = (1 + tanh(p)) / 2 in [0, 1], over the feature map of
   `model.layer`, learnt by Adam so that the net still answers the true label from the
   masked features m * f and no longer from the rest (1 - m) * f: minimise
   CE(masked) - min(CE(complement), log classes) + `mask_l1` mean(m) (the authors' loss,
   the complement's term capped at chance). m marks the benign features.
2. invert: a small conv encoder-decoder G (image -> image) learns poisoned-like images
   without knowing the target: G(x) keeps the benign features m * f of x and moves the
   rest, (1 - m) * f, as far as it can: minimise -MSE((1-m) f) + `benign_weight` MSE(m f).
   G's perturbation is bounded by construction: its raw output is scaled into the L2 ball
   of radius `eps` * sqrt(pixels) * (value range) (`eps` a root-mean-square share of the
   range, as I-BAU's bound), and the image is clipped to the clean images' range, which
   only shrinks it. G starts from its seeded random weights (the authors pretrain it
   towards the identity first) and carries over from round to round.
3. unlearn: Adam on the net itself, on batches whose first `portion` of images are
   replaced by G's, with their true labels, plus `feature_weight` times the MSE between
   the generated images' features and their originals'.

The unlearning rate is set per net by the accuracy-budget rule: `bti_dbf.lrs` tried from
the smallest, each a whole run from the BadNet (round 1's mask and generator, which read
the BadNet alone, are computed once and shared by every rate).
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras
from omegaconf import MISSING

from badnet_repair.data import Dataset
from badnet_repair.defenses.budget import increasing, rung, shown, strongest_run
from badnet_repair.defenses.repairs import Case, RepairSettings
from badnet_repair.defenses.repairs.i_bau import radius
from badnet_repair.network import topology, training
from badnet_repair.network.pruning import copy_model
from badnet_repair.ranges import ranged


@dataclass
class BtiDbf:
    """bti_dbf.*: `rounds` of (decouple, invert, unlearn), per unlearning rate of the
    ladder `lrs` (each key is described in conf/repair/bti_dbf.yaml)."""

    rounds: int = ranged(MISSING, ">= 1")
    batch_size: int = ranged(MISSING, ">= 1")
    mask_steps: int = ranged(MISSING, ">= 1")
    mask_lr: float = ranged(MISSING, "> 0")
    mask_l1: float = ranged(MISSING, ">= 0")
    gen_steps: int = ranged(MISSING, ">= 1")
    gen_lr: float = ranged(MISSING, "> 0")
    gen_filters: int = ranged(MISSING, ">= 1")
    eps: float = ranged(MISSING, "> 0")
    benign_weight: float = ranged(MISSING, ">= 0")
    unlearn_steps: int = ranged(MISSING, ">= 1")
    lrs: list[float] = MISSING
    portion: float = ranged(MISSING, "(0, 1]")
    feature_weight: float = ranged(MISSING, ">= 0")
    max_acc_drop: float = ranged(MISSING, "[0, 1)")
    margin_se: float = ranged(MISSING, ">= 0")

    def check(self) -> None:
        increasing(self.lrs, "bti_dbf.lrs")


@dataclass
class Settings(RepairSettings):
    bti_dbf: BtiDbf = MISSING


def describe(bti_dbf: BtiDbf) -> str:
    return (
        f"eps {bti_dbf.eps:g}, lr {shown(bti_dbf.lrs)}, "
        f"{bti_dbf.rounds}x({bti_dbf.mask_steps}+{bti_dbf.gen_steps}+{bti_dbf.unlearn_steps}) steps"
    )


Forward = Callable[..., tuple[tf.Tensor, tf.Tensor]]


def split(model: keras.Model, layer: str) -> Forward:
    """`forward(x, mask=None, training=False) -> (features, scores)`: `model`'s own layers
    run on `x`, the output of `layer` (the features) multiplied by `mask` before the rest
    of the net reads it, and the scores before the final softmax. A walk over the flat
    graph, so the layer need not cut the net in two (DeepID's branches)."""
    view = topology.functional_view(model)  # the same layers, the input layer among them
    config = topology.functional_config(view)
    source, output = tuple(config["input_layers"][0]), tuple(config["output_layers"][0])
    drop_softmax = topology.output_kind(model) == "softmax"

    def forward(x, mask=None, training=False):
        tensors, features = {source: x}, None
        for entry in config["layers"]:
            layer_ = view.get_layer(entry["name"])
            if isinstance(layer_, keras.layers.InputLayer):
                continue
            for index, node in enumerate(entry["inbound_nodes"]):
                inputs = [tensors[tuple(n[:3])] for n in node]
                kwargs = node[0][3] if len(node[0]) > 3 else {}
                arg = inputs if len(inputs) > 1 else inputs[0]
                if drop_softmax and (entry["name"], index, 0) == output:
                    out = _scores_of(layer_, arg)
                else:
                    out = layer_(arg, training=training, **kwargs)
                if entry["name"] == layer:
                    features = out
                    out = out if mask is None else out * mask
                tensors[(entry["name"], index, 0)] = out
        return features, tensors[output]

    return forward


def _scores_of(last: keras.layers.Layer, h: tf.Tensor) -> tf.Tensor:
    """The scores a softmax output layer reads: its input, or a Dense layer's logits."""
    if isinstance(last, (keras.layers.Softmax, keras.layers.Activation)):
        return h
    out = tf.matmul(h, last.kernel)
    return out + last.bias if last.use_bias else out


def mask_of(p: tf.Variable) -> tf.Tensor:
    """The soft mask in [0, 1] of its free parameters (the authors' tanh squashing)."""
    return 0.5 + 0.5 * tf.tanh(p)


def _ce(scores, y) -> tf.Tensor:
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, scores, from_logits=True))


def decoupling_step(
    model: keras.Model, forward: Forward, p: tf.Variable, optimizer: training.Adam, l1: float
):
    """One Adam step on the mask parameters `p`, as a tf.function of a batch. The
    complement's cross-entropy counts up to chance level, log(classes), only: unbounded,
    it drowned the masked part's (30 against 0.6 on `demo`: confidently wrong answers from
    the complement, and the masked features no longer gave the net's own). `model`, the
    net `forward` runs: its classes set the chance level, its input the step's batches."""
    chance = float(np.log(int(model.output_shape[-1])))

    @tf.function(input_signature=training.batch_signature(model), autograph=False)
    def step(x, y):
        with tf.GradientTape() as tape:
            m = mask_of(p)
            kept = _ce(forward(x, m)[1], y)
            removed = tf.minimum(_ce(forward(x, 1.0 - m)[1], y), chance)
            loss = kept - removed + l1 * tf.reduce_mean(m)
        optimizer.apply(tape.gradient(loss, [p]))
        return {"loss": loss, "kept_ce": kept, "removed_ce": removed}

    return step


def agreement(forward: Forward, mask: tf.Tensor, ds: Dataset, batch_size: int = 256) -> float:
    """Share of `ds` on which the net answers from the masked features what it answers from
    all of them: how much of the decision the mask keeps."""
    same = []
    for i in range(0, len(ds), batch_size):
        x = tf.constant(ds.x[i : i + batch_size])
        full, masked = forward(x)[1], forward(x, mask)[1]
        same.append(tf.argmax(full, -1) == tf.argmax(masked, -1))
    return float(np.mean(np.concatenate(same))) if same else 0.0


def generator(shape: tuple, filters: int, seed: int) -> keras.Model:
    """A small conv encoder-decoder (one stride-2 level, a skip connection), image ->
    raw perturbation, seeded. It starts at a random perturbation (scaled into the bound by
    `generate`), not at the identity: there the inversion loss's gradient vanishes, no
    feature having moved, and a start near it stayed there (0.0000 losses on `demo`)."""
    h, w, c = shape
    init = [keras.initializers.GlorotUniform(seed=seed + i) for i in range(5)]
    x = keras.Input(shape)
    a = keras.layers.Conv2D(
        filters, 3, padding="same", activation="relu", kernel_initializer=init[0]
    )(x)
    b = keras.layers.Conv2D(
        2 * filters, 3, 2, "same", activation="relu", kernel_initializer=init[1]
    )(a)
    b = keras.layers.Conv2D(
        2 * filters, 3, padding="same", activation="relu", kernel_initializer=init[2]
    )(b)
    b = keras.layers.Resizing(h, w)(b)
    d = keras.layers.Concatenate()([a, b])
    d = keras.layers.Conv2D(
        filters, 3, padding="same", activation="relu", kernel_initializer=init[3]
    )(d)
    return keras.Model(x, keras.layers.Conv2D(c, 1, kernel_initializer=init[4])(d))


def generate(gen: keras.Model, x, bound: float, low: float, high: float) -> tf.Tensor:
    """G(x): x plus G's output scaled into the L2 ball of radius `bound` (per image), then
    clipped to [low, high] (which only shrinks the perturbation)."""
    raw = gen(x)
    norm = tf.sqrt(tf.reduce_sum(tf.square(raw), axis=[1, 2, 3], keepdims=True) + 1e-12)
    return tf.clip_by_value(x + raw * tf.minimum(1.0, bound / norm), low, high)


def inversion_step(forward: Forward, gen: keras.Model, mask: tf.Tensor, optimizer, bti_dbf, box):
    """One Adam step on the generator, as a tf.function of a batch (`box`: bound, low, high)."""
    weights = gen.trainable_variables

    @tf.function(input_signature=training.batch_signature(gen), autograph=False)
    def step(x, y):
        clean = forward(x)[0]
        with tf.GradientTape() as tape:
            moved = forward(generate(gen, x, *box))[0] - clean
            benign = tf.reduce_mean(tf.square(mask * moved))
            backdoor = tf.reduce_mean(tf.square((1.0 - mask) * moved))
            loss = -backdoor + bti_dbf.benign_weight * benign
        optimizer.apply(tape.gradient(loss, weights))
        return {"loss": loss, "benign_mse": benign, "backdoor_mse": backdoor}

    return step


def unlearning_step(model: keras.Model, forward: Forward, gen: keras.Model, bti_dbf, lr, box):
    """One Adam step on `model` in place, as a tf.function of a batch: its first `portion`
    of images replaced by G's, all with their true labels."""
    weights = model.trainable_variables
    optimizer = training.Adam(weights, lr)

    @tf.function(input_signature=training.batch_signature(model), autograph=False)
    def step(x, y):
        n = tf.shape(x)[0]
        k = tf.cast(tf.math.ceil(bti_dbf.portion * tf.cast(n, tf.float32)), tf.int32)
        made = generate(gen, x[:k], *box)
        with tf.GradientTape() as tape:
            features, scores = forward(tf.concat([made, x[k:]], 0), training=True)
            original = forward(x[:k], training=True)[0]
            feature = tf.reduce_mean(tf.square(features[:k] - original))
            ce = _ce(scores, y)
            loss = ce + bti_dbf.feature_weight * feature
        optimizer.apply(tape.gradient(loss, weights))
        return {"loss": loss, "ce": ce, "feature_mse": feature}

    return step


def _restart(optimizer: training.Adam) -> None:
    for slot in (*optimizer.m, *optimizer.v):
        slot.assign(tf.zeros_like(slot))
    optimizer.iterations.assign(0.0)


class Inversion:
    """Steps 1 and 2 of a round on the net `model`, whose features `forward` gives: the mask,
    then the generator `gen` (kept from round to round), each logged as `name/...`."""

    def __init__(self, case: Case, model: keras.Model, bti_dbf: BtiDbf, name: str):
        self.case, self.model, self.bti_dbf, self.name = case, model, bti_dbf, name
        self.forward = split(model, case.layer)
        x = case.clean.train.x
        self.box = (radius(bti_dbf.eps, x), float(x.min()), float(x.max()))
        self.gen = generator(x.shape[1:], bti_dbf.gen_filters, case.seed)
        shape = self.forward(tf.constant(x[:1]))[0].shape[1:]
        self.p = tf.Variable(tf.zeros(shape))
        self.mask_opt = training.Adam([self.p], bti_dbf.mask_lr)
        self.decouple = decoupling_step(model, self.forward, self.p, self.mask_opt, bti_dbf.mask_l1)

    def decoupled(self, round_: int) -> tf.Tensor:
        """Step 1: a mask from a seeded random start; logs the held-out agreement of the
        masked features with the whole, before and after."""
        rng = np.random.default_rng(self.case.seed + round_)
        self.p.assign(rng.standard_normal(self.p.shape).astype(np.float32))
        _restart(self.mask_opt)
        holdout = self.case.clean.holdout
        before = agreement(self.forward, mask_of(self.p), holdout)
        name = f"{self.name}/round_{round_}"
        self.run(f"{name}/mask", self.decouple, self.bti_dbf.mask_steps, 10 * round_)
        mask = tf.constant(mask_of(self.p))
        self.case.journal.log(
            {
                f"{name}/agreement_before": before,
                f"{name}/agreement": agreement(self.forward, mask, holdout),
                f"{name}/complement_agreement": agreement(self.forward, 1.0 - mask, holdout),
                f"{name}/mask_mean": float(tf.reduce_mean(mask)),
            }
        )
        return mask

    def invert(self, mask: tf.Tensor, round_: int) -> None:
        """Step 2: the generator trained against the mask (its optimiser restarts)."""
        optimizer = training.Adam(self.gen.trainable_variables, self.bti_dbf.gen_lr)
        step = inversion_step(self.forward, self.gen, mask, optimizer, self.bti_dbf, self.box)
        self.run(
            f"{self.name}/round_{round_}/generator", step, self.bti_dbf.gen_steps, 10 * round_ + 1
        )

    def run(self, name: str, step, steps: int, offset: int, score: bool = False) -> None:
        """`steps` of `step`; the net's held-out accuracy reported only if `score` (the
        mask and generator steps leave the net as it was)."""
        self.case.run_steps(
            name,
            self.model,
            step,
            steps=steps,
            batch_size=self.bti_dbf.batch_size,
            seed_offset=offset,
            score=score,
        )


def unlearned(case: Case, bti_dbf: BtiDbf, lr: float, first: dict) -> keras.Model:
    """A copy of the BadNet after `rounds` rounds at unlearning rate `lr`. `first` holds
    round 1's mask and generator weights once computed (they read the BadNet alone)."""
    model = copy_model(case.badnet)
    name = f"bti_dbf/lr_{rung(lr)}"
    inv = Inversion(case, model, bti_dbf, name)
    step = unlearning_step(model, inv.forward, inv.gen, bti_dbf, lr, inv.box)
    for r in range(1, bti_dbf.rounds + 1):
        if r == 1 and first:
            mask = first["mask"]
            inv.gen.set_weights(first["gen"])
        else:
            mask = inv.decoupled(r)
            inv.invert(mask, r)
            if r == 1:
                first.update(mask=mask, gen=inv.gen.get_weights())
        inv.run(f"{name}/round_{r}/unlearn", step, bti_dbf.unlearn_steps, 10 * r + 2, True)
    return model


def repair(case: Case, bti_dbf: BtiDbf):
    first: dict = {}
    train = lambda lr: unlearned(case, bti_dbf, lr, first)  # noqa: E731
    return strongest_run(
        case, "bti_dbf", "lr", bti_dbf.lrs, train, bti_dbf.max_acc_drop, bti_dbf.margin_se
    )[1]
