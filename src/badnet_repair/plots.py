"""Figures a person would rather look at than read."""

import math
from collections.abc import Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIXED_STAGES = ("badnet", "repaired", "goodnet")  # every run's; a repair may add its own


def stage_plot(metrics: dict[str, float], stages: list[str], triggers: list[str], title: str):
    """Grouped bars: clean accuracy and ASR per trigger at each stage (the BadNet, the
    repair's own stages, the repaired net, the GoodNet), and the GoodNet's detection and
    clean flag (false-rejection) rates."""
    series = ["clean_acc", *[f"asr/{t}" for t in triggers]]
    series += ["flag_rate_clean", *[f"detect/{t}" for t in triggers]]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values = [metrics.get(f"{stage}/{name}", float("nan")) for stage in stages]
        xs = [s + (i - (len(series) - 1) / 2) * width for s in range(len(stages))]
        bars = ax.bar(xs, values, width, label=_label(name))
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def curve_plot(curves: dict[str, Sequence[float]], chosen: int, title: str):
    """Accuracy and ASR against channels pruned, in activation order, with the chosen k."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        style = "--" if name == "val_acc" else "-"
        ax.plot(range(len(values)), values, label=_label(name), lw=1.5, ls=style)
    ax.axvline(chosen, color="grey", ls=":", lw=1)
    ax.annotate(f"pruned: {chosen}", (chosen, 0.02), fontsize=8, color="grey")
    ax.set_xlabel("channels pruned (least active on clean data first)")
    ax.set_ylabel("fraction")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def roc_curve(clean: np.ndarray, poisoned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Share of clean and of poisoned scores above each possible threshold, highest first,
    from (0, 0) to (1, 1)."""
    cuts = np.concatenate([[np.inf], np.unique(np.concatenate([clean, poisoned]))[::-1], [-np.inf]])
    above = [
        1.0 - np.searchsorted(np.sort(s), cuts, side="right") / len(s) for s in (clean, poisoned)
    ]
    return above[0], above[1]


def roc_plot(scores: dict[str, dict], flags: dict, triggers: list[str]):
    """Per detector and trigger: detection of poisoned inputs against false rejection of
    clean ones as the threshold moves (for detectors with a score), and the operating
    point each detector's threshold chose (a marker; all a rule without a score has)."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, answers) in enumerate(flags.items()):
        for j, trigger in enumerate(triggers):
            color = colors[(i * len(triggers) + j) % len(colors)]
            if name in scores:
                fpr, tpr = roc_curve(scores[name][None], scores[name][trigger])
                ax.plot(fpr, tpr, color=color, lw=1.5, label=f"{name}, {trigger}")
            point = (answers.clean.mean(), answers.poisoned[trigger].mean())
            ax.plot(
                *point, "o", color=color, ms=7, mec="black", label=f"{name} threshold, {trigger}"
            )
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set_xlabel("clean test inputs flagged (false rejection)")
    ax.set_ylabel("poisoned inputs flagged (detection)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title("GoodNet detectors: ROC, threshold set on clean validation data", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def leaderboard_plot(rows: list[dict], best: dict[str, str]):
    """Each repair on each BadNet: clean accuracy lost against the worst trigger's ASR
    left, the goal's corner (both <= 0.02) shaded, the clean rule's pick circled."""
    fig, ax = plt.subplots(figsize=(8, 5.5))
    repairs = sorted({row["repair"] for row in rows})
    badnets = sorted({row["badnet"] for row in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*Xh<>"
    ax.fill_between([-0.02, 0.02], -0.02, 0.02, color="green", alpha=0.15, label="goal")
    for row in rows:
        asr = [v for k, v in row.items() if k.startswith("repaired/asr/")]
        if not asr:
            continue
        i, j = repairs.index(row["repair"]), badnets.index(row["badnet"])
        picked = best.get(row["badnet"]) == row["run_id"]
        ax.plot(
            row["drop"],
            max(asr),
            markers[j % len(markers)],
            color=colors[i % len(colors)],
            ms=11 if picked else 7,
            mec="black" if picked else "none",
            mew=2,
        )
    for i, name in enumerate(repairs):
        ax.plot([], [], "o", color=colors[i % len(colors)], label=name)
    for j, name in enumerate(badnets):
        ax.plot([], [], markers[j % len(markers)], color="grey", label=name)
    ax.plot([], [], "o", color="white", mec="black", mew=2, ms=11, label="clean rule's pick")
    ax.set_xlabel("clean accuracy lost (BadNet - repaired, test set)")
    ax.set_ylabel("worst trigger's ASR left")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Leaderboard: every repair on every BadNet", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def close(figure) -> None:
    plt.close(figure)


def intermediate_stages(rows: list[dict]) -> list[str]:
    """Stages that repairs add between the BadNet and the repaired net (`pruned`, ...)."""
    found = {k.split("/")[0] for row in rows for k in row if k.endswith("/clean_acc")}
    return sorted(found - set(FIXED_STAGES))


def sweep_plot(rows: list[dict], x_key: str, group_keys: list[str]):
    """Clean accuracy and ASR per trigger against the swept value, after the repair (solid)
    and at its intermediate stages (dashed), the BadNet's levels dotted; and beside it the
    GoodNet's clean accuracy, clean flag rate and detection rate per trigger."""
    triggers = sorted(
        {k.split("/", 2)[2] for row in rows for k in row if k.startswith("repaired/asr/")}
    )
    styles = [(stage, "--") for stage in intermediate_stages(rows)] + [("repaired", "-")]
    series = ["clean_acc", *[f"asr/{t}" for t in triggers]]
    good = ["clean_acc", "flag_rate_clean", *[f"detect/{t}" for t in triggers]]
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in group_keys), []).append(row)
    fig, (ax, gx) = plt.subplots(1, 2, figsize=(13, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, (group, members) in enumerate(groups.items()):
        suffix = ", ".join(f"{k}={v}" for k, v in zip(group_keys, group, strict=True))
        suffix = f" ({suffix})" if suffix else ""
        numeric = not any(math.isnan(as_number(m.get(x_key))) for m in members)
        members = sorted(members, key=lambda m: float(m[x_key]) if numeric else str(m[x_key]))
        xs = [float(m[x_key]) if numeric else str(m[x_key]) for m in members]
        for i, name in enumerate(series):
            color = colors[(i + g * len(series)) % len(colors)]
            label = _label(name)
            for stage, style in styles:
                ys = [m.get(f"{stage}/{name}", float("nan")) for m in members]
                ax.plot(xs, ys, style, marker="o", color=color, label=f"{label} {stage}{suffix}")
            if g == 0:
                ax.axhline(
                    members[0].get(f"badnet/{name}", float("nan")), color=color, ls=":", lw=1
                )
        for i, name in enumerate(good):
            ys = [m.get(f"goodnet/{name}", float("nan")) for m in members]
            color = colors[(i + g * len(good)) % len(colors)]
            gx.plot(xs, ys, "-", marker="s", color=color, label=f"{_label(name)}{suffix}")
    for axes, title in (
        (ax, "repaired (solid), intermediate stages (dashed); BadNet dotted"),
        (gx, "GoodNet: answers N (poisoned) on clean / poisoned inputs"),
    ):
        axes.set_xlabel(x_key)
        axes.set_ylabel("fraction")
        axes.set_ylim(-0.02, 1.05)
        axes.set_title(title, fontsize=10)
        axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def _label(name: str) -> str:
    for old, new in (
        ("asr/", "ASR "),
        ("detect/", "detected "),
        ("clean_acc", "clean acc"),
        ("val_acc", "validation acc"),
        ("flag_rate_clean", "clean flagged"),
    ):
        name = name.replace(old, new)
    return name


def as_number(value) -> float:
    """A param's value as a number, NaN when it is not one (sweeps mix both)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
