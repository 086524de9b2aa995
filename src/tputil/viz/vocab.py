"""The vocabulary split of chapter 10: which rank owns which token ids, and the padding.

``vocab_layout(vocab_size, p, multiple=1)`` lists, for each rank, the token ids it owns and how
many of them are real tokens; the rest are padding. It is computed with the package's own
``shard.pad_vocab_size`` and ``shard.vocab_range``, so the picture is the split the model uses.

``draw_vocab_split(vocab_size, degrees, multiple=1)`` draws one bar per degree p: the padded
vocabulary [0, V_pad) cut into the p contiguous ranges the ranks own, in the ranks' colors, with
the padding ids hatched. A bar is at once the rows of the tied ``wte`` / ``lm_head.weight`` and the
columns of the logits: one split serves the embedding, the head and the loss. Bars are drawn to
one scale, so a vocabulary padded further is a longer bar.

Gids: ``"p{p}-device{r}"`` (one per rank of every bar) and ``"p{p}-padding{r}"`` (one per rank that
owns padding ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from tputil.shard import pad_vocab_size, vocab_range
from tputil.viz import device_color

__all__ = ["RankVocab", "vocab_layout", "draw_vocab_split"]

PADDING_COLOR = "#f2f2f2"


@dataclass(frozen=True)
class RankVocab:
    """The ids [start, end) of one rank; [start, real_end) are tokens, [real_end, end) padding."""

    rank: int
    start: int
    end: int
    real_end: int

    @property
    def n_real(self) -> int:
        return self.real_end - self.start

    @property
    def n_padding(self) -> int:
        return self.end - self.real_end


def vocab_layout(vocab_size: int, p: int, *, multiple: int = 1) -> list[RankVocab]:
    """Every rank's ids for a vocabulary of vocab_size split over p ranks (padded as the model pads it)."""
    padded = pad_vocab_size(vocab_size, p, multiple=multiple)
    out = []
    for r in range(p):
        start, end = vocab_range(padded, r, p)
        out.append(RankVocab(r, start, end, min(end, max(start, vocab_size))))
    return out


def _label(rv: RankVocab) -> str:
    if rv.n_real == 0:
        return f"rank {rv.rank}\npadding only"
    ids = f"{rv.start}" if rv.n_real == 1 else f"{rv.start}–{rv.real_end - 1}"
    return f"rank {rv.rank}\nids {ids}"


def draw_vocab_split(vocab_size: int, degrees: Sequence[int], *, multiple: int = 1, title: str | None = None) -> Figure:
    """One bar per p in degrees: which rank owns which ids of a vocab_size vocabulary, padding hatched."""
    degrees = list(degrees)
    if not degrees:
        raise ValueError("draw_vocab_split needs at least one degree p")
    layouts = [vocab_layout(vocab_size, p, multiple=multiple) for p in degrees]  # checks p and multiple
    longest = max(lay[-1].end for lay in layouts)
    fig = Figure(figsize=(10.0, 0.85 * len(degrees) + 1.3))
    ax = fig.add_axes(
        (0.13, 0.55 / (0.85 * len(degrees) + 1.3), 0.74, 0.85 * len(degrees) / (0.85 * len(degrees) + 1.3))
    )
    ax.set_xlim(0, longest)
    ax.set_ylim(-0.15, len(degrees) - 0.05)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("token id = row of the tied wte / lm_head.weight = column of the logits", fontsize=9)
    if title is None:
        title = f"A vocabulary of {vocab_size:,} token ids split over p ranks"
        title += "" if multiple == 1 else f" (padded to a multiple of {multiple}·p)"
    fig.suptitle(title, fontsize=11)

    h = 0.62
    for i, (p, layout) in enumerate(zip(degrees, layouts)):
        y = len(degrees) - 1 - i  # the first degree on top
        padded = layout[-1].end
        for rv in layout:
            patch = Rectangle(
                (rv.start, y), rv.end - rv.start, h, facecolor=device_color(rv.rank), edgecolor="#333333", linewidth=0.8
            )
            patch.set_gid(f"p{p}-device{rv.rank}")
            ax.add_patch(patch)
            if rv.n_padding:
                pad = Rectangle(
                    (rv.real_end, y),
                    rv.n_padding,
                    h,
                    facecolor=PADDING_COLOR,
                    edgecolor="#333333",
                    hatch="///",
                    linewidth=0.8,
                )
                pad.set_gid(f"p{p}-padding{rv.rank}")
                ax.add_patch(pad)
            width = (rv.end - rv.start) / longest  # a fraction of the axis, 7.4 inches wide
            label = _label(rv)
            chars = max(len(line) for line in label.splitlines())
            size = min(8.0, width * 7.4 * 72 / (0.78 * chars))  # points that fit the segment
            if size >= 5.0:
                cx = (rv.start + rv.real_end) / 2 if rv.n_real else (rv.start + rv.end) / 2
                ax.text(
                    cx,
                    y + h / 2,
                    label,
                    ha="center",
                    va="center",
                    fontsize=size,
                    color="white" if rv.n_real else "#333333",
                    fontweight="bold" if rv.n_real else "normal",
                    bbox=None if rv.n_real else dict(facecolor="white", edgecolor="none", pad=1.0),
                )
        ax.text(-0.01 * longest, y + h / 2, f"p = {p}\nV_pad = {padded:,}", ha="right", va="center", fontsize=9)
        n_pad = padded - vocab_size
        ax.text(
            padded + 0.01 * longest,
            y + h / 2,
            f"{n_pad:,} padding id{'s' if n_pad != 1 else ''}" if n_pad else "no padding",
            ha="left",
            va="center",
            fontsize=8,
        )
    ax.axvline(vocab_size, color="#333333", linestyle=":", linewidth=1.0)
    ax.text(vocab_size, len(degrees) - 0.12, f"V = {vocab_size:,}", ha="center", va="bottom", fontsize=8)
    return fig
