"""The figure of chapter 4: what each rank of a tensor-parallel MLP holds and computes, to scale.

``draw_tp_mlp(mlp, x, p)`` draws one row per rank: the input, the rank's slice of c_fc, its hidden
features after the GELU, its slice of c_proj, its partial output, then the all-reduce and the
output that every rank holds. Every rectangle is drawn at the size of the tensor it stands for
(one unit per element along each side), with the shapes read from the real tensors: the shards
are cut with ``tputil.shard.shard_tensor`` from the dense module's weights, so the picture is
what the code computes.

``split="columns"`` is Megatron's MLP (c_fc by columns, one all-reduce); ``split="rows"`` is the
order that fails: c_fc by rows leaves partial sums in front of the GELU, which must be summed
first, so the figure shows the extra all-reduce that makes it correct.

Weights are drawn as the matrices of ``y = x W + bias``: ``W_fc = c_fc.weight.T`` of shape
(C, 4C) and ``W_proj = c_proj.weight.T`` of shape (4C, C) (nn.Linear stores the transpose).
Patches carry gids such as ``"c_fc-device1"`` and ``"all-reduce-1"`` so tests can count them.
"""

from __future__ import annotations

from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tputil.shard import shard_tensor
from tputil.viz import device_color

__all__ = ["draw_tp_mlp"]

REPLICATED_COLOR = "#bdbdbd"
BAR_COLOR = "#fff3c4"
_GAP = 14  # horizontal space between items, in tensor elements
_BAR_WIDTH = 12


@dataclass
class _Mat:
    """One tensor per rank: its (rows, cols), a name above the column, whether it is a partial sum."""

    name: str
    shapes: list  # per rank (rows, cols)
    kind: str  # gid stem, e.g. "c_fc"; "x" and "y" are replicated (grey)
    partial: bool = False
    replicated: bool = False


@dataclass
class _Op:
    text: str


@dataclass
class _Bar:
    label: str
    gid: str


def _shape2(t) -> tuple:
    """(rows, cols) of a tensor flattened to 2-D: (B*T, C) for an activation (B, T, C)."""
    rows = 1
    for s in t.shape[:-1]:
        rows *= s
    return rows, t.shape[-1]


def _columns_items(mlp, x, p):
    w_fc, w_proj = mlp.c_fc.weight, mlp.c_proj.weight  # (4C, C), (C, 4C): nn.Linear's (out, in)
    A = [shard_tensor(w_fc, r, p, dim=0).T for r in range(p)]  # W_fc[C, 4C_p]
    B = [shard_tensor(w_proj, r, p, dim=1).T for r in range(p)]  # W_proj[4C_p, C]
    M, C = _shape2(x)
    return [
        _Mat("x", [(M, C)] * p, "x", replicated=True),
        _Op("@"),
        _Mat("c_fc: $W_{fc}^{(r)}$", [tuple(a.shape) for a in A], "c_fc"),
        _Op("+ bias,\nGELU"),
        _Mat("GELU: $H^{(r)}$", [(M, a.shape[1]) for a in A], "hidden"),
        _Op("@"),
        _Mat("c_proj: $W_{proj}^{(r)}$", [tuple(b.shape) for b in B], "c_proj"),
        _Op("="),
        _Mat("partial $Y^{(r)}$", [(M, b.shape[1]) for b in B], "partial", partial=True),
        _Bar(f"all-reduce of {M} x {C}" if p > 1 else "one rank: no all-reduce", "all-reduce-1"),
        _Mat("y = sum + bias", [(M, C)] * p, "y", replicated=True),
    ]


def _rows_items(mlp, x, p):
    w_fc, w_proj = mlp.c_fc.weight, mlp.c_proj.weight
    A = [shard_tensor(w_fc, r, p, dim=1).T for r in range(p)]  # W_fc[C_p, 4C]: c_fc by rows
    B = [shard_tensor(w_proj, r, p, dim=1).T for r in range(p)]  # W_proj[4C_p, C]
    X = [shard_tensor(x, r, p, dim=-1) for r in range(p)]  # x[B, T, C_p]
    M, C = _shape2(x)
    H = w_fc.shape[0]
    return [
        _Mat("$x^{(r)}$", [_shape2(t) for t in X], "x_shard"),
        _Op("@"),
        _Mat("c_fc: $W_{fc}^{(r)}$", [tuple(a.shape) for a in A], "c_fc"),
        _Op("="),
        _Mat("partial $S^{(r)}$", [(M, H)] * p, "pre-activation", partial=True),
        _Bar(f"all-reduce of {M} x {H}: before the GELU" if p > 1 else "one rank: no all-reduce", "all-reduce-1"),
        _Op("+ bias,\nGELU,\nslice r"),
        _Mat("GELU: $H^{(r)}$", [(M, b.shape[0]) for b in B], "hidden"),
        _Op("@"),
        _Mat("c_proj: $W_{proj}^{(r)}$", [tuple(b.shape) for b in B], "c_proj"),
        _Op("="),
        _Mat("partial $Y^{(r)}$", [(M, b.shape[1]) for b in B], "partial", partial=True),
        _Bar(f"all-reduce of {M} x {C}" if p > 1 else "one rank: no all-reduce", "all-reduce-2"),
        _Mat("y = sum + bias", [(M, C)] * p, "y", replicated=True),
    ]


def draw_tp_mlp(mlp, x, p: int, *, split: str = "columns", title: str | None = None) -> Figure:
    """Each rank's share of a tensor-parallel MLP (chapter 4), drawn to scale from real tensors.

    ``mlp`` is a dense ``tputil.model.MLP`` (or anything with ``c_fc`` and ``c_proj`` Linears),
    ``x`` its input (B, T, C), ``p`` the number of ranks. ``split="columns"``: c_fc by columns,
    GELU on each rank's slice, c_proj by rows, one all-reduce. ``split="rows"``: c_fc by rows,
    whose partial sums need an all-reduce before the GELU, then the same c_proj: two all-reduces.

    Rank r's patches have gids ``"<kind>-device<r>"`` with kind in c_fc, hidden, c_proj, partial
    (and x_shard, pre-activation for rows); replicated ones ``"x-device<r>"``, ``"y-device<r>"``;
    the all-reduce bars ``"all-reduce-1"`` (and ``"all-reduce-2"``).
    """
    if split not in ("columns", "rows"):
        raise ValueError(f"split={split!r}: draw_tp_mlp draws split='columns' (Megatron's) or 'rows'")
    if p < 1:
        raise ValueError(f"p={p}: the number of ranks must be at least 1")
    items = (_columns_items if split == "columns" else _rows_items)(mlp, x, p)

    row_h = max(s[0] for it in items if isinstance(it, _Mat) for s in it.shapes)
    row_pitch = row_h + 22  # room for the shape label under each tensor
    total_h = p * row_pitch
    # x positions, left to right
    xs, cursor = [], 0.0
    for it in items:
        xs.append(cursor)
        if isinstance(it, _Mat):
            cursor += max(s[1] for s in it.shapes) + _GAP
        elif isinstance(it, _Bar):
            cursor += _BAR_WIDTH + _GAP
        else:
            cursor += 34 if "\n" in it.text or len(it.text) > 2 else 10
    total_w = cursor - _GAP

    x_lo, y_lo, y_hi = -60.0, -4.0, total_h + 22.0  # room for the rank labels and the names
    data_w, data_h = total_w + 4 - x_lo, y_hi - y_lo
    width_in = min(max(data_w * 0.024, 6.0), 13.0)
    axes_h_in = width_in * data_h / data_w  # equal scale on both axes: one unit, one element
    title_in = 0.45 if title else 0.0
    fig = Figure(figsize=(width_in, axes_h_in + title_in))
    ax = fig.add_axes((0.0, 0.0, 1.0, axes_h_in / (axes_h_in + title_in)))
    ax.set_xlim(x_lo, total_w + 4)
    ax.set_ylim(y_lo, y_hi)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=12)

    for r in range(p):
        top = total_h - r * row_pitch  # rank 0 on top
        mid = top - row_h / 2
        ax.text(-8, mid, f"rank {r}", ha="right", va="center", fontsize=9, fontweight="bold", color=device_color(r))
        for it, x0 in zip(items, xs):
            if isinstance(it, _Mat):
                rows, cols = it.shapes[r]
                color = REPLICATED_COLOR if it.replicated else device_color(r)
                rect = Rectangle(
                    (x0, mid - rows / 2),
                    cols,
                    rows,
                    facecolor=color,
                    edgecolor="#333333",
                    linewidth=0.8,
                    hatch="///" if it.partial else None,
                    alpha=0.9,
                )
                rect.set_gid(f"{it.kind}-device{r}")
                ax.add_patch(rect)
                ax.text(x0 + cols / 2, mid - rows / 2 - 3, f"({rows}, {cols})", ha="center", va="top", fontsize=7)
                if r == 0:
                    ax.text(
                        x0 + max(s[1] for s in it.shapes) / 2,
                        total_h + 6,
                        it.name,
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
            elif isinstance(it, _Op):
                ax.text(
                    x0 + (16 if "\n" in it.text or len(it.text) > 2 else 5),
                    mid,
                    it.text,
                    ha="center",
                    va="center",
                    fontsize=8,
                )

    for it, x0 in zip(items, xs):
        if isinstance(it, _Bar):
            bar = Rectangle((x0, 0), _BAR_WIDTH, total_h, facecolor=BAR_COLOR, edgecolor="#333333", linewidth=0.8)
            bar.set_gid(it.gid)
            ax.add_patch(bar)
            ax.text(x0 + _BAR_WIDTH / 2, total_h / 2, it.label, rotation=90, ha="center", va="center", fontsize=7)
    return fig
