"""Smoke tests for tputil.viz.sequence: chapter 11's activation-memory bars, one segment per region."""

from matplotlib.figure import Figure

from tputil.viz import sequence as viz_sequence


def _patches(fig):
    return {patch.get_gid(): patch for ax in fig.axes for patch in ax.patches if patch.get_gid()}


def test_one_segment_per_region_stacked_and_a_tick_per_formula():
    bars = {"TP p=2": {"ln_1": 1024, "attn": 3072, "ln_2": 1024, "mlp": 2048}, "TP+SP p=2": {"ln_1": 512, "mlp": 512}}
    fig = viz_sequence.draw_activation_memory(bars, {"TP p=2": {"all": 7168}}, title="t")
    assert isinstance(fig, Figure)
    patches = _patches(fig)
    assert sorted(patches) == sorted(
        [f"{label}-{r}" for label in bars for r in viz_sequence.REGION_COLORS] + ["TP p=2-formula"]
    )
    assert patches["TP p=2-attn"].get_y() == 1.0 and patches["TP p=2-attn"].get_height() == 3.0  # KiB, stacked
    assert patches["TP+SP p=2-attn"].get_height() == 0.0  # a region not given draws nothing
    assert patches["TP p=2-formula"].get_y() == 7.0  # the tick at the formula's total
