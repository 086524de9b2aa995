"""The table of chapter 7 (tputil.course.mistakes.CONTROLS): each mistake fails, its correct version, on
the same dense module and input, passes (tp_helpers explains the 1e-5 tolerance)."""

import pytest
import torch

from tp_helpers import FLOAT32
from tputil.course import mistakes


@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("control", mistakes.CONTROLS, ids=lambda c: c[2].__name__)
def test_each_mistake_fails_and_its_correct_version_passes(control, p, seed):
    chapter, what, wrong, right = control
    assert chapter in (3, 4, 5) and what
    assert wrong(p, seed) > 1e-2
    assert right(p, seed) < FLOAT32["atol"]


def test_the_correct_versions_split_nothing_at_p_1_and_leave_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    for _, _, _, right in mistakes.CONTROLS:
        assert right(1) < 1e-5  # rounding only (a bias after the matmul, not inside it)
    assert torch.equal(torch.rand(3), expected)
