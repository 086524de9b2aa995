"""Tests for tputil.course.lists: collectives on per-device lists of tensors (chapters 1 and 2)."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from tputil.course import lists

# --- all_reduce: the law ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    p=st.integers(min_value=1, max_value=8),
    shape=st.lists(st.integers(min_value=1, max_value=5), min_size=0, max_size=3),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_all_reduce_every_device_gets_the_sum(p, shape, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g) for _ in range(p)]
    out = lists.all_reduce(xs)
    assert len(out) == p
    for r in range(p):
        # Bitwise the same tensor on every device...
        assert torch.equal(out[r], out[0])
        assert out[r].shape == torch.Size(shape) and out[r].dtype == xs[0].dtype
    # ...and it is the sum. stack().sum() may add in another order: float32 tolerance.
    torch.testing.assert_close(out[0], torch.stack(xs).sum(0))


@given(p=st.integers(min_value=1, max_value=8), seed=st.integers(min_value=0, max_value=10_000))
def test_all_reduce_is_exact_on_whole_numbers(p, seed):
    # Small whole numbers add exactly in float32, in any order: equality, not closeness.
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randint(-100, 101, (3, 4), generator=g).float() for _ in range(p)]
    out = lists.all_reduce(xs)
    assert all(torch.equal(o, torch.stack(xs).sum(0)) for o in out)


def test_all_reduce_sums_in_rank_order():
    # float32 near 1e8 is spaced 8 apart, so 1e8 + 1 rounds to 1e8: the order shows.
    s = [torch.tensor(1e8), torch.tensor(1.0), torch.tensor(-1e8)]
    assert ((s[0] + s[1]) + s[2]).item() == 0.0
    assert ((s[2] + s[0]) + s[1]).item() == 1.0
    out = lists.all_reduce(s)
    assert [o.item() for o in out] == [0.0, 0.0, 0.0]


def test_all_reduce_toy_from_chapter_1():
    x1, x2, x3, x4 = (
        torch.tensor([1.0, 2.0]),
        torch.tensor([3.0, 4.0]),
        torch.tensor([5.0, 6.0]),
        torch.tensor([7.0, 8.0]),
    )
    out = lists.all_reduce([x1 + x2, x3 + x4])
    assert len(out) == 2
    assert all(torch.equal(o, torch.tensor([16.0, 20.0])) for o in out)


def test_all_reduce_returns_independent_copies_and_leaves_inputs_alone():
    xs = [torch.ones(3), 2 * torch.ones(3)]
    before = [x.clone() for x in xs]
    out = lists.all_reduce(xs)
    assert all(torch.equal(x, b) for x, b in zip(xs, before))
    assert len({o.data_ptr() for o in out}) == len(out)  # one buffer per device
    assert all(o.data_ptr() != x.data_ptr() for o in out for x in xs)
    out[0].add_(100.0)  # a device changes its copy...
    assert torch.equal(out[1], 3 * torch.ones(3))  # ...the others do not see it
    assert torch.equal(xs[0], torch.ones(3))


def test_all_reduce_one_device_is_a_copy():
    x = torch.arange(6.0).reshape(2, 3)
    (out,) = lists.all_reduce([x])
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


def test_all_reduce_accepts_a_tuple_and_keeps_dtype():
    xs = (torch.tensor([1, 2]), torch.tensor([3, 4]))
    out = lists.all_reduce(xs)
    assert isinstance(out, list) and out[0].dtype == torch.int64
    assert torch.equal(out[1], torch.tensor([4, 6]))


# --- all_reduce: the errors say what to change ---------------------------------------------


def test_error_on_empty_list():
    with pytest.raises(ValueError, match=r"empty list: pass one tensor per device"):
        lists.all_reduce([])


def test_error_on_a_single_tensor():
    with pytest.raises(TypeError, match=r"got a single Tensor of shape \(2, 3\); wrap"):
        lists.all_reduce(torch.zeros(2, 3))


def test_error_on_something_that_is_not_a_list():
    with pytest.raises(TypeError, match=r"got generator; pass a list"):
        lists.all_reduce(torch.zeros(2) for _ in range(2))


def test_error_on_a_non_tensor_entry():
    with pytest.raises(TypeError, match=r"device 1 holds a float, not a Tensor"):
        lists.all_reduce([torch.zeros(()), 1.0])


def test_error_on_mismatched_shapes_names_the_device_and_the_fix():
    xs = [torch.zeros(2), torch.zeros(2), torch.zeros(3, 2)]
    with pytest.raises(ValueError) as info:
        lists.all_reduce(xs)
    message = str(info.value)
    assert "same shape on every device" in message
    assert "device 0 holds (2,)" in message and "device 2 holds (3, 2)" in message
    assert "make every device's tensor (2,)" in message


def test_error_on_mismatched_dtypes():
    with pytest.raises(
        ValueError,
        match=r"device 1 holds torch.float64; convert with "
        r"\.to\(torch.float32\)",
    ):
        lists.all_reduce([torch.zeros(2), torch.zeros(2, dtype=torch.float64)])


# --- chapter 2: all_gather, reduce_scatter, broadcast --------------------------------------


def _whole(p, shape, seed):
    # Small whole numbers add exactly in float32, in any order: equality, not closeness.
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-50, 51, shape, generator=g).float() for _ in range(p)]


def _cut_dim(p, shape, data):
    """A dim drawn from shape's dims, and shape with that dim made p times longer (divisible by p)."""
    dim = data.draw(st.integers(min_value=-len(shape), max_value=len(shape) - 1))
    shape = list(shape)
    shape[dim] *= p
    return dim, shape


def test_the_docstring_examples():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    assert all(torch.equal(o, torch.tensor([1.0, 2.0, 3.0, 4.0])) for o in lists.all_gather([a, b]))
    rs = lists.reduce_scatter([a, b])
    assert torch.equal(rs[0], torch.tensor([4.0])) and torch.equal(rs[1], torch.tensor([6.0]))
    bc = lists.broadcast([a, torch.zeros(2)], src=0)
    assert all(torch.equal(o, a) for o in bc)


@settings(max_examples=60, deadline=None)
@given(
    p=st.integers(min_value=1, max_value=6),
    shape=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3),
    data=st.data(),
)
def test_all_gather_concatenates_in_rank_order(p, shape, data):
    dim = data.draw(st.integers(min_value=-len(shape), max_value=len(shape) - 1))
    xs = _whole(p, shape, data.draw(st.integers(0, 10_000)))
    out = lists.all_gather(xs, dim=dim)
    assert len(out) == p
    expected = torch.cat(xs, dim=dim)
    assert out[0].shape[dim % len(shape)] == p * shape[dim % len(shape)]
    assert all(torch.equal(o, expected) for o in out)
    # device r's own tensor sits at slot r along dim
    for r in range(p):
        assert torch.equal(out[0].chunk(p, dim=dim)[r], xs[r])


@settings(max_examples=60, deadline=None)
@given(
    p=st.integers(min_value=1, max_value=6),
    shape=st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=3),
    data=st.data(),
)
def test_reduce_scatter_gives_device_r_chunk_r_of_the_sum(p, shape, data):
    dim, shape = _cut_dim(p, shape, data)
    xs = _whole(p, shape, data.draw(st.integers(0, 10_000)))
    out = lists.reduce_scatter(xs, dim=dim)
    total = torch.stack(xs).sum(0)
    assert len(out) == p
    for r in range(p):
        assert torch.equal(out[r], total.chunk(p, dim=dim)[r])
        assert out[r].is_contiguous()


@settings(max_examples=60, deadline=None)
@given(
    p=st.integers(min_value=1, max_value=6),
    shape=st.lists(st.integers(min_value=1, max_value=4), min_size=0, max_size=3),
    data=st.data(),
)
def test_broadcast_copies_the_source_to_every_device(p, shape, data):
    src = data.draw(st.integers(min_value=0, max_value=p - 1))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    xs = [torch.randn(shape, generator=g) for _ in range(p)]
    out = lists.broadcast(xs, src=src)
    assert len(out) == p and all(torch.equal(o, xs[src]) for o in out)


@settings(max_examples=80, deadline=None)
@given(
    p=st.integers(min_value=1, max_value=8),
    shape=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=3),
    data=st.data(),
)
def test_reduce_scatter_then_all_gather_is_all_reduce(p, shape, data):
    # The law behind the ring all-reduce (chapter 2): bit for bit, on random float32 data,
    # because both sum in rank order and the all-gather only moves the chunks.
    dim, shape = _cut_dim(p, shape, data)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    xs = [torch.randn(shape, generator=g) for _ in range(p)]
    chunks = lists.reduce_scatter(xs, dim=dim)
    assert all(c.shape[dim] == shape[dim] // p for c in chunks)
    out = lists.all_gather(chunks, dim=dim)
    expected = lists.all_reduce(xs)
    assert len(out) == p
    assert all(torch.equal(o, e) for o, e in zip(out, expected))


def test_new_collectives_return_independent_copies_and_leave_inputs_alone():
    xs = [torch.arange(4.0), 10 + torch.arange(4.0)]
    before = [x.clone() for x in xs]
    for out in (lists.all_gather(xs), lists.reduce_scatter(xs), lists.broadcast(xs, src=1)):
        assert all(torch.equal(x, b) for x, b in zip(xs, before))
        assert len({o.data_ptr() for o in out}) == len(out)
        assert all(o.data_ptr() != x.data_ptr() for o in out for x in xs)
    out = lists.broadcast(xs, src=1)
    out[0].add_(1.0)
    assert torch.equal(out[1], xs[1]) and torch.equal(xs[1], before[1])


def test_one_device_is_a_copy_for_every_collective():
    x = torch.arange(6.0).reshape(2, 3)
    for out in (lists.all_gather([x]), lists.reduce_scatter([x]), lists.broadcast([x])):
        assert len(out) == 1 and torch.equal(out[0], x) and out[0].data_ptr() != x.data_ptr()


def test_new_collectives_share_the_input_checks():
    for op in (lists.all_gather, lists.reduce_scatter, lists.broadcast):
        name = op.__name__
        with pytest.raises(ValueError, match=rf"{name} got an empty list"):
            op([])
        with pytest.raises(TypeError, match=rf"{name} takes a list with one tensor per device"):
            op(torch.zeros(2, 2))
        with pytest.raises(ValueError, match=rf"{name} needs the same shape on every device"):
            op([torch.zeros(2), torch.zeros(4)])


def test_reduce_scatter_error_says_which_degrees_divide():
    xs = [torch.zeros(2, 6)] * 4
    with pytest.raises(
        ValueError,
        match=r"dim 1 \(size 6\) of shape \(2, 6\) into p=4 equal chunks, "
        r"but 6 is not divisible by 4; use a number of devices in "
        r"\[1, 2, 3, 6\] or pad dim 1 to a multiple of 4",
    ):
        lists.reduce_scatter(xs)


def test_gather_and_scatter_need_a_dimension_in_range():
    for op in (lists.all_gather, lists.reduce_scatter):
        with pytest.raises(ValueError, match=r"0-d tensors \(scalars\); give them a dimension"):
            op([torch.tensor(1.0), torch.tensor(2.0)])
        with pytest.raises(
            ValueError,
            match=r"dim=2 is out of range for tensors of shape \(2, 3\); "
            r"use a dim in \[-2, 1\]",
        ):
            op([torch.zeros(2, 3)] * 2, dim=2)


def test_broadcast_rejects_a_source_that_is_not_a_device():
    for src in (2, -1, True, 0.0):
        with pytest.raises(ValueError, match=r"is not a device of this list; use a rank in range\(2\)"):
            lists.broadcast([torch.zeros(1), torch.zeros(1)], src=src)


def test_the_list_collectives_work_under_autograd():
    """Rank-order sums are out of place, so autograd can record them (any number of devices)."""
    xs = [torch.full((4,), float(r + 1), requires_grad=True) for r in range(3)]
    total = lists.all_reduce(xs)[0]
    total.sum().backward()
    assert torch.equal(total.detach(), torch.full((4,), 6.0))
    assert all(torch.equal(x.grad, torch.ones(4)) for x in xs)
