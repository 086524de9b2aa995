"""Figures of the course, drawn from real shapes; each function says which chapter uses it.

Every function takes the tensors (or shapes) the chapter computed, draws them with matplotlib and
returns the ``matplotlib.figure.Figure`` without showing it: a notebook displays it with
``display(fig)``, a script saves it with ``fig.savefig(...)``. Figures are built with
``Figure()`` rather than ``pyplot``, so drawing many of them keeps no global state.

Patches that stand for a device carry a ``gid`` (for example ``"device0-before"``), so tests can
count what was drawn without looking at pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch
from torch import Tensor

from tputil.course import lists

__all__ = ["draw_partial_sums", "format_values"]

# One color per device, reused by every figure so that device r looks the same throughout.
DEVICE_COLORS = [
    "#4c72b0",
    "#dd8452",
    "#55a868",
    "#c44e52",
    "#8172b3",
    "#937860",
    "#da8bc3",
    "#8c8c8c",
    "#ccb974",
    "#64b5cd",
]
RESULT_COLOR = "#e8e8e8"


def device_color(r: int) -> str:
    """The color of device ``r`` in every figure of the book (cycling after ten devices)."""
    return DEVICE_COLORS[r % len(DEVICE_COLORS)]


def format_values(t: Tensor, max_values: int = 4) -> str:
    """A short label for a tensor: its values when there are at most ``max_values``, else its shape.

    Whole numbers print without decimals (``[4, 6]``), others with three significant digits.
    """
    if t.numel() == 0 or t.numel() > max_values:
        return f"shape {tuple(t.shape)}"
    values = t.detach().reshape(-1).double().tolist()
    if all(float(v).is_integer() for v in values):
        text = ", ".join(str(int(v)) for v in values)
    else:
        text = ", ".join(f"{v:.3g}" for v in values)
    return text if t.dim() == 0 else f"[{text}]"


def _value_line(t: Tensor) -> str:
    """``"= [4, 6]"`` for a few values, ``"shape (4, 6)"`` for a larger tensor."""
    text = format_values(t)
    return text if text.startswith("shape") else "= " + text


def _box(ax, x: float, y: float, w: float, h: float, color: str, gid: str) -> None:
    patch = FancyBboxPatch(
        (x, y),
        w,
        h,
        boxstyle="round,pad=0.02,rounding_size=0.06",
        facecolor=color,
        edgecolor="#333333",
        linewidth=1.0,
        alpha=0.9,
    )
    patch.set_gid(gid)
    ax.add_patch(patch)


def _arrow(ax, x: float, y_from: float, y_to: float) -> None:
    ax.annotate("", xy=(x, y_to), xytext=(x, y_from), arrowprops=dict(arrowstyle="-|>", color="#333333", linewidth=1.2))


def draw_partial_sums(
    partials: Sequence[Tensor],
    *,
    terms: Sequence[str] | None = None,
    result: str | None = None,
    title: str | None = None,
) -> Figure:
    """Who computes what (chapter 1): each device's partial sum, the all-reduce, the total.

    ``partials[r]`` is the partial sum that device ``r`` computed on its own; ``terms[r]``
    (optional) says how, e.g. ``"z = x1 + x2"``, and ``result`` (optional) names the total, e.g.
    ``"z + y"``. The top row shows one box per device with its partial, the bar in the middle is
    the all-reduce, and the bottom row shows every device holding the same total, computed here
    with ``tputil.course.lists.all_reduce``. Tensors of up to four numbers show their values, larger
    ones their shape.

    Device boxes carry the gids ``"device{r}-before"`` and ``"device{r}-after"``, the bar
    ``"all-reduce"``: 2p device boxes for p devices.
    """
    totals = lists.all_reduce(partials)  # validates the list as well
    p = len(partials)
    if terms is not None and len(terms) != p:
        raise ValueError(
            f"draw_partial_sums got {p} partial sums but {len(terms)} terms; pass one term per device (or terms=None)"
        )

    fig = Figure(figsize=(1.9 * p + 1.8, 3.9))
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.9 if title else 1.0))
    ax.set_xlim(-1.05, p + 0.05)
    ax.set_ylim(-0.1, 3.1)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=12)

    w = 0.84  # box width; device r's column is centered at r + 0.5
    ax.text(-0.08, 2.5, "each device\non its own", ha="right", va="center", fontsize=9)
    ax.text(-0.08, 1.37, "one\ncommunication", ha="right", va="center", fontsize=9)
    ax.text(-0.08, 0.35, "afterwards", ha="right", va="center", fontsize=9)
    for r, part in enumerate(partials):
        cx = r + 0.5
        _box(ax, cx - w / 2, 2.0, w, 1.0, device_color(r), f"device{r}-before")
        ax.text(cx, 2.8, f"device {r}", ha="center", va="center", fontsize=10, fontweight="bold", color="white")
        if terms is not None:
            ax.text(cx, 2.5, terms[r], ha="center", va="center", fontsize=9, color="white")
        ax.text(cx, 2.2, _value_line(part), ha="center", va="center", fontsize=9, color="white")
        _arrow(ax, cx, 2.0, 1.57)
        _arrow(ax, cx, 1.18, 0.72)
        _box(ax, cx - w / 2, 0.0, w, 0.7, RESULT_COLOR, f"device{r}-after")
        ax.text(cx, 0.52, f"device {r}", ha="center", va="center", fontsize=10, fontweight="bold")
        if result is not None:
            ax.text(cx, 0.3, result, ha="center", va="center", fontsize=9)
        ax.text(cx, 0.3 if result is None else 0.12, _value_line(totals[r]), ha="center", va="center", fontsize=9)

    bar = FancyBboxPatch(
        (0.08, 1.2),
        p - 0.16,
        0.35,
        boxstyle="round,pad=0.02,rounding_size=0.06",
        facecolor="#fff3c4",
        edgecolor="#333333",
        linewidth=1.0,
    )
    bar.set_gid("all-reduce")
    ax.add_patch(bar)
    label = "all-reduce: the sum, to every device" if p > 1 else "all-reduce\n(one device: a copy)"
    ax.text(p / 2, 1.375, label, ha="center", va="center", fontsize=9)
    return fig
