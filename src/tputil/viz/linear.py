"""How Y = XA is split across ranks by columns and by rows of A (chapter 3), drawn to scale.

``draw_linear_split(column_weights, row_weights, M)`` takes the per-rank weight shards as the
ranks hold them (``nn.Linear`` layout: weight = A^T, shape (out_features, in_features)) and draws
two rows, each X times A equals Y with rectangles in proportion to the real shapes:

- by columns, ``A[K, N_p]``: X whole on every rank, rank r's columns of A and of Y in its color;
- by rows, ``A[K_p, N]``, ``X[M, K_p]``: rank r's columns of X and rows of A in its color, each rank
  a full-size partial Y, summed by one all-reduce.

Patches carry gids ``"column-A-device{r}"``, ``"column-Y-device{r}"``, ``"row-X-device{r}"``,
``"row-A-device{r}"`` and ``"row-partial-device{r}"``: p of each.
"""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from tputil.viz import RESULT_COLOR, device_color

__all__ = ["draw_linear_split", "split_shapes"]

WHOLE_COLOR = "#9e9e9e"  # a tensor every rank holds in full


def split_shapes(column_weights: Sequence[Tensor], row_weights: Sequence[Tensor]) -> tuple[int, int, int]:
    """(p, K, N) from the shards, checking that they are a column and a row split of one A[K, N].

    Column shards are nn.Linear weights of shape (N/p, K), row shards (N, K/p).
    """
    p = len(column_weights)
    if p == 0 or len(row_weights) != p:
        raise ValueError(f"need one column shard and one row shard per rank: got {p} and {len(row_weights)}")
    shapes_c = {tuple(w.shape) for w in column_weights}
    shapes_r = {tuple(w.shape) for w in row_weights}
    if len(shapes_c) != 1 or len(shapes_r) != 1 or any(len(s) != 2 for s in shapes_c | shapes_r):
        raise ValueError(
            f"every rank's shard must have the same 2-D shape: column shards {sorted(shapes_c)}, "
            f"row shards {sorted(shapes_r)}"
        )
    (n_p, k), (n, k_p) = shapes_c.pop(), shapes_r.pop()
    if n_p * p != n or k_p * p != k:
        raise ValueError(
            f"column shards (N/p, K) = {(n_p, k)} and row shards (N, K/p) = {(n, k_p)} "
            f"do not split the same A[K, N] over p={p} ranks"
        )
    return p, k, n


def _rect(ax, x, y, w, h, color, gid=None, label=None, alpha=1.0):
    patch = Rectangle((x, y), w, h, facecolor=color, edgecolor="#333333", linewidth=0.8, alpha=alpha)
    if gid:
        patch.set_gid(gid)
    ax.add_patch(patch)
    if label:
        ax.text(x + w / 2, y - 0.12, label, ha="center", va="top", fontsize=8)


def draw_linear_split(
    column_weights: Sequence[Tensor], row_weights: Sequence[Tensor], M: int, *, title: str | None = None
) -> Figure:
    """X[M, K] A[K, N] split by columns (top) and by rows (bottom), from the ranks' weight shards."""
    p, K, N = split_shapes(column_weights, row_weights)
    s = 2.4 / max(M, K, N)  # units per row/column: the largest dimension is 2.4 units long
    m, k, n = M * s, K * s, N * s
    fig = Figure(figsize=(9.5, 5.0))
    if title:
        fig.suptitle(title, fontsize=12)
    axes = [fig.add_subplot(2, 1, i + 1) for i in range(2)]
    for ax in axes:
        ax.set_aspect("equal")
        ax.axis("off")
    top, bottom = axes

    # --- by columns: X (whole) x A[K, N_p] = Y[M, N_p] -----------------------------------------
    top.set_title(
        f"by columns, A[K, N_p]: rank r owns {N // p} of the N = {N} output features; "
        f"concatenate (all-gather) to combine",
        fontsize=9,
    )
    x0 = 0.0
    _rect(top, x0, k - m, k, m, WHOLE_COLOR, label=f"X ({M}, {K}), every rank")
    top.text(x0 + k + 0.25, k / 2, "×", ha="center", va="center", fontsize=14)
    xa = x0 + k + 0.5
    for r in range(p):
        _rect(top, xa + r * n / p, 0, n / p, k, device_color(r), gid=f"column-A-device{r}")
    top.text(xa + n / 2, -0.12, f"A ({K}, {N}): rank r holds ({K}, {N // p})", ha="center", va="top", fontsize=8)
    top.text(xa + n + 0.25, k / 2, "=", ha="center", va="center", fontsize=14)
    xy = xa + n + 0.5
    for r in range(p):
        _rect(top, xy + r * n / p, k - m, n / p, m, device_color(r), gid=f"column-Y-device{r}")
    top.text(xy + n / 2, k - m - 0.12, f"Y ({M}, {N}): rank r holds ({M}, {N // p})", ha="center", va="top", fontsize=8)
    top.set_xlim(-0.2, xy + n + 3.2)
    top.set_ylim(-0.7, k + 0.2)

    # --- by rows: X[M, K_p] x A[K_p, N] = sum over ranks of partial Y[M, N] ---------------------
    bottom.set_title(
        f"by rows, A[K_p, N] and X[M, K_p]: rank r owns {K // p} of the K = {K} input "
        f"features; add (all-reduce) to combine",
        fontsize=9,
    )
    for r in range(p):
        _rect(bottom, x0 + r * k / p, k - m, k / p, m, device_color(r), gid=f"row-X-device{r}")
    bottom.text(
        x0 + k / 2, k - m - 0.12, f"X ({M}, {K}): rank r holds ({M}, {K // p})", ha="center", va="top", fontsize=8
    )
    bottom.text(x0 + k + 0.25, k / 2, "×", ha="center", va="center", fontsize=14)
    for r in range(p):  # row block r from the top
        _rect(bottom, xa, k - (r + 1) * k / p, n, k / p, device_color(r), gid=f"row-A-device{r}")
    bottom.text(xa + n / 2, -0.12, f"A ({K}, {N}): rank r holds ({K // p}, {N})", ha="center", va="top", fontsize=8)
    bottom.text(xa + n + 0.25, k / 2, "=", ha="center", va="center", fontsize=14)
    step = min(0.12, 0.6 / p)
    for r in reversed(range(p)):  # p full-size partial sums, stacked like cards
        _rect(bottom, xy + r * step, k - m - r * step, n, m, device_color(r), gid=f"row-partial-device{r}", alpha=0.95)
    bottom.text(
        xy + n / 2,
        k - m - (p - 1) * step - 0.12,
        f"{p} partial Y ({M}, {N}), one per rank",
        ha="center",
        va="top",
        fontsize=8,
    )
    xr = xy + n + (p - 1) * step + 0.3
    bottom.annotate(
        "",
        xy=(xr + 0.75, k - m / 2),
        xytext=(xr, k - m / 2),
        arrowprops=dict(arrowstyle="-|>", color="#333333", linewidth=1.2),
    )
    bottom.text(xr + 0.37, k - m / 2 + 0.12, "all-reduce", ha="center", va="bottom", fontsize=8)
    _rect(bottom, xr + 0.9, k - m, n, m, RESULT_COLOR, label=f"Y ({M}, {N}), every rank")
    bottom.set_xlim(-0.2, max(xr + 0.9 + n, xy + n + 3.2) + 0.2)
    bottom.set_ylim(-0.7, k + 0.2)
    top.set_xlim(*bottom.get_xlim())
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.88 if title else 0.93, hspace=0.3)
    return fig
