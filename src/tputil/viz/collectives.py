"""The four collectives, who holds what before and after (chapter 2), drawn from real tensors.

``draw_collectives(xs)`` takes the per-device list of chapter 2 (``xs[r]`` is what device r holds),
computes all-reduce, all-gather, reduce-scatter and broadcast with ``tputil.course.lists``, and draws
one panel per collective: each device's numbers before (left) and after (right). A number's cell
has the color of the device it came from; a sum over devices is drawn gray.

Device boxes carry gids ``"{kind}-device{r}-before"`` and ``"{kind}-device{r}-after"`` (kind as
in ``tputil.comm.KINDS``), so a test can count 2p boxes per panel.

``draw_all_reduce_timings`` plots measured all-reduce times against message size, log-log, with
the alpha-beta model of ``tputil.course.cost`` and its two regimes (latency-bound, bandwidth-bound).
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle
from torch import Tensor

from tputil.course import cost, lists
from tputil.viz import device_color, format_values

__all__ = ["draw_collectives", "describe", "draw_all_reduce_timings", "size_label", "PANELS"]

SUM_COLOR = "#bdbdbd"
MAX_CELLS = 16  # numbers per device after the all-gather, beyond which cells get unreadable

# (kind, title, what it computes), in the order of the panels
PANELS = [
    ("all_reduce", "all-reduce", "every device: the sum"),
    ("all_gather", "all-gather", "every device: all pieces, in rank order"),
    ("reduce_scatter", "reduce-scatter", "device r: piece r of the sum"),
    ("broadcast", "broadcast", "every device: device {src}'s tensor"),
]


def _cell_text(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.2g}"


LABEL_W = 0.95  # room for "device r" inside a box


def _device_row(ax, x0, y, values, colors, label, gid, cell_w, slots, offset=0):
    """One device: a box of `slots` cells (after its label, if any); numbers fill cells from `offset`.

    Cells without a number are drawn as empty outlines (a reduce-scatter keeps one piece).
    """
    left = LABEL_W if label else 0.12
    box = FancyBboxPatch(
        (x0, y),
        left + slots * cell_w + 0.1,
        0.62,
        boxstyle="round,pad=0.02,rounding_size=0.05",
        facecolor="white",
        edgecolor="#333333",
        linewidth=1.0,
    )
    box.set_gid(gid)
    ax.add_patch(box)
    if label:
        ax.text(x0 + 0.08, y + 0.31, label, ha="left", va="center", fontsize=8)
    for k in range(slots):
        if not offset <= k < offset + len(values):
            ax.add_patch(
                Rectangle(
                    (x0 + left + k * cell_w, y + 0.11),
                    cell_w,
                    0.4,
                    facecolor="none",
                    edgecolor="#cccccc",
                    linewidth=0.8,
                    linestyle="--",
                )
            )
    cx = x0 + left + offset * cell_w
    for v, c in zip(values, colors):
        ax.add_patch(Rectangle((cx, y + 0.11), cell_w, 0.4, facecolor=c, edgecolor="white", linewidth=1.0))
        ax.text(
            cx + cell_w / 2,
            y + 0.31,
            _cell_text(v),
            ha="center",
            va="center",
            fontsize=7.5,
            color="black" if c == SUM_COLOR else "white",
        )
        cx += cell_w


def draw_collectives(xs: Sequence[Tensor], *, src: int = 0, title: str | None = None) -> Figure:
    """Before and after of the four collectives on ``xs`` (1-D tensors, one per device).

    The length of each tensor must be divisible by p (for the reduce-scatter), and p times that
    length at most 16 (so the all-gather's numbers stay readable). ``src`` is the broadcast's
    source. Values come from ``tputil.course.lists``; whole numbers read best. The left column holds the
    two reducing collectives, the right one all-gather and broadcast; every panel has the same scale.
    """
    lists._check_per_device(xs, "draw_collectives")
    p, n = len(xs), xs[0].numel()
    if xs[0].dim() != 1:
        raise ValueError(f"draw_collectives draws 1-D tensors, got shape {tuple(xs[0].shape)}; flatten them first")
    if p * n > MAX_CELLS:
        raise ValueError(
            f"{p} devices x {n} numbers = {p * n} numbers after the all-gather; "
            f"keep it at most {MAX_CELLS} (fewer numbers per device)"
        )
    after = {
        "all_reduce": lists.all_reduce(xs),
        "all_gather": lists.all_gather(xs),
        "reduce_scatter": lists.reduce_scatter(xs),
        "broadcast": lists.broadcast(xs, src=src),
    }
    chunk = n // p
    own = [[device_color(r)] * n for r in range(p)]
    colors = {
        "all_reduce": [[SUM_COLOR] * n] * p,
        "all_gather": [[device_color(q) for q in range(p) for _ in range(n)]] * p,
        "reduce_scatter": [[SUM_COLOR] * chunk] * p,
        "broadcast": [[device_color(src)] * n] * p,
    }

    cell_w, gap = 0.36, 0.75
    before_w = LABEL_W + n * cell_w + 0.1
    widths = [before_w + gap + 0.22 + n * cell_w, before_w + gap + 0.22 + p * n * cell_w]  # two columns
    height = 0.85 * p + 0.75
    scale = 0.62  # inches per unit
    fig = Figure(figsize=((sum(widths) + 0.6) * scale, 2 * (height + 0.5) * scale + (0.4 if title else 0.1)))
    grid = fig.add_gridspec(
        2,
        2,
        width_ratios=widths,
        left=0.01,
        right=0.99,
        bottom=0.01,
        top=0.88 if title else 0.94,
        wspace=0.06,
        hspace=0.22,
    )
    if title:
        fig.suptitle(title, fontsize=12)
    for i, (kind, name, what) in enumerate(PANELS):
        ax = fig.add_subplot(grid[i // 2, i % 2])
        width = widths[i % 2]
        ax.set_xlim(-0.05, width + 0.05)
        ax.set_ylim(-0.15, height)
        ax.axis("off")
        ax.set_title(f"{name}: {what.format(src=src)}", fontsize=9)
        ax.text(before_w / 2, 0.85 * p + 0.2, "before", ha="center", fontsize=8, style="italic")
        ax.text(before_w + gap, 0.85 * p + 0.2, "after", ha="left", fontsize=8, style="italic")
        for r in range(p):
            y = 0.85 * (p - 1 - r)
            _device_row(ax, 0.0, y, xs[r].tolist(), own[r], f"device {r}", f"{kind}-device{r}-before", cell_w, n)
            out = after[kind][r]
            slots, offset = (n, r * chunk) if kind == "reduce_scatter" else (out.numel(), 0)
            _device_row(
                ax,
                before_w + gap,
                y,
                out.tolist(),
                colors[kind][r],
                None,
                f"{kind}-device{r}-after",
                cell_w,
                slots,
                offset,
            )
        ax.annotate(
            "",
            xy=(before_w + gap - 0.08, 0.85 * (p - 1) / 2 + 0.31),
            xytext=(before_w + 0.08, 0.85 * (p - 1) / 2 + 0.31),
            arrowprops=dict(arrowstyle="-|>", color="#333333", linewidth=1.4),
        )
    return fig


def describe(xs: Sequence[Tensor], *, src: int = 0) -> str:
    """The figure's content as text, one line per device and collective (for a quick look)."""
    after = {
        "all_reduce": lists.all_reduce(xs),
        "all_gather": lists.all_gather(xs),
        "reduce_scatter": lists.reduce_scatter(xs),
        "broadcast": lists.broadcast(xs, src=src),
    }
    lines = ["before: " + " | ".join(f"device {r} {format_values(x, 16)}" for r, x in enumerate(xs))]
    for kind, name, _ in PANELS:
        lines.append(f"{name}: " + " | ".join(f"device {r} {format_values(o, 16)}" for r, o in enumerate(after[kind])))
    return "\n".join(lines)


def size_label(n: float) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            return f"{n / factor:g} {unit}"
    return f"{n:g} B"


def draw_all_reduce_timings(
    nbytes: Sequence[int],
    seconds: Sequence[float],
    *,
    p: int,
    latency: float,
    bandwidth: float,
    title: str | None = None,
) -> Figure:
    """Measured all-reduce time against message size (log-log), with the alpha-beta model.

    Points: the measurements (gid ``"measured"``). Lines: the model ``cost.ring_time`` (gid
    ``"model"``), its latency floor ``ring_steps * latency`` (``"latency-bound"``) and its
    bandwidth line ``ring_bytes / bandwidth`` (``"bandwidth-bound"``); a dotted vertical line where
    the two are equal (``"crossover"``). Times are drawn in milliseconds.
    """
    if len(nbytes) != len(seconds) or not nbytes:
        raise ValueError(f"need one time per size: got {len(nbytes)} sizes and {len(seconds)} times")
    steps = cost.ring_steps("all_reduce", p)
    lo, hi = min(nbytes) / 2, max(nbytes) * 2
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    fig = Figure(figsize=(7.0, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    floor = [steps * latency * 1e3] * len(grid)
    slope = [cost.ring_bytes("all_reduce", n, p) / bandwidth * 1e3 for n in grid]
    model = [cost.ring_time("all_reduce", n, p, latency=latency, bandwidth=bandwidth) * 1e3 for n in grid]
    ax.plot(
        grid,
        floor,
        "--",
        color="#4c72b0",
        linewidth=1,
        gid="latency-bound",
        label=f"latency-bound: {steps} steps x latency",
    )
    ax.plot(
        grid,
        slope,
        "--",
        color="#dd8452",
        linewidth=1,
        gid="bandwidth-bound",
        label="bandwidth-bound: ring bytes / bandwidth",
    )
    ax.plot(grid, model, "-", color="#555555", linewidth=1.2, gid="model", label="model: the sum of both")
    ax.plot(list(nbytes), [t * 1e3 for t in seconds], "o", color="#c44e52", gid="measured", label=f"measured (p = {p})")
    crossover = steps * latency * bandwidth * p / (2 * (p - 1))  # where the two dashed lines meet
    ax.axvline(crossover, color="#999999", linestyle=":", gid="crossover")
    ax.set_xlabel("message size per rank (bytes)")
    ax.set_ylabel("time per all-reduce (ms)")
    ticks = [n for n in nbytes if n in (4 * 2**10, 64 * 2**10, 2**20, 16 * 2**20, 256 * 2**20)] or list(nbytes)
    ax.set_xticks(ticks, [size_label(n) for n in ticks])
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(steps * latency * 1e3 / 4, max(max(seconds) * 1e3, max(model)) * 2)
    ax.set_title(title or "all-reduce: time against message size", fontsize=11)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.13, top=0.9)
    return fig
