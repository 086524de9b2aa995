"""Smoke tests for tputil.viz.vocab: the vocabulary split figure of chapter 10, drawn from the package's split."""

import pytest
from matplotlib.figure import Figure

from tputil.shard import pad_vocab_size, vocab_range
from tputil.viz import vocab as viz_vocab


def _gids(fig):
    return [patch.get_gid() for ax in fig.axes for patch in ax.patches if patch.get_gid()]


def test_layout_by_hand():
    # 67 at p = 3: padded to 69, 23 ids each, the last rank's two last ids are padding
    assert [(r.start, r.end, r.real_end) for r in viz_vocab.vocab_layout(67, 3)] == [
        (0, 23, 23),
        (23, 46, 46),
        (46, 69, 67),
    ]
    # 5 at p = 4: padded to 8; rank 2 owns one token and one padding id, rank 3 only padding
    layout = viz_vocab.vocab_layout(5, 4)
    assert [(r.n_real, r.n_padding) for r in layout] == [(2, 0), (2, 0), (1, 1), (0, 2)]
    # Megatron's rule: 50257 at p = 2 pads to 50432 = 2 * 128 * 197
    assert [r.n_padding for r in viz_vocab.vocab_layout(50257, 2, multiple=128)] == [0, 175]


@pytest.mark.parametrize("vocab, p, multiple", [(67, 4, 1), (64, 3, 1), (5, 4, 1), (50257, 8, 128)])
def test_layout_is_the_models_split(vocab, p, multiple):
    padded = pad_vocab_size(vocab, p, multiple=multiple)
    layout = viz_vocab.vocab_layout(vocab, p, multiple=multiple)
    assert [(r.start, r.end) for r in layout] == [vocab_range(padded, r, p) for r in range(p)]
    assert sum(r.n_real for r in layout) == vocab and sum(r.n_padding for r in layout) == padded - vocab


def test_one_patch_per_rank_and_one_per_rank_with_padding():
    fig = viz_vocab.draw_vocab_split(67, [1, 2, 3, 4], title="t")
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    gids = _gids(fig)
    assert sorted(g for g in gids if "-device" in g) == sorted(
        f"p{p}-device{r}" for p in (1, 2, 3, 4) for r in range(p)
    )
    assert sorted(g for g in gids if "-padding" in g) == ["p2-padding1", "p3-padding2", "p4-padding3"]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert "p = 3\nV_pad = 69" in texts and "2 padding ids" in texts and "no padding" in texts
    fig.canvas.draw()


def test_a_rank_of_padding_only_and_bad_input():
    gids = _gids(viz_vocab.draw_vocab_split(5, [4]))
    assert sorted(g for g in gids if "-padding" in g) == ["p4-padding2", "p4-padding3"]
    with pytest.raises(ValueError, match="at least one degree"):
        viz_vocab.draw_vocab_split(67, [])
    with pytest.raises(ValueError, match=r"pad_vocab_size: p=0"):
        viz_vocab.vocab_layout(67, 0)
