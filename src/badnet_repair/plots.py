"""Figures a person would rather look at than read."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STAGES = ("badnet", "pruned", "repaired")


def stage_plot(metrics: dict[str, float], triggers: list[str], title: str):
    """Grouped bars: clean accuracy and ASR per trigger, for badnet / pruned / repaired."""
    series = ["clean_acc", *[f"asr/{t}" for t in triggers]]
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(STAGES) * len(series) / 2, 4))
    width = 0.8 / len(series)
    for i, name in enumerate(series):
        values = [metrics.get(f"{stage}/{name}", float("nan")) for stage in STAGES]
        xs = [s + (i - (len(series) - 1) / 2) * width for s in range(len(STAGES))]
        bars = ax.bar(xs, values, width, label=name.replace("asr/", "ASR ").replace("_", " "))
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(STAGES)), STAGES)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig
