"""What the widgets of chapters 1-6, 9 and 10 must show, for every position of their controls.

Each of these widgets is a control (a slider, or a dropdown with toggle buttons) linked in the
browser (`jslink`) to a stack of texts the notebook computed and stored: the built book runs no
Python, so moving the control only flips to another stored text. `tests/test_book.py` moves every
control through every position in Chromium and checks three things of what the page then shows:

- it is the stored text for that position (`stored_widget` reads them from the notebook);
- it says what the control chose, and its numbers are the ones the control's value implies,
  derived here from the value with plain arithmetic or the package's plan and shapes (the
  `check_*` functions below), not copied from the notebook's code;
- one of the stored texts is printed by the same notebook (`printed_pages`), an output that
  `pytest --nbval` recomputes, so the stored texts cannot drift from the code unnoticed.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tputil import shard
from tputil.course import compare
from tputil.model import GPTConfig

ROOT = Path(__file__).resolve().parents[1]
STATE = "application/vnd.jupyter.widget-state+json"
CONTROLS = ("SelectionSliderModel", "DropdownModel", "ToggleButtonsModel")


# --- the stored widget, read from the notebook -------------------------------------------------


@dataclass
class Control:
    kind: str  # "SelectionSliderModel", "DropdownModel" or "ToggleButtonsModel"
    labels: list[str]
    index: int  # the position the notebook left it at


@dataclass
class StoredWidget:
    controls: list[Control]  # in the order the widget shows them
    pages: list  # pages[i] (one control) or pages[i][j] (two): the text shown for that choice
    start: tuple  # the indices the stacks were left at


def _page_text(value: str) -> str:
    """The text of one stored HTML page, as the browser's textContent gives it."""
    inner = re.fullmatch(r"<pre>(.*)</pre>", value, re.DOTALL)
    assert inner, f"a stored page is not one <pre> block: {value[:80]!r}"
    return html.unescape(inner.group(1))


def stored_widget(notebook: Path) -> StoredWidget:
    """The one interactive widget of `notebook`: its controls and the stacked pages they select."""
    state = json.loads(notebook.read_text(encoding="utf-8"))["metadata"]["widgets"][STATE]["state"]

    def model(ref: str) -> dict:
        return state[ref.removeprefix("IPY_MODEL_")]

    boxes = [
        m
        for m in state.values()
        if m["model_name"] == "VBoxModel" and any(model(c)["model_name"] in CONTROLS for c in m["state"]["children"])
    ]
    assert len(boxes) == 1, f"{notebook.name}: expected one widget with controls, found {len(boxes)}"
    children = [model(c) for c in boxes[0]["state"]["children"]]
    controls = [
        Control(m["model_name"], list(m["state"]["_options_labels"]), m["state"]["index"])
        for m in children
        if m["model_name"] in CONTROLS
    ]
    (stack,) = [m for m in children if m["model_name"] == "StackModel"]

    start = []

    def pages(m: dict):
        if m["model_name"] == "HTMLModel":
            return _page_text(m["state"]["value"])
        assert m["model_name"] == "StackModel", m["model_name"]
        if len(start) < len(controls):
            start.append(m["state"]["selected_index"])
        return [pages(model(c)) for c in m["state"]["children"]]

    return StoredWidget(controls, pages(stack), tuple(start))


def printed_pages(notebook: Path) -> list[str]:
    """The notebook's stored printed outputs (each one cell's stdout), which nbval recomputes."""
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return [
        "".join(out["text"]).rstrip("\n")
        for cell in cells
        if cell["cell_type"] == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "stream" and out.get("name") == "stdout"
    ]


# --- what each chapter's widget must show ------------------------------------------------------


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _merged(ranges) -> list[tuple[int, int]]:
    """[lo, hi) ranges in order, adjacent ones joined: the pages write 0:96, 96:192 as 0:192."""
    merged = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            a = merged.pop()[0]
        merged.append((a, b))
    return merged


def check_ch01(label: str, text: str) -> None:
    """Chapter 1: a 60-entry dot product on p devices; the partial sums add up to the total."""
    p, n = int(label), 60
    lines = _lines(text)
    assert lines[0] == f"p = {p}: each device holds {n // p} entries of a and of b", lines[0]
    devices = re.findall(r"^  device (\d+): partial sum ([+-]\d+)$", text, re.MULTILINE)
    assert [int(d) for d, _ in devices] == list(range(p)), f"one line per device 0..{p - 1}: {devices}"
    total = re.fullmatch(r"  all-reduce: every device holds (-?\d+)", lines[p + 1])
    dense = re.fullmatch(r"  dense a · b = (-?\d+), equal: True", lines[p + 2])
    assert total and dense and len(lines) == p + 3, text
    assert sum(int(s) for _, s in devices) == int(total.group(1)) == int(dense.group(1))


def ring_states() -> list[list[list[int]]]:
    """Chapter 2's ring all-reduce of 10^r * [1, 2, 3, 4] on 4 devices, step by step.

    At reduce-scatter step s (1..3) device r adds its chunk (r - s) mod 4 into device r + 1's;
    at all-gather step s (1..3) device r's chunk (r - s + 1) mod 4 replaces device r + 1's.
    """
    held = [[(c + 1) * 10**r for c in range(4)] for r in range(4)]
    states = [[row[:] for row in held]]
    for phase in ("add", "copy"):
        for s in range(1, 4):
            sends = [(r, (r - s + (phase == "copy")) % 4) for r in range(4)]
            values = [held[r][c] for r, c in sends]  # all sent at once, then received
            for (r, c), v in zip(sends, values):
                held[(r + 1) % 4][c] = held[(r + 1) % 4][c] + v if phase == "add" else v
            states.append([row[:] for row in held])
    return states


def check_ch02(label: str, text: str) -> None:
    """Chapter 2: the ring all-reduce at step `label` (0 = before); 4 bytes a chunk a step."""
    step, done = int(label), [1111 * (c + 1) for c in range(4)]
    lines = _lines(text)
    if step == 0:
        assert lines[0] == "before: device r holds 10^r * [1, 2, 3, 4]", lines[0]
    elif step <= 3:
        assert lines[0].startswith(f"reduce-scatter, step {step} of 3: device r sends chunk (r - {step}) mod 4")
    else:
        assert lines[0].startswith(f"all-gather, step {step - 3} of 3: device r passes chunk (r - {step - 4}) mod 4")
    rows = re.findall(r"^device (\d) +(.+?) +(\d+)$", text, re.MULTILINE)
    assert [int(r) for r, _, _ in rows] == [0, 1, 2, 3], text
    want = ring_states()[step]
    for r, cells, sent in rows:
        values = re.findall(r"(\d+)(\*?)", cells)
        assert [int(v) for v, _ in values] == want[int(r)], f"device {r} at step {step}: {cells}"
        assert [m == "*" for _, m in values] == [int(v) == d for (v, _), d in zip(values, done)]
        assert int(sent) == 4 * step  # one float32 chunk each step
    if step >= 3:  # after the reduce-scatter each device holds step - 2 finished chunks
        assert all(cells.count("*") == step - 2 for _, cells, _ in rows)


def check_ch03(label: str, text: str) -> None:
    """Chapter 3: GPT-2's MLP pair (C = 768, B*T = 8192) over p devices; ring all-reduce bytes."""
    p, C, BT = int(label), 768, 8 * 1024
    H = 4 * C // p
    activation_mib = BT * C * 4 / 2**20  # one float32 (B, T, C): 24 MiB
    assert _lines(text) == [
        f"p = {p}: per rank",
        f"  column layer weight ({H}, {C}): A[768, 3072_p], {H} outputs",
        f"  row layer weight    ({C}, {H}): A[3072_p, 768], {H} inputs",
        f"  activations between: (B, T, {H}), never sent",
        "  collectives per forward: " + ("none (one device)" if p == 1 else "{'all_reduce': 1}"),
        f"  multiply-adds: {BT * C * 4 * C // p * 2:,}",
        f"  ring bytes sent: {2 * (p - 1) / p * activation_mib:.1f} MiB",
    ], text


def check_ch04(label: str, text: str) -> None:
    """Chapter 4: an MLP with C = 48 (4C = 192) on p ranks, B*T = 16 tokens."""
    p, C, BT = int(label), 48, 16
    H = 4 * C // p
    params = (C * H + H) + (H * C + C)  # c_fc's columns and bias slice; c_proj's rows, its whole bias
    assert _lines(text) == [
        f"p = {p}: each rank holds {H} of the {4 * C} hidden features",
        f"  c_fc.weight ({H}, {C}), c_proj.weight ({C}, {H}), c_proj.bias ({C},) replicated",
        f"  parameters per rank: {params:,} of {(C * 4 * C + 4 * C) + (4 * C * C + C):,}",
        f"  all-reduces per forward: {int(p > 1)}, bytes in: {(p > 1) * BT * C * 4:,}",
        "  output equal to the dense MLP within 1e-05: True",
    ], text


def check_ch05(label: str, text: str) -> None:
    """Chapter 5: attention with 6 heads, C = 48: c_attn's rows by head (stride 3) and cut wrongly."""
    p, nh, C = int(label), 6, 48
    per = C // p  # each rank's rows of each of q, k and v

    def spans(ranges):
        return ", ".join(f"{a}-{b - 1}" for a, b in _merged(ranges))

    header = f"p = {p}: {nh // p} head(s) per rank; equal to the dense layer: True"
    want = [f"{header}; all-reduces per forward: {int(p > 1)}"]
    misread = 0
    for r in range(p):
        strided = [(s * C + r * per, s * C + (r + 1) * per) for s in range(3)]
        contiguous = (r * 3 * per, (r + 1) * 3 * per)
        # the layer reads its k-th local row as row (k // per) * C + r * per + k % per (stride 3):
        # a row of the contiguous cut is misread wherever it is another row
        misread += sum(contiguous[0] + k != (k // per) * C + r * per + k % per for k in range(3 * per))
        want += [
            f"  rank {r}: heads {r * nh // p}-{(r + 1) * nh // p - 1}",
            f"    c_attn rows, stride 3: {spans(strided)}",
            f"    contiguous (wrong):    {spans([contiguous])}",
        ]
    want.append(f"  rows the contiguous cut puts in the wrong role: {misread} of {3 * C}")
    assert _lines(text) == want, text


CH06_CONFIG = GPTConfig(block_size=64, vocab_size=256, n_layer=4, n_head=4, n_embd=64)


def check_ch06(choice: tuple[str, str], text: str) -> None:
    """Chapter 6: one parameter of the GPT at degree p, by the package's plan; its module's collectives.

    In a traced training step (B, T = 2, 32) a column-parallel layer all-reduces dL/dx in the
    backward pass, a row-parallel one its output in the forward pass; nothing else communicates.
    """
    name, p = choice[0], int(choice[1])
    config, B, T = CH06_CONFIG, 2, 32
    where = shard.placement(name)
    dense = tuple(shard.dense_shapes(config)[name])
    lines = _lines(text)
    assert lines[0] == name and lines[1] == f"dense shape {dense}; plan: {where}", lines[:2]
    start = lines.index("") + 1
    if isinstance(where, shard.Replicate):
        body = [f"p = {p}: every rank holds all of it, shape {dense}"]
    else:
        unit = "entries" if len(dense) == 1 else ("rows", "columns")[where.dim]
        body = [f"p = {p}: each rank holds shape {tuple(shard.shard_shapes(config, p)[name])}"]
        for r in range(p):
            ranges = _merged(shard.shard_intervals(dense[where.dim], r, p, where.stride))
            body.append(f"  rank {r}: {unit} " + ", ".join(f"{a}:{b}" for a, b in ranges))
    module = name.rsplit(".", 1)[0]
    layer = module.rsplit(".", 1)[-1]
    role = {"c_attn": "column", "c_fc": "column", "c_proj": "row"}.get(layer) if p > 1 else None
    activation = f"all_reduce {(B, T, config.n_embd)}, {B * T * config.n_embd * 4:,} bytes"
    body += [
        "",
        f"collectives of {module}, per rank (a traced step, p = {p}):",
        "  forward: " + (activation if role == "row" else "none"),
        "  backward: " + (activation if role == "column" else "none"),
    ]
    assert lines[start:] == body, text


CH09_CONFIG = GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=64)


def check_ch09(label: str, text: str) -> None:
    """Chapter 9: 60 AdamW steps of a 2-layer GPT on p ranks (B, T = 8, 32), float32 state."""
    p, config, B, T = int(label), CH09_CONFIG, 8, 32
    N = compare.gpt_num_params(config)
    N_r = compare.tensor_parallel(config, B=B, T=T, p=p).params_per_rank
    per_layer = 4 if p > 1 else 0  # two in the forward pass, two in the backward
    nbytes = per_layer * config.n_layer * B * T * config.n_embd * 4
    lines = _lines(text)
    assert lines[:3] == [
        f"p = {p}: each rank holds",
        f"  {N_r:,} of {N:,} parameters ({N_r / N:.0%}), {16 * N_r / 2**20:.2f} MiB with gradients and AdamW moments",
        f"  each training step sends {per_layer * config.n_layer} all-reduces ({per_layer} per layer), "
        f"{nbytes:,} bytes in",
    ], text
    assert re.fullmatch(
        r"  loss over 60 steps: \d\.\d\d -> \d\.\d\d, within the tolerance of dense at every step: True", lines[3]
    ), lines[3]
    assert lines[4:] == ["  greedy text equal to the dense model's: True"], text


def check_ch10(label: str, text: str) -> None:
    """Chapter 10: GPT-2's 50,257 tokens padded for p ranks, to a multiple of p and of 128 p."""
    p, V = int(label), 50257
    want = [f"p = {p}: {V:,} tokens", f"  {'rule':<14}{'V_pad':>8}{'padding':>9}{'ids per rank':>14}"]
    for rule, step in (("multiple of p", p), ("of 128·p", 128 * p)):
        padded = -(-V // step) * step
        want.append(f"  {rule:<14}{padded:>8,}{padded - V:>9,}{padded // p:>14,}")
    want.append("  under 128·p:")
    per = -(-V // (128 * p)) * 128
    for r in range(p):
        first, end = r * per, min((r + 1) * per, V)
        pad = (r + 1) * per - end
        want.append(f"    rank {r}: ids {first:,} to {end - 1:,}" + (f", then {pad:,} padding ids" if pad else ""))
    assert _lines(text) == want, text


# page name -> (notebook, check); a check takes the chosen label (or labels) and the shown text
WIDGETS = {
    "book/01_toy_all_reduce": check_ch01,
    "book/02_collectives": check_ch02,
    "book/03_parallel_linear": check_ch03,
    "book/04_tp_mlp": check_ch04,
    "book/05_tp_attention": check_ch05,
    "book/06_tp_gpt": check_ch06,
    "book/09_backward_training": check_ch09,
    "book/10_vocab_parallel": check_ch10,
}


def notebook(page: str) -> Path:
    return ROOT / f"{page}.ipynb"
