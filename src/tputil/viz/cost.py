"""The cost model's explorer (chapter 14): memory and time bars for the five schemes, and what binds.

One implementation: every number shown comes from `course.cost_model`, through `fields(choice)`,
which `render` turns into HTML. Live in Jupyter, the controls' Python callback re-renders. In the
built book no Python runs, so `page_script()` stores `fields` for every combination of the
controls' values (the grid is small: a few hundred points) as JSON in the page, with a few lines of
JavaScript that, when a control changes, copy the chosen point's fields into the elements `render`
marked (`data-f`: text, `data-w`: a bar's width, `data-l`: a marker's left edge). The script
computes nothing: the formulas stay in Python.

Controls carry the CSS classes `cm-<name>` (a dropdown each, read by its selected index), the
output `cm-out`, the whole explorer `cm-explorer`; the browser test drives them by these names.
"""

from __future__ import annotations

import html
import itertools
import json

from ..course import cost_model
from ..model import GPTConfig

MODELS = {
    "GPT-2 (124M)": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),
    "GPT-2 XL (1.5B)": GPTConfig(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=1600),
    "7B (L=32, C=4096)": GPTConfig(block_size=2048, vocab_size=50304, n_layer=32, n_head=32, n_embd=4096),
}
# Each control: (label, value) pairs. B x T is the global batch of one step.
CONTROLS = {
    "model": [(k, k) for k in MODELS],
    "p": [(str(p), p) for p in (1, 2, 4, 8)],
    "batch": [("8 x 1024", (8, 1024)), ("32 x 1024", (32, 1024)), ("128 x 1024", (128, 1024))],
    "precision": [(k, k) for k in cost_model.PRECISIONS],
    "device": [(k, k) for k in cost_model.DEVICES],
    "link": [(k, k) for k in ("NVLink 4", "NVLink 3", "PCIe 5.0 x16")],
}
DEFAULT = {"model": 2, "p": 3, "batch": 0, "precision": 1, "device": 0, "link": 0}
MEMORY_PARTS = ("params", "grads", "optimizer", "activations")
TIME_PARTS = ("compute", "communication", "bubble")
COLORS = {
    "params": "#4c72b0",
    "grads": "#55a868",
    "optimizer": "#8172b3",
    "activations": "#dd8452",
    "compute": "#4c72b0",
    "communication": "#c44e52",
    "bubble": "#bbbbbb",
}


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def milliseconds(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e6:.0f} us"


def _pct(x: float, scale: float) -> str:
    return f"{100 * x / scale:.1f}%"


def point(choice: dict) -> dict:
    """The control values of a choice of indices, e.g. {"model": 2, "p": 3, ...}."""
    return {name: CONTROLS[name][choice[name]][1] for name in CONTROLS}


def fields(choice: dict) -> dict:
    """{field name: text} for a choice of control indices: every number the explorer shows."""
    v = point(choice)
    config, (B, T), p = MODELS[v["model"]], v["batch"], v["p"]
    device, link = cost_model.DEVICES[v["device"]], cost_model.LINKS[v["link"]]
    rows = {}
    for s in cost_model.SCHEMES:
        try:
            mem = cost_model.memory(config, s, B=B, T=T, p=p, precision=v["precision"])
            times = cost_model.step_time(config, s, B=B, T=T, p=p, precision=v["precision"], device=device, link=link)
        except ValueError as err:  # p does not divide the heads, the batch or the layers
            rows[s] = str(err).split(";")[0].split(":")[0]
            continue
        rows[s] = (mem, times, cost_model.binding(mem, times, device))
    fitted = [r for r in rows.values() if not isinstance(r, str)]
    mem_scale = max([device.memory] + [sum(m.values()) for m, _, _ in fitted]) * 1.05
    time_scale = max([sum(t.values()) for _, t, _ in fitted] + [1e-12])
    out = {
        "title": f"{v['model']}, p = {p}, B x T = {B} x {T}, {v['precision']}, {v['device']}, {v['link']}",
        "capacity": _pct(device.memory, mem_scale),
        "capacity_text": f"{v['device']}: {gigabytes(device.memory)}",
    }
    for i, s in enumerate(cost_model.SCHEMES):
        row = rows[s]
        if isinstance(row, str):
            out[f"m{i}"], out[f"t{i}"], out[f"b{i}"] = "-", "-", f"cannot run: {row}"
            out.update({f"mw{i}_{k}": "0.0%" for k in MEMORY_PARTS})
            out.update({f"tw{i}_{k}": "0.0%" for k in TIME_PARTS})
            continue
        mem, times, binds = row
        out[f"m{i}"] = gigabytes(sum(mem.values()))
        out[f"t{i}"] = milliseconds(sum(times.values()))
        out[f"b{i}"] = f"{binds} binds"
        out.update({f"mw{i}_{k}": _pct(mem[k], mem_scale) for k in MEMORY_PARTS})
        out.update({f"tw{i}_{k}": _pct(times[k], time_scale) for k in TIME_PARTS})
    return out


def _bar(i: int, prefix: str, parts, f: dict) -> str:
    segs = "".join(
        f'<div data-w="{prefix}{i}_{k}" title="{k}" style="display:inline-block;height:14px;'
        f'background:{COLORS[k]};width:{f[f"{prefix}{i}_{k}"]}"></div>'
        for k in parts
    )
    return f'<div style="position:relative;width:180px;white-space:nowrap;background:#f4f4f4">{segs}MARK</div>'


def render(f: dict) -> str:
    """The explorer's output for one point's fields (`fields`), as HTML."""
    esc = html.escape
    cap = (
        f'<div data-l="capacity" style="position:absolute;top:-2px;height:18px;border-left:2px dashed #333;'
        f'left:{f["capacity"]}"></div>'
    )
    rows = []
    for i, s in enumerate(cost_model.SCHEMES):
        mem_bar = _bar(i, "mw", MEMORY_PARTS, f).replace("MARK", cap)
        time_bar = _bar(i, "tw", TIME_PARTS, f).replace("MARK", "")
        rows.append(
            f"<tr><td><b>{s}</b></td><td>{mem_bar}</td><td data-f='m{i}'>{esc(f[f'm{i}'])}</td>"
            f"<td>{time_bar}</td><td data-f='t{i}'>{esc(f[f't{i}'])}</td>"
            f"<td data-f='b{i}'>{esc(f[f'b{i}'])}</td></tr>"
        )
    legend = " ".join(
        f'<span style="display:inline-block;width:10px;height:10px;background:{COLORS[k]}"></span> {k}'
        for k in (*MEMORY_PARTS, "communication", "bubble")
    )
    return (
        f"<div class='cm-view'><p data-f='title'>{esc(f['title'])}</p>"
        "<table style='font-size:13px;white-space:nowrap'><tr><th>scheme</th><th colspan='2'>memory a rank</th>"
        "<th colspan='2'>time a step (no overlap)</th><th>binding constraint</th></tr>"
        + "".join(rows)
        + f"</table><p style='font-size:small'>{legend}; dashed line: "
        f"<span data-f='capacity_text'>{esc(f['capacity_text'])}</span></p></div>"
    )


def grid() -> dict:
    """fields() for every combination of the controls: {"1-2-0-1-0-0": [values in `names` order]}."""
    names = list(fields(DEFAULT))
    points = {}
    for combo in itertools.product(*(range(len(CONTROLS[n])) for n in CONTROLS)):
        f = fields(dict(zip(CONTROLS, combo)))
        points["-".join(map(str, combo))] = [f[n] for n in names]
    return {"controls": list(CONTROLS), "names": names, "points": points}


SCRIPT = """<script type="application/json" id="cm-grid">%s</script>
<script>
(function () {
  // The chapter-14 explorer offline: on a control's change, show the stored point (no formulas here).
  var grid = JSON.parse(document.getElementById("cm-grid").textContent);
  document.addEventListener("change", function (event) {
    var root = event.target.closest && event.target.closest(".cm-explorer");
    if (!root) return;
    var key = grid.controls.map(function (c) {
      return root.querySelector(".cm-" + c + " select").selectedIndex;
    }).join("-");
    var values = grid.points[key], out = root.querySelector(".cm-out");
    if (!values || !out) return;
    grid.names.forEach(function (name, i) {
      out.querySelectorAll('[data-f="' + name + '"]').forEach(function (e) { e.textContent = values[i]; });
      out.querySelectorAll('[data-w="' + name + '"]').forEach(function (e) { e.style.width = values[i]; });
      out.querySelectorAll('[data-l="' + name + '"]').forEach(function (e) { e.style.left = values[i]; });
    });
  });
})();
</script>"""


def page_script() -> str:
    """The stored grid and the lines that show it when a control changes (the built book's half)."""
    return SCRIPT % json.dumps(grid(), separators=(",", ":")).replace("</", "<\\/")


def explorer():
    """The ipywidgets explorer: six dropdowns and the bars; the Python callback redraws in Jupyter."""
    import ipywidgets as widgets

    controls = {}
    for name, options in CONTROLS.items():
        w = widgets.Dropdown(options=[label for label, _ in options], index=DEFAULT[name], description=name)
        w.add_class(f"cm-{name}")
        controls[name] = w
    out = widgets.HTML(render(fields(DEFAULT)))
    out.add_class("cm-out")

    def redraw(_change=None):
        out.value = render(fields({n: w.index for n, w in controls.items()}))

    for w in controls.values():
        w.observe(redraw, names="index")
    box = widgets.VBox([widgets.HBox(list(controls.values())[:3]), widgets.HBox(list(controls.values())[3:]), out])
    box.add_class("cm-explorer")
    return box, controls, out
