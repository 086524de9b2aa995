"""tputil.viz.cost, chapter 14's explorer: one model behind the live callback and the stored grid."""

import math
import re

import pytest

from tputil.course import cost_model
from tputil.viz import cost as viz_cost


def test_render_marks_every_field_with_its_value():
    f = viz_cost.fields(viz_cost.DEFAULT)
    page = viz_cost.render(f)
    for name, value in f.items():
        marks = re.findall(rf"data-[fwl]=['\"]{re.escape(name)}['\"]", page)
        # the page script updates every element marked with a field: the capacity line is in each row
        assert len(marks) == (len(cost_model.SCHEMES) if name == "capacity" else 1), name
        assert value in page
    assert f["title"].startswith("7B (L=32, C=4096), p = 8")


def test_fields_come_from_the_cost_model():
    choice = dict(viz_cost.DEFAULT, model=0, p=2, precision=0)  # GPT-2, p = 4, float32
    f = viz_cost.fields(choice)
    config = viz_cost.MODELS["GPT-2 (124M)"]
    mem = cost_model.memory(config, "TP", B=8, T=1024, p=4, precision="float32")
    assert f["m0"] == viz_cost.gigabytes(sum(mem.values()))
    t = cost_model.step_time(
        config,
        "FSDP",
        B=8,
        T=1024,
        p=4,
        precision="float32",
        device=cost_model.DEVICES["H100 SXM 80GB"],
        link=cost_model.LINKS["NVLink 4"],
    )
    assert f["t3"] == viz_cost.milliseconds(sum(t.values()))


def test_schemes_that_cannot_run_say_why():
    f = viz_cost.fields(dict(viz_cost.DEFAULT, model=1))  # GPT-2 XL at p = 8: 25 heads
    assert f["b0"] == f["b1"] == "cannot run: n_head=25 is not divisible by p=8"
    assert f["m0"] == "-" and f["b2"].endswith("binds")


def test_the_grid_holds_every_point_in_the_same_field_order():
    grid = viz_cost.grid()
    sizes = [len(viz_cost.CONTROLS[n]) for n in grid["controls"]]
    assert len(grid["points"]) == 3 * 4 * 3 * 2 * 3 * 3 == math.prod(sizes)
    choice = {"model": 0, "p": 1, "batch": 2, "precision": 0, "device": 2, "link": 2}
    key = "-".join(str(choice[n]) for n in grid["controls"])
    assert grid["points"][key] == [viz_cost.fields(choice)[n] for n in grid["names"]]
    script = viz_cost.page_script()
    assert script.count("<script") == 2 and "</script" not in script.split("</script>", 1)[0][30:]


def test_the_live_callback_redraws():
    pytest.importorskip("ipywidgets")
    box, controls, out = viz_cost.explorer()
    assert "cm-explorer" in box._dom_classes and set(controls) == set(viz_cost.CONTROLS)
    controls["link"].index = 2  # PCIe
    assert "PCIe 5.0 x16" in out.value
    assert out.value == viz_cost.render(viz_cost.fields(dict(viz_cost.DEFAULT, link=2)))
