"""Neural Cleanse's pictures and per-class table: the reversed triggers beside a clean
image, and every class's anomaly index against the threshold."""

import numpy as np

from badnet_repair.data import Dataset
from badnet_repair.defenses import trigger_search as ts
from badnet_repair.plots import plt


def csv(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [",".join(columns)]
    lines += [",".join(str(row.get(key, "")).replace(",", ";") for key in columns) for row in rows]
    return "\n".join(lines) + "\n"


def trigger_figure(
    triggers: dict[int, ts.Trigger],
    index: np.ndarray,
    flagged: list[int],
    shown: list[int],
    holdout: Dataset,
    low: float,
    high: float,
):
    """Per class: the mask, the pattern, the trigger on grey and on a clean image."""
    fig, axes = plt.subplots(len(shown), 4, figsize=(8.5, 2.4 * len(shown)), squeeze=False)
    for row, c in zip(axes, shown, strict=True):
        trigger = triggers[c]
        example = holdout.x[holdout.y != c][:1]
        grey = np.full_like(example, (low + high) / 2)
        panels = [
            (trigger.mask[..., 0], "mask"),
            (trigger.pattern, "pattern"),
            (ts.stamp(grey, trigger.mask, trigger.pattern)[0], "trigger on grey"),
            (ts.stamp(example, trigger.mask, trigger.pattern)[0], "stamped example"),
        ]
        for ax, (image, title) in zip(row, panels, strict=True):
            shown_image = image if image.ndim == 2 else (image - low) / max(high - low, 1e-9)
            if shown_image.ndim == 3 and shown_image.shape[-1] == 1:
                shown_image = shown_image[..., 0]
            cmap = "gray" if shown_image.ndim == 2 else None
            ax.imshow(np.clip(shown_image, 0, 1), cmap=cmap, vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        status = "FLAGGED" if c in flagged else "not flagged"
        row[0].set_ylabel(
            f"class {c}\nnorm {trigger.norm:.1f}\nindex {index[c]:.2f}\n{status}",
            fontsize=8,
        )
    fig.suptitle("Neural Cleanse: reversed triggers (flagged first, then the next candidates)")
    fig.tight_layout()
    return fig


def anomaly_figure(
    index: np.ndarray,
    population: list[int],
    flagged: list[int],
    ranked: list[int],
    threshold: float,
):
    """The anomaly index of every fully optimised class, the threshold dashed."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(ranked) + 2), 3.5))
    values = [index[c] for c in ranked]
    colors = ["tab:red" if c in flagged else "tab:blue" for c in ranked]
    hatches = ["//" if c in population else "" for c in ranked]
    ax.bar(range(len(ranked)), values, color=colors, hatch=hatches, edgecolor="white")
    ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xticks(range(len(ranked)), [str(c) for c in ranked], fontsize=7, rotation=90)
    ax.set_xlabel("class (fully optimised; hatched: references, whose norms set median and MAD)")
    ax.set_ylabel("anomaly index (small-mask side)")
    ax.set_title(f"Neural Cleanse: flagged {', '.join(map(str, flagged)) or 'none'}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
