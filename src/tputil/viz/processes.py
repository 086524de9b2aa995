"""Real processes (chapter 8): how `launch.run_processes` wires p ranks, and where a rank's time goes.

``draw_launch(p)`` draws the parent process (the notebook) hosting the rendezvous store, the p
rank processes it starts, each told its rank through torchrun's environment variables, and the
backend's links between the ranks. Boxes carry gids ``"parent"``, ``"store"``, ``"rank{r}"``
and ``"link{r}-{s}"`` (one per pair of ranks that talk directly; every pair, as gloo connects
them all).

``draw_timeline(passes)`` draws measured forward passes, one row per rank: the whole pass as a
light bar (gid ``"rank{r}-pass"``) and every all-reduce inside it as a bar in the rank's color
(gid ``"rank{r}-all_reduce{i}"``); the times are what `course.ch08_real_processes.tp_tour` measured.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Patch, Polygon, Rectangle

from tputil.viz import device_color

__all__ = ["draw_launch", "draw_timeline"]

PASS_COLOR = "#e3e3e3"


def _box(ax, x, y, w, h, gid, *, face="white", edge="#333333", style="round,pad=0.02,rounding_size=0.08"):
    patch = FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=face, edgecolor=edge, linewidth=1.1)
    patch.set_gid(gid)
    ax.add_patch(patch)
    return patch


def draw_launch(world_size: int, *, backend: str = "gloo", title: str | None = None) -> Figure:
    """The parent, its rendezvous store and `world_size` rank processes joined by the backend."""
    if not isinstance(world_size, int) or not 1 <= world_size <= 8:
        raise ValueError(f"world_size={world_size!r}: draw 1 to 8 ranks")
    p = world_size
    row_h, gap = 0.9, 0.35
    height = max(3.0, p * (row_h + gap) + 0.8)
    fig = Figure(figsize=(9.5, 0.9 + 0.75 * height))
    ax = fig.add_axes([0.01, 0.01, 0.98, 0.86 if title else 0.98])
    ax.set_xlim(0, 13)
    ax.set_ylim(0, height)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)

    # the parent: this notebook, hosting the store
    mid = height / 2
    _box(ax, 0.2, mid - 1.2, 4.3, 2.4, "parent", face="#f7f7f7")
    ax.text(2.35, mid + 0.85, "the notebook's process (parent)", ha="center", va="center", fontsize=9)
    _box(ax, 0.55, mid - 0.75, 3.6, 1.1, "store", face="#fff2cc")
    ax.text(2.35, mid - 0.05, "TCPStore, 127.0.0.1", ha="center", va="center", fontsize=9)
    ax.text(2.35, mid - 0.45, "a free port the OS picked", ha="center", va="center", fontsize=8)
    ax.text(
        2.35, mid - 1.0, "starts the ranks, collects results", ha="center", va="center", fontsize=7.5, color="#555555"
    )

    # the ranks, each its own process
    x_rank, w_rank = 6.6, 3.4
    tops = [height - 0.4 - r * (row_h + gap) for r in range(p)]
    for r, top in enumerate(tops):
        y = top - row_h
        _box(ax, x_rank, y, w_rank, row_h, f"rank{r}", face=device_color(r))
        ax.text(
            x_rank + w_rank / 2,
            y + 0.62,
            f"process of rank {r}",
            ha="center",
            va="center",
            fontsize=9,
            color="white",
            fontweight="bold",
        )
        ax.text(
            x_rank + w_rank / 2,
            y + 0.26,
            f"RANK={r}  WORLD_SIZE={p}",
            ha="center",
            va="center",
            fontsize=8,
            color="white",
            family="monospace",
        )
        arrow = FancyArrowPatch(
            (x_rank, y + row_h / 2),
            (4.15, mid - 0.2),
            arrowstyle="-|>",
            mutation_scale=10,
            color="#777777",
            linewidth=1.0,
            linestyle="--",
        )
        ax.add_patch(arrow)
    ax.text(5.3, mid + 0.6, "join (rendezvous)", ha="center", va="bottom", fontsize=8, color="#555555")

    # the backend's links: gloo connects every pair of ranks, drawn as brackets right of the boxes
    pairs = [(r, s) for r in range(p) for s in range(r + 1, p)]
    right = x_rank + w_rank
    for k, (r, s) in enumerate(pairs):
        x = right + 0.2 + 0.17 * k
        y_r, y_s = tops[r] - row_h / 2 + 0.12 * (s - r - 1), tops[s] - row_h / 2 - 0.12 * (s - r - 1)
        link = Polygon(
            [(right, y_r), (x, y_r), (x, y_s), (right, y_s)],
            closed=False,
            fill=False,
            edgecolor="#333333",
            linewidth=1.0,
        )
        link.set_gid(f"link{r}-{s}")
        ax.add_patch(link)
    if pairs:
        ax.text(
            right + 0.45 + 0.17 * len(pairs),
            mid,
            f"{backend}:\nthe collectives,\nrank to rank",
            ha="left",
            va="center",
            fontsize=8,
        )
    return fig


def draw_timeline(passes: Sequence[dict], *, title: str | None = None) -> Figure:
    """One forward pass per rank: the pass (light) and its all-reduces (the rank's color), in ms.

    passes[r] is a dict with "one_pass" (seconds) and "all_reduces" (a list of (start, end) in
    seconds from the start of the pass), as `course.ch08_real_processes.tp_tour` returns in its "timing" entries.
    """
    if not passes:
        raise ValueError("draw_timeline needs at least one rank's pass")
    for r, one in enumerate(passes):
        total = one["one_pass"]
        if total <= 0 or any(not 0 <= a <= b for a, b in one["all_reduces"]):
            raise ValueError(
                f"rank {r}: a pass of {total} s with all-reduces {one['all_reduces']}: every "
                f"all-reduce must start at or after 0 and end after it starts"
            )
    p = len(passes)
    fig = Figure(figsize=(8.0, 1.6 + 0.55 * p))
    ax = fig.add_subplot()
    for r, one in enumerate(passes):
        y = p - 1 - r  # rank 0 on top
        bar = Rectangle((0, y - 0.3), one["one_pass"] * 1e3, 0.6, facecolor=PASS_COLOR, edgecolor="#999999")
        bar.set_gid(f"rank{r}-pass")
        ax.add_patch(bar)
        for i, (a, b) in enumerate(one["all_reduces"]):
            box = Rectangle((a * 1e3, y - 0.3), (b - a) * 1e3, 0.6, facecolor=device_color(r), edgecolor="none")
            box.set_gid(f"rank{r}-all_reduce{i}")
            ax.add_patch(box)
        inside = sum(b - a for a, b in one["all_reduces"])
        ax.text(
            one["one_pass"] * 1e3 * 1.01,
            y,
            f" {inside / one['one_pass']:.0%} in all-reduces",
            va="center",
            ha="left",
            fontsize=8,
        )
    longest = max(max([one["one_pass"]] + [b for _, b in one["all_reduces"]]) for one in passes)
    ax.set_xlim(0, longest * 1e3 * 1.3)
    ax.set_ylim(-0.6, p + 0.35)  # room for the legend on top
    ax.set_yticks(range(p), [f"rank {r}" for r in reversed(range(p))])
    ax.set_xlabel("time since the start of the forward pass (ms)")
    ax.legend(
        handles=[
            Patch(facecolor=PASS_COLOR, edgecolor="#999999", label="computing (the whole pass)"),
            Patch(facecolor=device_color(0), label="inside an all-reduce"),
        ],
        loc="upper right",
        ncol=2,
        fontsize=8,
        framealpha=0.9,
    )
    if title:
        ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig
