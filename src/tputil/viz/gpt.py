"""The figures of chapter 6: where a tensor-parallel block communicates, and how a layer is split.

``draw_block_collectives(dense_trace, rank_traces, layer=0)`` draws one block as the code ran it:
one row per leaf module of the block, in the order the forward pass called them (read from
``tputil.course.trace`` traces, not written down by hand), a column for the dense model and one per
rank, each box showing the module's output shape. A rank's box is in the rank's color when its
output is a shard (its shape differs from the dense model's), grey when every rank computes the
same full tensor. Each collective the trace attributed to a module is a bar: forward ones (solid)
below the module that issued them, backward ones (hatched) above it, as the gradient flows up.
Gids: ``"dense-<module>"``, ``"<module>-device<r>"``, ``"forward-<kind>-<i>"``, ``"backward-<kind>-<i>"``.

``draw_layer_split(config, p, layer=0)`` draws every parameter of one block at scale (a weight as
its state-dict matrix, out_features tall and in_features wide; a vector as a thin bar), each cut
into the pieces ranks hold under the plan ``shard.GPT_TP_PLAN``: the pieces are computed by
``shard.shard_tensor`` on a tensor of indices, so the picture is the plan. Gids:
``"<param>-device<r>"`` (one patch per contiguous run of rows or columns) and ``"<param>-replicated"``.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Rectangle

from tputil.shard import GPT_TP_PLAN, Replicate, dense_shapes, placement, shard_tensor
from tputil.viz import device_color

__all__ = ["draw_block_collectives", "draw_layer_split", "index_runs"]

REPLICATED_COLOR = "#d9d9d9"
DENSE_COLOR = "#f4f4f4"
BAR_COLOR = "#fff3c4"


def index_runs(indices) -> list[tuple[int, int]]:
    """Contiguous runs [start, stop) of a sorted list of indices: [0,1,2,8,9] -> [(0, 3), (8, 10)]."""
    runs = []
    for i in (int(i) for i in indices):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _short(module: str, prefix: str) -> str:
    return module[len(prefix) :] if module.startswith(prefix) else module


def _bar(ax, x0, x1, y, h, gid, label, hatch=None):
    patch = FancyBboxPatch(
        (x0, y),
        x1 - x0,
        h,
        boxstyle="round,pad=0.01,rounding_size=0.05",
        facecolor=BAR_COLOR if hatch is None else "white",
        edgecolor="#555555",
        hatch=hatch,
        linewidth=1.0,
    )
    patch.set_gid(gid)
    ax.add_patch(patch)
    ax.text(
        (x0 + x1) / 2,
        y + h / 2,
        label,
        ha="center",
        va="center",
        fontsize=8,
        bbox=dict(facecolor="white", edgecolor="none", pad=1.0) if hatch else None,
    )


def draw_block_collectives(dense_trace, rank_traces, *, layer: int = 0, title: str | None = None) -> Figure:
    """One block's modules (rows) on the dense model and on each rank (columns), with its collectives.

    ``dense_trace``: a ``CollectiveTrace`` of the dense GPT's forward; ``rank_traces``: one per rank
    of the tensor-parallel GPT on the same input, forward (and, to show backward bars, backward).
    """
    prefix = f"transformer.h.{layer}."
    p = len(rank_traces)
    rows = rank_traces[0].modules("forward", prefix)
    if not rows:
        raise ValueError(f"the traces hold no forward call of a module under {prefix!r}")
    dense_shape = {c.module: c.shape for c in dense_trace.modules("forward", prefix)}
    backward = {c.module: c.collectives for c in rank_traces[0].modules("backward", prefix)}

    box_h, bar_h, gap = 0.62, 0.34, 0.16
    plan = []  # (kind, payload, height) from top to bottom
    for call in rows:
        if backward.get(call.module):
            plan.append(("backward", call, bar_h))
        plan.append(("module", call, box_h))
        if call.collectives:
            plan.append(("forward", call, bar_h))
    height = sum(h + gap for _, _, h in plan)

    width = p + 1.35  # the dense column is 1 wide, then 0.35 of space, then one column per rank
    fig = Figure(figsize=(1.7 * width + 1.0, 0.62 * height + 1.0))
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.93 if title else 1.0))
    ax.set_xlim(-0.05, width + 0.05)
    ax.set_ylim(-0.1, height + 0.45)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    col_x = [0.0] + [1.35 + r for r in range(p)]
    ax.text(0.5, height + 0.2, "dense", ha="center", fontsize=9, fontweight="bold")
    for r in range(p):
        ax.text(
            col_x[r + 1] + 0.5,
            height + 0.2,
            f"rank {r}",
            ha="center",
            fontsize=9,
            fontweight="bold",
            color=device_color(r),
        )

    y = height
    counts = {"forward": 0, "backward": 0}
    for kind, call, h in plan:
        y -= h + gap
        name = _short(call.module, prefix)
        if kind == "module":
            dense = dense_shape.get(call.module)
            patch = FancyBboxPatch(
                (0.05, y),
                0.9,
                h,
                boxstyle="round,pad=0.01,rounding_size=0.05",
                facecolor=DENSE_COLOR,
                edgecolor="#888888",
            )
            patch.set_gid(f"dense-{call.module}")
            ax.add_patch(patch)
            ax.text(0.5, y + h / 2, f"{name}\n{dense}", ha="center", va="center", fontsize=7.5)
            for r, trace in enumerate(rank_traces):
                shape = next(c.shape for c in trace.modules("forward", call.module) if c.module == call.module)
                sharded = dense is not None and shape != dense
                x = col_x[r + 1]
                patch = FancyBboxPatch(
                    (x + 0.05, y),
                    0.9,
                    h,
                    boxstyle="round,pad=0.01,rounding_size=0.05",
                    facecolor=device_color(r) if sharded else REPLICATED_COLOR,
                    edgecolor="#333333",
                )
                patch.set_gid(f"{call.module}-device{r}")
                ax.add_patch(patch)
                ax.text(
                    x + 0.5,
                    y + h / 2,
                    f"{name}\n{shape}",
                    ha="center",
                    va="center",
                    fontsize=7.5,
                    color="white" if sharded else "black",
                )
            continue
        records = call.collectives if kind == "forward" else backward[call.module]
        for rec in records:
            label = (
                f"{rec.kind} {rec.shape}: {rec.nbytes:,} bytes in, per rank"
                if kind == "forward"
                else f"backward: {rec.kind} of the input gradient {rec.shape}: {rec.nbytes:,} bytes in"
            )
            _bar(
                ax,
                col_x[1] + 0.05,
                col_x[-1] + 0.95,
                y,
                h,
                f"{kind}-{rec.kind}-{counts[kind]}",
                label,
                hatch=None if kind == "forward" else "////",
            )
            counts[kind] += 1
    return fig


def draw_layer_split(config, p: int, *, layer: int = 0, plan: dict = GPT_TP_PLAN, title: str | None = None) -> Figure:
    """Every parameter of block ``layer`` at scale, cut into the pieces each of p ranks holds."""
    prefix = f"transformer.h.{layer}."
    shapes = {k: v for k, v in dense_shapes(config).items() if k.startswith(prefix)}
    groups = {}  # module -> [weight name, bias name or None]
    for name in shapes:
        groups.setdefault(name.rsplit(".", 1)[0], []).append(name)

    gap, bar = max(8, config.n_embd // 3), max(3, config.n_embd // 10)
    x, placed = 0.0, []
    for module, names in groups.items():
        placed.append((module, names, x))
        x += sum((shapes[n][1] if len(shapes[n]) == 2 else bar) + 2 for n in names) - 2 + gap
    total_w = x - gap
    total_h = max(s[0] for s in shapes.values())

    fig = Figure(figsize=(11, 11 * 0.86 * 1.28 * total_h / (total_w + 4) / (0.8 if title else 0.86) + 0.3))
    ax = fig.add_axes((0.01, 0.1, 0.98, 0.8 if title else 0.86))
    ax.set_xlim(-2, total_w + 2)
    ax.set_ylim(total_h * 1.12, -total_h * 0.16)  # row 0 at the top, like a matrix
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)

    for i, (module, names, x0) in enumerate(placed):
        xb = x0
        for name in names:
            shape = shapes[name]
            h, w = shape[0], (shape[1] if len(shape) == 2 else bar)
            where = placement(name, plan)
            if isinstance(where, Replicate):
                patch = Rectangle(
                    (xb, 0), w, h, facecolor=REPLICATED_COLOR, edgecolor="#333333", hatch="..", linewidth=0.8
                )
                patch.set_gid(f"{name}-replicated")
                ax.add_patch(patch)
            else:
                size = shape[where.dim]
                for r in range(p):
                    idx = shard_tensor(torch.arange(size), r, p, 0, where.stride)
                    for start, stop in index_runs(idx.tolist()):
                        rect = (xb, start, w, stop - start) if where.dim == 0 else (xb + start, 0, stop - start, h)
                        patch = Rectangle(
                            rect[:2], rect[2], rect[3], facecolor=device_color(r), edgecolor="white", linewidth=0.4
                        )
                        patch.set_gid(f"{name}-device{r}")
                        ax.add_patch(patch)
                ax.add_patch(Rectangle((xb, 0), w, h, fill=False, edgecolor="#333333", linewidth=0.8))
                if where.stride == 3 and where.dim == 0 and len(shape) == 2:  # nanoGPT's fused q, k, v
                    for j, part in enumerate("qkv"):
                        ax.text(xb - 1, (j + 0.5) * size / 3, part, ha="right", va="center", fontsize=8)
            xb += w + 2
        label = _short(module, prefix) + "\n" + " ".join(str(tuple(shapes[n])) for n in names)
        ax.text(x0, -total_h * 0.02 - (total_h * 0.07 if i % 2 else 0), label, fontsize=7.5, va="bottom")
    handles = [Rectangle((0, 0), 1, 1, facecolor=device_color(r)) for r in range(p)]
    handles.append(Rectangle((0, 0), 1, 1, facecolor=REPLICATED_COLOR, hatch=".."))
    fig.legend(
        handles,
        [f"rank {r}" for r in range(p)] + ["replicated (every rank)"],
        loc="lower center",
        ncol=p + 1,
        fontsize=8,
        frameon=False,
    )
    return fig
