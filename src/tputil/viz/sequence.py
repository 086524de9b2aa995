"""Activation memory per rank under tensor and sequence parallelism (chapter 11).

``draw_activation_memory(bars, formula=None)`` draws one stacked bar per configuration (for
example "TP p=2", "TP+SP p=2"): the bytes one layer saved for backward on one rank, as measured
by ``course.activations.saved_bytes``, split by region (the two layer norms, attention, MLP).
Where ``formula`` gives the derived count for a bar, a black tick marks its total beside the
measured stack: a tick at the top of a bar says measurement and formula agree.

Gids: ``"{label}-{region}"`` for every segment and ``"{label}-formula"`` for every tick.
"""

from __future__ import annotations

from collections.abc import Mapping

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

__all__ = ["REGION_COLORS", "draw_activation_memory"]

REGION_COLORS = {"ln_1": "#8da0cb", "attn": "#fc8d62", "ln_2": "#66c2a5", "mlp": "#e78ac3"}
REGION_NAMES = {"ln_1": "ln_1 (norm)", "attn": "attention", "ln_2": "ln_2 (norm)", "mlp": "MLP"}


def draw_activation_memory(
    bars: Mapping[str, Mapping[str, int]],
    formula: Mapping[str, Mapping[str, int]] | None = None,
    *,
    unit: int = 1024,
    unit_name: str = "KiB",
    title: str | None = None,
) -> Figure:
    """One stacked bar per label: bars[label][region] bytes (regions in REGION_COLORS order); formula ticks."""
    fig = Figure(figsize=(1.4 + 1.3 * len(bars), 3.6))
    ax = fig.add_subplot()
    for i, (label, regions) in enumerate(bars.items()):
        bottom = 0.0
        for region, color in REGION_COLORS.items():
            height = regions.get(region, 0) / unit
            ax.add_patch(
                Rectangle((i - 0.3, bottom), 0.6, height, facecolor=color, edgecolor="white", gid=f"{label}-{region}")
            )
            bottom += height
        ax.text(i, bottom, f"{bottom:.0f}", ha="center", va="bottom", fontsize=8)
        if formula is not None and label in formula:
            total = sum(formula[label].values()) / unit
            ax.add_patch(Rectangle((i + 0.32, total), 0.12, 0, edgecolor="black", linewidth=2, gid=f"{label}-formula"))
    ax.set_xlim(-0.6, len(bars) - 0.4)
    top = max(sum(r.values()) for r in bars.values()) / unit
    ax.set_ylim(0, 1.15 * top)
    ax.set_xticks(range(len(bars)), list(bars), fontsize=8)
    ax.set_ylabel(f"saved for backward, one layer, one rank ({unit_name})")
    handles = [Rectangle((0, 0), 1, 1, facecolor=c) for c in REGION_COLORS.values()]
    names = [REGION_NAMES[r] for r in REGION_COLORS]
    if formula is not None:
        handles.append(Line2D([0], [0], color="black", linewidth=2))
        names.append("formula (total)")
    ax.legend(handles, names, fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
