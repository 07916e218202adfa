"""Pruning by learnt channel masks, shared by the mask-learning repairs (RNP, ANP): zero
the BadNet's channels whose mask is at most a threshold t, t the largest of 0, step,
2 step, ... < 1 whose clean held-out accuracy stays within the repair's budget
(`budget.strongest_within`); when even t = 0 costs too much, nothing is pruned. The
pruned channels are exactly zero in the returned model: the conv's (or Dense layer's)
kernel and bias, and a BN's scale, shift and moving mean after it (`channels.prune`);
the other channels keep their weights as they were."""

import numpy as np
import tf_keras as keras

from badnet_repair import plots
from badnet_repair.defenses.budget import strongest_within
from badnet_repair.defenses.repairs import Case
from badnet_repair.network.channels import Masks, prune
from badnet_repair.network.predict import correct
from badnet_repair.network.pruning import copy_model


def correct_by_threshold(
    case: Case, values: dict[str, np.ndarray], thresholds: np.ndarray, dense: bool = False
) -> np.ndarray:
    """Per threshold t and clean held-out image, whether the BadNet with every channel
    whose mask is at most t zeroed gets the image right."""
    probe = copy_model(case.badnet)
    binary = Masks(probe, dense)
    curve = []
    for t in thresholds:
        for unit, m in zip(binary.units, binary.values, strict=True):
            m.assign((values[unit.name] > t).astype(np.float32))
        binary.apply()
        curve.append(correct(probe, case.clean.holdout, case.batch_size))
    return np.array(curve)


def prune_by_threshold(
    case: Case,
    name: str,
    label: str,
    values: dict[str, np.ndarray],
    step: float,
    max_acc_drop: float,
    margin_se: float,
    dense: bool = False,
) -> keras.Model:
    """A copy of the BadNet with its channels whose mask (`values`, per unit) is at most
    the chosen threshold zeroed. Logs `name/threshold_val_acc`, `name/threshold_pruned`,
    `name/channels_pruned`, `name/channels`, `name/threshold`, the notes `name_masks`,
    `name_threshold`, `name_thresholds`, `name_pruned_channels`, and the figure
    `name.png`, titled `label`."""
    everything = np.concatenate(list(values.values()))
    thresholds = np.round(np.arange(0.0, 1.0, step), 6)
    right = correct_by_threshold(case, values, thresholds, dense)
    curve = right.mean(axis=1)
    pruned_at = np.array([(everything <= t).sum() for t in thresholds])
    held = {None: case.input_holdout_correct(), **dict(zip(thresholds, right, strict=True))}
    # None, pruning nothing, comes first: it stays when even threshold 0 costs too much
    chosen = strongest_within(
        case, list(held), held.get, max_acc_drop, margin_se, f"{name} threshold"
    )
    off = {unit: m <= (chosen if chosen is not None else -1) for unit, m in values.items()}
    off_lists = {unit: np.flatnonzero(o).tolist() for unit, o in off.items()}
    pruned = copy_model(case.badnet)
    count = prune(pruned, off, dense)
    case.journal.curves({f"{name}/threshold_val_acc": curve, f"{name}/threshold_pruned": pruned_at})
    case.journal.log({f"{name}/channels_pruned": count, f"{name}/channels": everything.size})
    if chosen is not None:
        case.journal.log({f"{name}/threshold": float(chosen)})
    case.journal.note(
        **{
            f"{name}_threshold": None if chosen is None else float(chosen),
            f"{name}_masks": {unit: np.round(m, 4).tolist() for unit, m in values.items()},
            f"{name}_thresholds": thresholds.tolist(),
            f"{name}_pruned_channels": off_lists,
        }
    )
    title = f"{label}: {count} of {everything.size} channels pruned (mask <= {chosen})"
    figure = _figure(thresholds, curve, pruned_at, everything, chosen, title)
    case.journal.figure(figure, f"{name}.png")
    return pruned


def _figure(thresholds, curve, pruned_at, masks, chosen: float | None, title: str):
    """The threshold curve (held-out accuracy and channels pruned against the mask
    threshold, the chosen one marked) beside the masks' histogram."""
    fig, (ax, hx) = plots.plt.subplots(1, 2, figsize=(11, 4))
    ax.plot(thresholds, curve, "o-", label="clean held-out accuracy")
    if chosen is not None:
        ax.axvline(chosen, color="grey", ls=":", lw=1)
    ax.set_xlabel("mask threshold (channels with mask <= t zeroed)")
    ax.set_ylabel("clean held-out accuracy")
    ax.set_ylim(-0.02, 1.05)
    twin = ax.twinx()
    twin.plot(thresholds, pruned_at, "s--", color="tab:orange", label="channels pruned")
    twin.set_ylabel("channels pruned")
    ax.legend(loc="lower left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    hx.hist(masks, bins=40, range=(0, 1))
    hx.set_yscale("log")
    hx.set_xlabel("mask value")
    hx.set_ylabel("channels")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
