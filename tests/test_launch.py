"""Real processes: the same layer code on torch.distributed (gloo), and a failing rank.

Spawning costs seconds (each child imports torch), so the file spawns three times: one run checks the
collectives of DistGroup and the TP GPT against the dense model, one that ranks finishing in reverse
order come back in rank order, one a rank that raises.
The rank functions live at module level so that the spawned children can import them.
"""

import time

import pytest
import torch

from tp_helpers import FLOAT32, assert_no_close_calls, make_gpt
from tputil.comm import RankError
from tputil.launch import default_backend, run_processes
from tputil.model import GPT
from tputil.tp_model import TPGPT


def tp_gpt_on_real_ranks(group, config, state_dict, idx, targets):
    """One rank: DistGroup's four collectives, then the TP GPT's forward, backward and generation."""
    x = torch.arange(6.0).view(2, 3) + 10 * group.rank
    collectives = dict(
        all_reduce=group.all_reduce(x),
        all_gather=group.all_gather(x, dim=0),
        reduce_scatter=group.reduce_scatter(torch.arange(4.0) * (group.rank + 1), dim=0),
        broadcast=group.broadcast(x, src=1),
        input_untouched=torch.equal(x, torch.arange(6.0).view(2, 3) + 10 * group.rank),
    )
    dense = GPT(config)
    dense.load_state_dict(state_dict)
    model = TPGPT.from_dense(dense.eval(), group=group)
    with group.stats.measure() as fwd:
        logits, loss = model(idx, targets)
    loss.backward()
    return dict(
        rank=group.rank,
        world_size=group.world_size,
        backend=group.backend,
        collectives=collectives,
        logits=logits,
        loss=loss,
        calls=dict(fwd.calls),
        bytes=dict(fwd.bytes),
        c_fc_grad=model.transformer.h[0].mlp.c_fc.weight.grad,
        generated=model.generate(idx[:, :4], 12),
    )


def fail_on_rank_1(group):
    if group.rank == 1:
        raise ValueError("rank one fails on purpose")
    group.all_reduce(torch.ones(1))  # rank 0 waits here for rank 1, until it is stopped


def finish_in_reverse_rank_order(group, step):
    """After a barrier, rank r sleeps (p - 1 - r) * step seconds: rank 0 returns last. Returns (rank, when)."""
    group.all_reduce(torch.ones(1))  # the ranks leave together
    time.sleep((group.world_size - 1 - group.rank) * step)
    return group.rank, time.time()


def test_default_backend_on_this_machine():
    assert default_backend(2) == ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "gloo")


@pytest.mark.slow
def test_tp_gpt_on_two_real_processes_matches_dense():
    dense = make_gpt()
    idx, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    logits, loss = dense(idx, targets)
    loss.backward()
    results = run_processes(
        tp_gpt_on_real_ranks, 2, dense.config, dense.state_dict(), idx, targets, backend="gloo", timeout=120.0
    )
    x = [torch.arange(6.0).view(2, 3) + 10 * r for r in range(2)]
    for r, out in enumerate(results):
        assert (out["rank"], out["world_size"], out["backend"]) == (r, 2, "gloo")
        c = out["collectives"]
        assert torch.equal(c["all_reduce"], x[0] + x[1])
        assert torch.equal(c["all_gather"], torch.cat(x, dim=0))
        assert torch.equal(c["reduce_scatter"], (torch.arange(4.0) * 3).chunk(2)[r])
        assert torch.equal(c["broadcast"], x[1])
        assert c["input_untouched"]
        torch.testing.assert_close(out["logits"], logits, **FLOAT32)
        torch.testing.assert_close(out["loss"], loss, **FLOAT32)
        assert out["calls"] == {"all_reduce": 2 * 4}  # two per layer, nothing else
        assert out["bytes"] == {"all_reduce": 2 * 4 * 2 * 16 * 48 * 4}
        torch.testing.assert_close(out["c_fc_grad"], dense.transformer.h[0].mlp.c_fc.weight.grad.chunk(2)[r], **FLOAT32)
        expected = dense.generate(idx[:, :4], 12)
        assert_no_close_calls(dense, expected, 4)  # so no summation order can change a token
        assert torch.equal(out["generated"], expected)


@pytest.mark.slow
def test_results_come_in_rank_order_when_rank_0_returns_last():
    results = run_processes(finish_in_reverse_rank_order, 3, 1.0, backend="gloo", timeout=120.0)
    assert [rank for rank, _ in results] == [0, 1, 2]
    returned = [when for _, when in results]
    assert returned[0] > returned[1] > returned[2]  # they did finish in reverse order


@pytest.mark.slow
def test_a_failing_rank_is_named_and_no_process_is_left_behind(no_leftovers):
    start = time.monotonic()
    with pytest.raises(RankError, match=r"rank 1 of 2 failed:\n(.|\n)*ValueError: rank one fails on purpose") as info:
        run_processes(fail_on_rank_1, 2, backend="gloo", timeout=120.0)
    assert info.value.rank == 1
    assert time.monotonic() - start < 60.0  # rank 0 was stopped, not waited for
    # no_leftovers: no process is left behind (tests/test_launch_faults.py checks every failure mode for this)


def test_a_function_the_children_cannot_import_is_refused_up_front():
    with pytest.raises(ValueError, match=r"needs a function the child processes can import.*define it at module level"):
        run_processes(lambda group: group.rank, 2)
