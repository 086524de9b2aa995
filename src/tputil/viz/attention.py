"""The figure of chapter 5: which rows of nanoGPT's fused c_attn weight each rank holds.

c_attn's weight has 3C rows (its output features): q, then k, then v, each section made of nh
heads of hs rows. ``draw_c_attn_split(weight, n_head, p)`` draws those rows as a strip, coloured
by the rank that holds each row, twice: split the correct way (``shard_tensor(..., stride=3)``:
each rank takes its heads from each of q, k and v) and the naive way (p contiguous chunks).

Under each strip a second strip says how the rank *reads* each row it holds: the tensor-parallel
attention splits its local rows into three equal parts and uses them as q, k and v of heads
r nh/p, ..., (r+1) nh/p - 1. A row is drawn red where that reading is wrong, i.e. where the rank
holds a different row than the correct split would have put at that place.

Ownership is computed, not drawn by hand: the row indices 0 .. 3C-1 are sharded with the same
``shard_tensor`` that slices the weight. Patches carry gids ``"<split>-row<i>-device<r>"`` (split
is ``strided`` or ``contiguous``) and ``"<split>-misread-row<i>"`` so tests can count them.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from tputil.shard import divide, shard_tensor
from tputil.viz import device_color

__all__ = ["c_attn_rows", "c_attn_misread", "draw_c_attn_split"]

MISREAD_COLOR = "#c0392b"
READ_OK_COLOR = "#f4f4f4"
SECTIONS = ("q", "k", "v")


def c_attn_rows(n_rows: int, p: int, *, stride: int) -> list[list[int]]:
    """The global row indices that each rank holds, in its local order: shard_tensor of 0..n_rows-1.

    stride=3 is the correct split of c_attn's weight (q, k, v per head); stride=1 the naive
    contiguous one. Raises shard_tensor's error if p (times the stride) does not divide n_rows.
    """
    index = torch.arange(n_rows)
    return [shard_tensor(index, r, p, dim=0, stride=stride).tolist() for r in range(p)]


def c_attn_misread(n_rows: int, p: int, *, stride: int) -> int:
    """How many rows a split puts where the tensor-parallel attention expects another row.

    Rank r reads its j-th local row as the j-th row of the correct (stride-3) shard. Zero for
    stride=3; for the contiguous split (stride=1) at p > 1, most rows.
    """
    correct = c_attn_rows(n_rows, p, stride=3)
    held = c_attn_rows(n_rows, p, stride=stride)
    return sum(i != j for r in range(p) for i, j in zip(held[r], correct[r]))


def _draw_strip(ax, rows_by_rank, n_rows, n_head, split, y0):
    """One split: the owner strip at [y0 + 1, y0 + 2] and the reading strip at [y0, y0 + 0.6]."""
    C = n_rows // 3
    hs = C // n_head
    p = len(rows_by_rank)
    correct = c_attn_rows(n_rows, p, stride=3)
    misread = 0
    for r, rows in enumerate(rows_by_rank):
        for j, i in enumerate(rows):
            patch = Rectangle((i, y0 + 1.0), 1, 1, facecolor=device_color(r), edgecolor="none")
            patch.set_gid(f"{split}-row{i}-device{r}")
            ax.add_patch(patch)
            wrong = i != correct[r][j]
            misread += wrong
            read = Rectangle((i, y0), 1, 0.6, facecolor=MISREAD_COLOR if wrong else READ_OK_COLOR, edgecolor="none")
            read.set_gid(f"{split}-misread-row{i}" if wrong else f"{split}-read-row{i}")
            ax.add_patch(read)
        # label each run of rows that the rank reads as one of q, k, v
        part = len(rows) // 3
        for s in range(3):
            local = rows[s * part : (s + 1) * part]
            start = 0
            for t in range(1, len(local) + 1):
                if t == len(local) or local[t] != local[t - 1] + 1:
                    lo, hi = local[start], local[t - 1] + 1
                    if (hi - lo) * 144 / n_rows >= 7:
                        ax.text(
                            (lo + hi) / 2,
                            y0 + 0.3,
                            f"r{r}: {SECTIONS[s]}",
                            ha="center",
                            va="center",
                            fontsize=6.5,
                            color="white"
                            if any(rows[s * part + k] != correct[r][s * part + k] for k in range(start, t))
                            else "#333333",
                        )
                    start = t
    # head boundaries (thin white) and section boundaries (thick black) on the owner strip
    for h in range(1, 3 * n_head):
        ax.plot([h * hs, h * hs], [y0 + 1.0, y0 + 2.0], color="white", linewidth=0.8)
    for s in range(4):
        ax.plot([s * C, s * C], [y0 + 0.95, y0 + 2.05], color="#222222", linewidth=1.6)
    for s in range(3):
        for h in range(n_head):
            if hs * 144 / n_rows >= 4:  # room for a head label
                ax.text(
                    s * C + (h + 0.5) * hs, y0 + 1.5, f"h{h}", ha="center", va="center", fontsize=6.5, color="white"
                )
    return misread


def draw_c_attn_split(weight, n_head: int, p: int, *, title: str | None = None) -> Figure:
    """c_attn's rows coloured by the rank that holds them: strided (correct) vs contiguous (naive).

    ``weight`` is c_attn's weight (3C, C) (its shape is all that is used), ``n_head`` the number
    of heads, ``p`` the number of ranks (it must divide n_head). Returns a Figure with two panels;
    each says how many rows its split has the ranks read wrongly (``c_attn_misread`` counts them).
    """
    n_rows = weight.shape[0]
    if n_rows % 3 != 0 or (n_rows // 3) % n_head != 0:
        raise ValueError(f"c_attn's weight has {n_rows} rows: expected 3 * C rows with C divisible by n_head={n_head}")
    divide(n_head, p, "n_head")  # attention is split by heads
    C = n_rows // 3
    fig = Figure(figsize=(10, 4.4))
    if title:
        fig.suptitle(title, fontsize=12)
    panels = [
        ("strided", 3, "correct: shard_tensor(w, r, p, dim=0, stride=3) - each rank its heads of q, k, v"),
        ("contiguous", 1, "wrong: p contiguous chunks, w.chunk(p, dim=0)[r]"),
    ]
    misread = {}
    for k, (split, stride, label) in enumerate(panels):
        ax = fig.add_axes((0.07, 0.5 - 0.38 * k, 0.9, 0.3))
        ax.set_xlim(0, n_rows)
        ax.set_ylim(-0.1, 2.9)
        ax.axis("off")
        rows_by_rank = c_attn_rows(n_rows, p, stride=stride)
        misread[split] = _draw_strip(ax, rows_by_rank, n_rows, n_head, split, 0.0)
        ax.text(0, 2.55, label, ha="left", va="center", fontsize=9)
        for s, name in enumerate(SECTIONS):
            ax.text(
                (s + 0.5) * C,
                2.2,
                f"{name}: rows {s * C}-{(s + 1) * C - 1}",
                ha="center",
                va="center",
                fontsize=7.5,
                color="#555555",
            )
        ax.text(-1.5, 1.5, "held by", ha="right", va="center", fontsize=8)
        ax.text(-1.5, 0.3, "read as", ha="right", va="center", fontsize=8)
        ax.text(
            n_rows,
            2.55,
            f"rows read wrongly: {misread[split]} of {n_rows}",
            ha="right",
            va="center",
            fontsize=8,
            color=MISREAD_COLOR if misread[split] else "#333333",
        )
    handles = [Patch(facecolor=device_color(r), label=f"rank {r}") for r in range(p)]
    handles.append(Patch(facecolor=MISREAD_COLOR, label="read as the wrong q/k/v or head"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=8, frameon=False)
    return fig
