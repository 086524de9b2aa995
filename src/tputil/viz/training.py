"""The figures of chapter 9 (backward and training): the conjugate operators, and two loss curves.

``draw_conjugate_pair(x, a_shards, b_shards)`` draws a column-parallel layer followed by a
row-parallel one on p ranks, forward on top and backward below it, with the shapes read from the
real input and weight shards. Column by column the two passes mirror each other: where the
forward pass holds a replicated tensor, the backward pass holds partial sums, and the other way
round. So ``f`` (forward identity) needs an all-reduce in backward, and ``g`` (forward all-reduce)
is the identity in backward.

``draw_loss_curves(dense, tp)`` draws the loss of a dense training run and of tensor-parallel
runs of the same model, step by step, and next to it ``|TP - dense|`` on a log scale with the
tolerance the chapter asserts.

Patches and lines carry gids so tests can count what was drawn: ``"forward-X-device0"``,
``"backward-f-all-reduce"``, ``"loss-tp-p2"``, ``"gap-tp-p2"``, ``"tolerance"`` (see each function).
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from tputil.viz import device_color

__all__ = ["draw_conjugate_pair", "draw_loss_curves"]

REPLICATED_COLOR = "#d9d9d9"
BAR_COLOR = "#fff3c4"
_BOX_W, _BOX_H, _BAR_W, _ROW = 1.9, 0.62, 0.55, 0.9  # schematic sizes, in axes units


def _shape_text(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _columns(M, K, Hp, N, p):
    """The seven columns of each pass: (name, label, shape, kind) with kind in
    replicated / sharded / partial (per-rank boxes) or identity / all-reduce (a connector)."""
    reduce = "all-reduce" if p > 1 else "identity"
    forward = [
        ("X", "$X$", (M, K), "replicated"),
        ("f", "f: identity", None, "identity"),
        ("X-copy", "$X$ (every rank)", (M, K), "replicated"),
        ("H", "$H_r = X A_r$", (M, Hp), "sharded"),
        ("Y-partial", "$H_r B_r$ (partial)", (M, N), "partial"),
        ("g", "g: all-reduce" if p > 1 else "g: p = 1, identity", None, reduce),
        ("Y", "$Y = \\sum_r H_r B_r$", (M, N), "replicated"),
    ]
    backward = [
        ("dX", "$\\partial L/\\partial X$", (M, K), "replicated"),
        ("f", "f backward: all-reduce" if p > 1 else "f backward: p = 1, identity", None, reduce),
        ("dX-partial", "$\\partial L/\\partial H_r\\,A_r^T$ (partial)", (M, K), "partial"),
        ("dH", "$\\partial L/\\partial H_r = \\partial L/\\partial Y\\,B_r^T$", (M, Hp), "sharded"),
        ("dY-copy", "$\\partial L/\\partial Y$ (every rank)", (M, N), "replicated"),
        ("g", "g backward: identity", None, "identity"),
        ("dY", "$\\partial L/\\partial Y$", (M, N), "replicated"),
    ]
    return forward, backward


def draw_conjugate_pair(x, a_shards, b_shards, *, title: str | None = None) -> Figure:
    """A column-parallel then a row-parallel layer on p ranks: forward above, backward below (chapter 9).

    ``x`` is the replicated input, (M, K) or (B, T, K) (leading dims are flattened into M);
    ``a_shards[r]`` rank r's weight of the column-parallel layer in ``nn.Linear``'s layout
    (H/p, K), i.e. the columns A_r of A; ``b_shards[r]`` rank r's weight of the row-parallel
    layer, (N, H/p), i.e. the rows B_r of B. p = len(a_shards). Boxes are schematic, labelled
    with the real shapes. Grey: the same tensor on every rank; colour: rank r's own slice;
    hatched: a partial sum (only the sum over ranks means something).

    gids: ``"<phase>-<name>-device<r>"`` for the per-rank boxes, phase in forward/backward, names
    X, X-copy, H, Y-partial, Y (forward) and dX, dX-partial, dH, dY-copy, dY (backward); the
    connectors ``"forward-f-identity"``, ``"forward-g-all-reduce"``, ``"backward-f-all-reduce"``,
    ``"backward-g-identity"`` (at p = 1 every connector is an identity).
    """
    p = len(a_shards)
    if p < 1 or len(b_shards) != p:
        raise ValueError(f"need one shard of each weight per rank: got {len(a_shards)} of A and {len(b_shards)} of B")
    M = 1
    for s in x.shape[:-1]:
        M *= s
    K = x.shape[-1]
    Hp, N = a_shards[0].shape[0], b_shards[0].shape[0]
    for r in range(p):
        if tuple(a_shards[r].shape) != (Hp, K) or tuple(b_shards[r].shape) != (N, Hp):
            raise ValueError(
                f"rank {r}: A_r of shape {tuple(a_shards[r].shape)} and B_r of shape "
                f"{tuple(b_shards[r].shape)} do not fit x (..., {K}): expected ({Hp}, {K}) "
                f"and ({N}, {Hp})"
            )
    forward, backward = _columns(M, K, Hp, N, p)

    xs, cursor = [], 0.0
    for _, _, _, kind in forward:
        xs.append(cursor)
        cursor += (_BOX_W if kind in ("replicated", "sharded", "partial") else _BAR_W) + 0.45
    width = cursor - 0.45
    panel_h = p * _ROW
    gap = 1.3  # between the panels: room for the labels
    fig = Figure(figsize=(min(2.0 + 1.45 * width, 15.0), 1.6 + 0.62 * (2 * panel_h + gap + 1.6)))
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.93 if title else 1.0))
    ax.set_xlim(-1.3, width + 0.2)
    ax.set_ylim(-0.75, 2 * panel_h + gap + 1.0)
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)

    for phase, cols, base in (("forward", forward, panel_h + gap), ("backward", backward, 0.0)):
        top = base + panel_h
        arrow = "left to right" if phase == "forward" else "right to left"
        ax.text(-1.25, top + 0.62, f"{phase} ({arrow})", fontsize=9.5, fontweight="bold", va="bottom")
        y_arrow = top + 0.45
        start, end = (0.2, width - 0.2) if phase == "forward" else (width - 0.2, 0.2)
        ax.add_patch(
            FancyArrowPatch(
                (start, y_arrow), (end, y_arrow), arrowstyle="-|>", mutation_scale=12, color="#777777", linewidth=1.0
            )
        )
        for (name, label, shape, kind), x0 in zip(cols, xs):
            if kind in ("identity", "all-reduce"):
                bar = Rectangle(
                    (x0, base + 0.05),
                    _BAR_W,
                    panel_h - 0.1,
                    facecolor=BAR_COLOR if kind == "all-reduce" else "white",
                    edgecolor="#555555",
                    linewidth=1.0,
                    linestyle="-" if kind == "all-reduce" else "--",
                )
                bar.set_gid(f"{phase}-{name}-{kind}")
                ax.add_patch(bar)
                ax.text(x0 + _BAR_W / 2, base + panel_h / 2, label, rotation=90, ha="center", va="center", fontsize=7.5)
                continue
            ax.text(x0 + _BOX_W / 2, top + 0.08, label, ha="center", va="bottom", fontsize=8.5)
            for r in range(p):
                y0 = top - (r + 1) * _ROW + (_ROW - _BOX_H) / 2
                color = REPLICATED_COLOR if kind == "replicated" else device_color(r)
                box = Rectangle(
                    (x0, y0),
                    _BOX_W,
                    _BOX_H,
                    facecolor=color,
                    edgecolor="#333333",
                    linewidth=0.8,
                    hatch="///" if kind == "partial" else None,
                    alpha=0.9,
                )
                box.set_gid(f"{phase}-{name}-device{r}")
                ax.add_patch(box)
                ax.text(
                    x0 + _BOX_W / 2,
                    y0 + _BOX_H / 2,
                    _shape_text(shape),
                    ha="center",
                    va="center",
                    fontsize=7.5,
                    bbox=dict(facecolor="white", edgecolor="none", pad=0.8, alpha=0.85),
                )
        for r in range(p):
            y_mid = top - (r + 0.5) * _ROW
            ax.text(
                -0.15,
                y_mid,
                f"rank {r}",
                ha="right",
                va="center",
                fontsize=8.5,
                fontweight="bold",
                color=device_color(r),
            )
    return fig


def draw_loss_curves(dense_losses, tp_losses: dict, *, tolerance=None, title: str | None = None) -> Figure:
    """The dense run's loss and the tensor-parallel runs' losses per step; |TP - dense| on a log scale.

    ``dense_losses``: the loss of each step of the dense run; ``tp_losses``: {p: losses of the
    run on p ranks} (rank 0's; every rank has the same), each as long as the dense run.
    ``tolerance`` (optional): a function step -> allowed |TP - dense| (e.g.
    ``lambda s: train.loss_tolerance(torch.float32, s)``), drawn as a dashed line on the right.
    A log scale has no place for 0, so steps where a TP loss equals the dense one bit for bit are
    drawn as hollow markers on a floor line at the bottom, labelled "0".

    gids (on the lines): ``"loss-dense"``, ``"loss-tp-p<p>"``, ``"gap-tp-p<p>"`` (the nonzero
    gaps), ``"gap-zero-tp-p<p>"`` (the steps with no gap), ``"tolerance"``.
    """
    dense = [float(v) for v in dense_losses]
    n = len(dense)
    if n == 0:
        raise ValueError("dense_losses is empty: nothing to draw")
    for p, losses in tp_losses.items():
        if len(losses) != n:
            raise ValueError(
                f"the run on p={p} ranks has {len(losses)} losses, the dense run {n}: they must cover the same steps"
            )
    steps = list(range(n))
    runs = sorted(tp_losses.items())
    gaps = {p: [abs(float(a) - b) for a, b in zip(losses, dense)] for p, losses in runs}
    positive = [g for gs in gaps.values() for g in gs if g > 0]
    floor = min(positive) / 6 if positive else 1e-9

    fig = Figure(figsize=(11.0, 4.2))
    ax_loss, ax_gap = fig.subplots(1, 2)
    if title:
        fig.suptitle(title, fontsize=11)
    (line,) = ax_loss.plot(steps, dense, color="black", linewidth=4.0, alpha=0.3, label="dense")
    line.set_gid("loss-dense")
    markers = "os^Dv<>"
    for i, (p, losses) in enumerate(runs):
        color, marker = device_color(i + 1), markers[i % len(markers)]
        (line,) = ax_loss.plot(
            steps,
            [float(v) for v in losses],
            color=color,
            linewidth=1.2,
            linestyle=(0, (4, 2 + i)),
            label=f"TP, p = {p}",
        )
        line.set_gid(f"loss-tp-p{p}")
        shift = (i - (len(runs) - 1) / 2) * 0.22  # side by side, so equal gaps do not hide each other
        nonzero = [(s + shift, g) for s, g in zip(steps, gaps[p]) if g > 0]
        zero = [s + shift for s, g in zip(steps, gaps[p]) if g == 0]
        (line,) = ax_gap.plot(
            [s for s, _ in nonzero],
            [g for _, g in nonzero],
            linestyle="none",
            marker=marker,
            markersize=4.5,
            color=color,
            label=f"p = {p}: {len(nonzero)} steps differ, {len(zero)} equal",
        )
        line.set_gid(f"gap-tp-p{p}")
        (line,) = ax_gap.plot(
            zero,
            [floor] * len(zero),
            linestyle="none",
            marker=marker,
            markersize=4.5,
            markerfacecolor="none",
            color=color,
        )
        line.set_gid(f"gap-zero-tp-p{p}")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (cross-entropy)")
    ax_loss.set_title("loss per step: the curves overlap", fontsize=10)
    ax_loss.legend(fontsize=8)
    ax_loss.grid(alpha=0.3)

    ax_gap.axhline(floor, color="#999999", linewidth=0.8)
    ax_gap.text(
        n - 1,
        floor / 1.12,
        "0: equal bit for bit (hollow markers)",
        ha="right",
        va="top",
        fontsize=7.5,
        color="#555555",
    )
    if tolerance is not None:
        (line,) = ax_gap.plot(
            steps,
            [tolerance(s) for s in steps],
            color="black",
            linewidth=1.3,
            linestyle="--",
            label="tolerance asserted",
        )
        line.set_gid("tolerance")
    ax_gap.set_yscale("log")
    top = max([tolerance(s) for s in steps] if tolerance is not None else positive or [floor])
    ax_gap.set_ylim(floor / 2.5, top * 30)
    ax_gap.set_xlabel("step")
    ax_gap.set_ylabel("|TP loss - dense loss|")
    ax_gap.set_title("the gap per step, log scale", fontsize=10)
    ax_gap.legend(fontsize=8, loc="upper right", ncol=2 if len(runs) > 2 else 1)
    ax_gap.grid(alpha=0.3, which="major")
    fig.tight_layout()
    return fig
