"""Tests for tputil.course.mistakes: every negative control must fail the check that the correct version passes.

One section per chapter; append yours below the last one, under its own marker. (Chapters 4 and 5
keep theirs in test_mistakes_mlp_attention.py.)
"""

import pytest
import torch

from tp_helpers import FLOAT32
from tputil.comm import run_threads
from tputil.course import mistakes
from tputil.layers import RowParallelLinear
from tputil.shard import shard_tensor

# --- chapter 3: parallel linear layers -------------------------------------------------------


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_row_parallel_bias_on_every_rank_is_off_by_p_minus_1_times_b(p):
    err = mistakes.row_parallel_bias_on_every_rank(p=p, seed=0)
    linear, _ = mistakes._linear_and_input(0)
    expected = (p - 1) * linear.bias.abs().max().item()
    assert err > 1e-2  # far beyond float32 rounding...
    assert err == pytest.approx(expected, rel=1e-5, abs=1e-5)  # ...and exactly the extra biases


def test_row_parallel_bias_mistake_is_harmless_on_one_rank():
    # rounding only: the bias is added to the matmul's result here, inside it (addmm) in nn.Linear
    assert mistakes.row_parallel_bias_on_every_rank(p=1, seed=0) < 1e-5


@pytest.mark.parametrize("p", [2, 4])
def test_the_correct_row_parallel_layer_passes_the_same_check(p):
    # The control is only a control if the right layer, built from the same dense one, passes.
    linear, x = mistakes._linear_and_input(0)

    def rank(group):
        layer = RowParallelLinear.from_dense(linear, group=group)
        return layer(shard_tensor(x, group.rank, p, dim=-1))

    with torch.no_grad():
        y = linear(x)
        for out in run_threads(rank, p):
            torch.testing.assert_close(out, y, **FLOAT32)


def test_row_parallel_bias_mistake_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mistakes.row_parallel_bias_on_every_rank(p=2, seed=7)
    assert torch.equal(torch.rand(3), expected)
