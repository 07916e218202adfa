"""Trigger reverse-engineering (Neural Cleanse, Wang et al. 2019) for any set of classes.

For a class t it looks for the smallest mask m (H x W, in [0, 1]) and pattern p (in the
model's input units) such that stamping clean images as x' = (1 - m) x + m p makes the
model answer t. A backdoor target needs a far smaller mask than the other classes; the
anomaly index (distance below the median of the masks' L1 norms, in units of their
median absolute deviation) finds it.

Many classes are optimised at once: each of `slots` classes owns one row of the mask and
pattern variables and draws its own mini-batches; all rows' stamped batches go through the
model in one pass, and a class that finishes hands its row to the next in the queue.
The mask-size weight follows the paper's schedule per class (raised after `patience`
rounds of success, lowered after `patience` rounds of failure); a round is `round_batches`
mini-batches. Reusable beyond the repair: `attack_success` of a reversed trigger on
clean images estimates a model's ASR from clean data alone.
"""

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tf_keras as keras

from badnet_repair.network import models, topology
from badnet_repair.network.predict import any_batch, predict_classes

log = logging.getLogger(__name__)

EPS = 1e-7  # keeps tanh(.)/(2 - EPS) + 0.5 strictly inside (0, 1), as the authors' code
MAD_CONSISTENCY = 1.4826  # MAD of normal data times this estimates its standard deviation
IMPROVEMENT = 0.99  # early stopping counts rounds whose best norm shrank by less than 1%


@dataclass(frozen=True)
class Schedule:
    """How one class's trigger is optimised (the paper's defaults but for the round size)."""

    rounds: int  # at most this many rounds per class
    round_batches: int = 8  # mini-batches per round: the schedule's bookkeeping unit
    batch_size: int = 32
    lr: float = 0.1  # Adam(beta1 0.5, beta2 0.9) in tanh space, as the authors
    init_cost: float = 1e-3
    multiplier: float = 2.0  # cost up by this, down by this ** 1.5
    patience: int = 5  # rounds of success (failure) before the cost goes up (down)
    threshold: float = 0.99  # attack success that counts as success
    wait: bool = True  # cost 0 until the attack first succeeds for `patience` rounds
    early_stop: int = 0  # stop after this many rounds without improvement (0: never)
    init_mask: float = 0.5  # the mask's starting value everywhere


@dataclass
class Trigger:
    target: int
    mask: np.ndarray  # (H, W, 1) in [0, 1]
    pattern: np.ndarray  # (H, W, C) in the model's input units
    norm: float  # L1 norm of the mask: the area it covers
    success: float  # attack success on the optimisation images in its last good round
    valid: bool  # reached `threshold`; if not, mask and pattern are the last ones
    rounds: int
    loss: float = np.nan  # the last round's cross-entropy + cost * norm


def stamp(x: np.ndarray, mask: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Clean images stamped with a trigger: (1 - m) x + m p."""
    return ((1.0 - mask) * x + mask * pattern).astype(np.float32)


def attack_success(model: keras.Model, trigger: Trigger, x: np.ndarray, y: np.ndarray) -> float:
    """Share of the clean images `x` not of the trigger's class that `model` answers with
    that class once stamped: a clean-data estimate of the backdoor's success."""
    others = x[y != trigger.target]
    stamped = stamp(others, trigger.mask, trigger.pattern)
    return float(np.mean(predict_classes(model, stamped) == trigger.target)) if len(others) else 0.0


def anomaly_index(norms: Sequence[float], population: Sequence[float] | None = None):
    """How far each norm lies below the median of `population` (the norms themselves by
    default) in robust standard deviations: its median absolute deviation times 1.4826.
    Negative above the median; only the small side means a backdoor."""
    norms = np.asarray(norms, np.float64)
    population = norms if population is None else np.asarray(population, np.float64)
    median = np.median(population)
    mad = MAD_CONSISTENCY * np.median(np.abs(population - median))
    return (median - norms) / max(mad, 1e-12)


def label_scores(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 512):
    """K-Arm's label pre-screen (Shen et al. 2021) as a score per class: the share of clean
    images of other classes that have it among their top k = C/4 answers (a backdoor
    target is often close to every input)."""
    classes = int(model.output_shape[-1])
    k = 2 if classes <= 8 else max(2, round(0.25 * classes))
    logits = logits_of(model)
    counts = np.zeros(classes)
    topk = tf.function(
        lambda b: tf.math.top_k(logits(b), k).indices,
        input_signature=[any_batch(model)],
        autograph=False,
    )
    for i in range(0, len(x), batch_size):
        indices = topk(x[i : i + batch_size]).numpy()
        np.add.at(counts, indices.ravel(), 1.0)
        labels = y[i : i + batch_size]
        np.add.at(counts, labels, -(indices == labels[:, None]).sum(axis=1))  # not its own
    others = len(x) - np.bincount(y, minlength=classes)
    return counts / np.maximum(others, 1)


def logits_of(model: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """The model's scores before its final softmax, whose gradient a saturated softmax
    would lose: a copy of the net without that softmax, run in inference mode."""
    net = model
    if topology.output_kind(model) != "linear":
        x = keras.Input(models.input_shape(model))
        net = keras.Model(x, topology.replay(model, x, "scores_", logits=True))
    return lambda images: net(images, training=False)


class _State:
    """One class's bookkeeping between rounds (numpy: a few numbers per class)."""

    def __init__(self, target: int, schedule: Schedule, seed: int):
        self.target, self.rounds = target, 0
        self.images = np.random.default_rng([seed, target, 1])  # its own mini-batches
        self.cost = 0.0 if schedule.wait else schedule.init_cost
        self.up = self.down = self.streak = self.stale = 0
        self.raised = self.lowered = False
        self.best: Trigger | None = None

    def update(self, success: float, s: Schedule) -> None:
        """The paper's schedule: cost up after `patience` rounds of success, down after
        `patience` rounds of failure; in waiting mode it starts once the attack succeeds."""
        good = success >= s.threshold
        if self.cost == 0.0:
            self.streak = self.streak + 1 if good else 0
            if self.streak >= s.patience:
                self.cost, self.up, self.down = s.init_cost, 0, 0
            return
        self.up, self.down = (self.up + 1, 0) if good else (0, self.down + 1)
        if self.up >= s.patience:
            self.cost, self.up, self.raised = self.cost * s.multiplier, 0, True
        elif self.down >= s.patience:
            self.cost, self.down, self.lowered = self.cost / s.multiplier**1.5, 0, True

    def done(self, s: Schedule) -> bool:
        stopped = s.early_stop and self.stale >= s.early_stop and self.raised and self.lowered
        return self.rounds >= s.rounds or bool(stopped)


def search(
    model: keras.Model,
    x: np.ndarray,
    classes: Sequence[int],
    schedule: Schedule,
    seed: int,
    slots: int = 16,
    what: str = "trigger search",
) -> dict[int, Trigger]:
    """Reverse-engineer a trigger for each of `classes` from the clean images `x`. Each
    class starts from its own seeded mask and pattern, so its result does not depend on
    which other classes share its rounds. Returns each class's smallest successful
    trigger (or its last one, `valid` false, when the attack never succeeded)."""
    shape = tuple(int(d) for d in x.shape[1:])
    slots = max(1, min(slots, len(classes)))
    engine = _Engine(logits_of(model), shape, slots, float(x.min()), float(x.max()), schedule)
    queue, found = list(classes), {}
    states: list[_State | None] = [None] * slots
    for i in range(slots):
        states[i] = engine.load(i, queue.pop(0), seed)
    rounds = 0
    while any(states):
        live = [i for i, s in enumerate(states) if s is not None]
        idx = np.array(live, np.int32)
        targets = np.array([states[i].target for i in live], np.int32)
        costs = np.array([states[i].cost for i in live], np.float32)
        success, ce = np.zeros(len(live)), np.zeros(len(live))
        for _ in range(schedule.round_batches):
            draws = [states[i].images.integers(0, len(x), schedule.batch_size) for i in live]
            hits, losses = engine.step(x[np.stack(draws)], idx, targets, costs)
            success, ce = success + hits.numpy(), ce + losses.numpy()
        success, ce = success / schedule.round_batches, ce / schedule.round_batches
        masks, patterns = engine.values(idx)
        rounds += 1
        for j, i in enumerate(live):
            state = states[i]
            state.rounds += 1
            norm = float(masks[j].sum())
            if success[j] >= schedule.threshold:
                previous = state.best.norm if state.best and state.best.valid else np.inf
                state.stale = 0 if norm < IMPROVEMENT * previous else state.stale + 1
                if norm < previous:
                    state.best = Trigger(
                        state.target, masks[j], patterns[j], norm, success[j], True, state.rounds
                    )
            elif state.best and state.best.valid:
                state.stale += 1
            state.update(success[j], schedule)
            if state.done(schedule):
                found[state.target] = state.best or Trigger(
                    state.target, masks[j], patterns[j], norm, success[j], False, state.rounds
                )
                found[state.target].rounds = state.rounds
                found[state.target].loss = float(ce[j] + costs[j] * norm)
                states[i] = engine.load(i, queue.pop(0), seed) if queue else None
        if rounds % 10 == 0 or not any(states):
            log.info(
                "%s: round %d, %d of %d classes done, %d in progress",
                what,
                rounds,
                len(found),
                len(classes),
                sum(s is not None for s in states),
            )
    return {c: found[c] for c in classes}


class _Engine:
    """The variables of `slots` triggers in tanh space, their Adam state (per row, so a
    row can restart), and one compiled step over the rows in progress."""

    def __init__(self, logits, shape, slots: int, low: float, high: float, schedule: Schedule):
        h, w, c = shape
        self.schedule, self.low, self.span = schedule, low, max(high - low, 1e-6)
        zeros = lambda channels: tf.Variable(tf.zeros((slots, h, w, channels)))  # noqa: E731
        self.mask, self.pattern = zeros(1), zeros(c)
        self.moments = [zeros(1), zeros(1), zeros(c), zeros(c)]
        self.t = tf.Variable(tf.zeros((slots,)))
        b1, b2, lr = 0.5, 0.9, schedule.lr
        variables = (self.mask, self.pattern)

        @tf.function(
            autograph=False,
            input_signature=[
                tf.TensorSpec((None, None, h, w, c), tf.float32),
                tf.TensorSpec((None,), tf.int32),
                tf.TensorSpec((None,), tf.int32),
                tf.TensorSpec((None,), tf.float32),
            ],
        )
        def step(batch, idx, targets, costs):
            n = tf.shape(batch)[1]
            with tf.GradientTape() as tape:
                rows = tf.gather(self.mask, idx), tf.gather(self.pattern, idx)
                mask, pattern = self._squash(*rows)
                stamped = (1.0 - mask[:, None]) * batch + (mask * pattern)[:, None]
                labels = tf.repeat(targets, n)
                scores = logits(tf.reshape(stamped, (-1, h, w, c)))
                ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, scores)
                ce = tf.reduce_mean(tf.reshape(ce, (-1, n)), axis=1)
                loss = tf.reduce_sum(ce + costs * tf.reduce_sum(mask, axis=(1, 2, 3)))
            grads = tape.gradient(loss, variables)
            live = tf.scatter_nd(idx[:, None], tf.ones_like(costs), tf.shape(self.t))
            self.t.assign_add(live)
            live4 = live[:, None, None, None]
            moments = zip(variables, grads, self.moments[::2], self.moments[1::2], strict=True)
            for var, grad, m, v in moments:
                grad = tf.convert_to_tensor(grad)
                m.assign(m + live4 * (1 - b1) * (grad - m))
                v.assign(v + live4 * (1 - b2) * (tf.square(grad) - v))
                t = tf.maximum(self.t, 1.0)[:, None, None, None]
                m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
                var.assign_sub(live4 * lr * m_hat / (tf.sqrt(v_hat) + EPS))
            answers = tf.argmax(scores, -1, output_type=tf.int32)
            hits = tf.reshape(tf.cast(tf.equal(answers, labels), tf.float32), (-1, n))
            return tf.reduce_mean(hits, axis=1), ce

        self.step = step

    def _squash(self, mask_t, pattern_t):
        mask = tf.tanh(mask_t) / (2 - EPS) + 0.5
        return mask, self.low + self.span * (tf.tanh(pattern_t) / (2 - EPS) + 0.5)

    def load(self, row: int, target: int, seed: int) -> _State:
        """Start `target` in `row`: its own seeded pattern, the schedule's mask, fresh Adam."""
        rng = np.random.default_rng([seed, target])
        shape = self.pattern.shape[1:]
        pattern = rng.uniform(0.0, 1.0, shape)
        mask = np.full(self.mask.shape[1:], self.schedule.init_mask)
        for var, value in ((self.mask, mask), (self.pattern, pattern)):
            var[row].assign(np.arctanh((value - 0.5) * (2 - EPS)).astype(np.float32))
        for m in self.moments:
            m[row].assign(tf.zeros(m.shape[1:]))
        self.t[row].assign(0.0)
        return _State(target, self.schedule, seed)

    def values(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask, pattern = self._squash(tf.gather(self.mask, idx), tf.gather(self.pattern, idx))
        return mask.numpy(), pattern.numpy()
