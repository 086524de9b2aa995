"""tputil.course.compare: the per-rank traffic of tensor, data and pipeline parallelism, checked against
the counter of real runs (TP and DP on run_threads), against the GPT's own parameter count, and
against chapter 2's ring formula."""

import copy

import pytest
import torch
from hypothesis import given, strategies as st

from tp_helpers import DEGREES, PROPERTY, SMALL, make_gpt
from tputil.comm import run_threads
from tputil.course import compare, cost
from tputil.model import GPT, GPTConfig
from tputil.tp_model import TPGPT

B, T = 4, 8


@pytest.mark.parametrize(
    "overrides", [{}, {"bias": False}, {"n_layer": 1, "n_embd": 24, "n_head": 2}, {"vocab_size": 50, "block_size": 7}]
)
def test_parameter_count_matches_the_model(overrides):
    config = GPTConfig(**{**SMALL, **overrides})
    torch.manual_seed(0)
    model = GPT(config)
    assert compare.gpt_num_params(config) == model.num_params(non_embedding=False)
    block = model.transformer.h[0]
    assert sum(compare.layer_params(config).values()) == sum(q.numel() for q in block.parameters())


@pytest.mark.parametrize("p", DEGREES)
def test_tensor_parallel_matches_the_counter_and_the_model(p):
    dense = make_gpt()
    idx, targets = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))

    def fn(group):
        model = TPGPT.from_dense(dense, group=group)
        with group.stats.measure() as fwd:
            _, loss = model(idx, targets)
        with group.stats.measure() as step:
            _, loss = model(idx, targets)
            loss.backward()
        return fwd, step, sum(q.numel() for q in model.parameters())

    tp = compare.tensor_parallel(dense.config, B=B, T=T, p=p)
    for fwd, step, n_params in run_threads(fn, p):
        assert tp.forward_calls == fwd.total_calls == fwd.calls["all_reduce"]
        assert tp.forward_message * 4 == fwd.total_bytes
        assert tp.step_calls == step.total_calls
        assert tp.step_message * 4 == step.total_bytes
        assert tp.forward_wire * 4 == cost.ring_bytes("all_reduce", fwd.total_bytes, p)
        assert tp.step_wire * 4 == cost.ring_bytes("all_reduce", step.total_bytes, p)
        assert tp.params_per_rank == n_params  # the tied wte/lm_head once, like model.parameters()
    assert tp.forward_calls == (0 if p == 1 else 2 * dense.config.n_layer)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_data_parallel_matches_a_measured_gradient_all_reduce(p):
    dense = make_gpt()
    idx, targets = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))
    _, loss = dense(idx, targets)
    full = torch.autograd.grad(loss, list(dense.parameters()))
    full = torch.cat([g.reshape(-1) for g in full])

    def fn(group):  # one replica: its B/p sequences, then one all-reduce of every gradient
        rows = slice(group.rank * B // p, (group.rank + 1) * B // p)
        _, loss = dense(idx[rows], targets[rows])
        grads = torch.autograd.grad(loss, list(dense.parameters()))
        with group.stats.measure() as m:
            flat = group.all_reduce(torch.cat([g.reshape(-1) for g in grads])) / p
        return flat, m

    dp = compare.data_parallel(dense.config, B=B, T=T, p=p)
    for flat, m in run_threads(fn, p):
        torch.testing.assert_close(flat, full, rtol=1e-5, atol=1e-6)  # the mean of the means = the mean
        assert m.total_calls == dp.step_calls and m.total_bytes == dp.step_message * 4
    assert dp.step_message == (0 if p == 1 else compare.gpt_num_params(dense.config))
    assert dp.forward_calls == dp.forward_message == 0


def test_pipeline_by_hand():
    config = GPTConfig(block_size=16, vocab_size=100, n_layer=4, n_head=2, n_embd=8)
    n = 4 * 16 * 8  # B*T*C
    two = compare.pipeline_parallel(config, B=4, T=16, p=2, micro_batches=2)
    # each of the 2 stages sends B*T*C once per step (stage 0 forward, stage 1 backward) in 2
    # micro-batch messages, and both sum their copy of wte's gradient (V*C numbers, 2 ranks: V*C on the wire)
    assert (two.forward_calls, two.forward_message, two.forward_wire) == (2, n, n)
    assert (two.step_calls, two.step_message, two.step_wire) == (3, n + 800, n + 800)
    assert two.idle_fraction == pytest.approx(1 / 3)
    four = compare.pipeline_parallel(config, B=4, T=16, p=4, micro_batches=4)
    assert four.step_wire == max(2 * n, n + 800)  # a middle stage, or the first/last one
    per_layer = sum(compare.layer_params(config).values())
    assert four.params_per_rank == per_layer + 100 * 8 + 16 * 8  # one block + wte + wpe on stage 0
    one = compare.pipeline_parallel(config, B=4, T=16, p=1, micro_batches=4)
    assert one.step_wire == 0 and one.params_per_rank == compare.gpt_num_params(config)


def test_degrees_that_do_not_divide_are_rejected():
    config = GPTConfig(**SMALL)  # 12 heads, 4 layers
    with pytest.raises(ValueError, match="n_head=12 is not divisible by p=5"):
        compare.tensor_parallel(config, B=4, T=8, p=5)
    with pytest.raises(ValueError, match="n_layer"):
        compare.pipeline_parallel(config, B=4, T=8, p=3, micro_batches=2)
    with pytest.raises(ValueError, match="B=4 is not divisible by p=3"):
        compare.data_parallel(config, B=4, T=8, p=3)
    with pytest.raises(ValueError, match="micro_batches=3 must be a positive integer dividing B=4"):
        compare.pipeline_parallel(config, B=4, T=8, p=2, micro_batches=3)


@PROPERTY
@given(p=st.sampled_from([1, 2, 3, 4, 6]), B=st.integers(1, 4), T=st.integers(1, 64), n_layer=st.integers(1, 6))
def test_laws(p, B, T, n_layer):
    config = GPTConfig(**{**SMALL, "n_layer": n_layer})
    tp = compare.tensor_parallel(config, B=B, T=T, p=p)
    n = B * T * config.n_embd
    assert tp.step_message == 2 * tp.forward_message == (0 if p == 1 else 4 * n_layer * n)
    assert tp.forward_wire <= 2 * tp.forward_message  # a ring sends under two copies
    dp = compare.data_parallel(config, B=B * p, T=T, p=p)
    assert dp.step_wire == cost.ring_bytes("all_reduce", compare.gpt_num_params(config), p)
    assert tp.params_per_rank <= dp.params_per_rank
    fs = compare.fully_sharded(config, B=B * p, T=T, p=p)
    padded = fs.params_per_rank * p  # N rounded up to a multiple of p
    assert padded - p < compare.gpt_num_params(config) <= padded
    assert fs.step_wire == 3 * (p - 1) / p * padded  # two all-gathers and a reduce-scatter
    assert fs.step_wire == pytest.approx(1.5 * dp.step_wire * padded / compare.gpt_num_params(config))
    assert fs.training_state_per_rank == 4 * fs.params_per_rank
    # the rows of compare() are the four functions' results
    rows = compare.compare(config, B=B * p, T=T, p=p if n_layer % p == 0 else 1, micro_batches=B * p)
    assert [r.scheme for r in rows] == ["tensor", "data", "pipeline", "sharded"]


def _fsdp_step(group, dense, idx, targets):
    """ZeRO-3 on B/p sequences per rank: a flat shard of the parameters, gathered for the forward and again
    for the backward, the gradients reduce-scattered; returns (this rank's gradient shard, the counts)."""
    p, r = group.world_size, group.rank
    params = list(dense.parameters())
    flat = torch.cat([q.detach().reshape(-1) for q in params])
    shard = -(-flat.numel() // p)
    mine = torch.nn.functional.pad(flat, (0, shard * p - flat.numel())).chunk(p)[r].clone()

    def gathered():
        full = group.all_gather(mine, dim=0)[: flat.numel()]
        return [w.view_as(q) for w, q in zip(full.split([q.numel() for q in params]), params)]

    rows = slice(r * idx.size(0) // p, (r + 1) * idx.size(0) // p)
    with group.stats.measure() as m:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.cat([w.reshape(-1) for w in gathered()]), params)
        _, loss = dense(idx[rows], targets[rows])  # forward on the gathered weights
        weights = gathered()  # freed after the forward in real FSDP: gathered again for the backward
        assert all(torch.equal(w, q) for w, q in zip(weights, params))
        grads = torch.autograd.grad(loss, params)
        flat_grad = torch.nn.functional.pad(torch.cat([g.reshape(-1) for g in grads]), (0, shard * p - flat.numel()))
        grad_shard = group.reduce_scatter(flat_grad, dim=0) / p
    return grad_shard, m


@pytest.mark.parametrize("p", [2, 4])
def test_fully_sharded_traffic_is_what_a_zero3_step_sends(p):
    config = GPTConfig(**SMALL)
    Bp = 4
    dense = make_gpt()
    idx = torch.randint(config.vocab_size, (Bp, T), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(config.vocab_size, (Bp, T), generator=torch.Generator().manual_seed(2))
    _, loss = dense(idx, targets)
    full = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(dense.parameters()))])
    expect = compare.fully_sharded(config, B=Bp, T=T, p=p)
    full = torch.nn.functional.pad(full, (0, expect.params_per_rank * p - full.numel()))
    for r, (grad_shard, m) in enumerate(run_threads(lambda g: _fsdp_step(g, copy.deepcopy(dense), idx, targets), p)):
        torch.testing.assert_close(grad_shard, full.chunk(p)[r], rtol=1e-5, atol=1e-6)  # the whole batch's
        assert m.total_calls == expect.step_calls
        assert m.total_bytes // 4 == expect.step_message
        wire = sum(cost.ring_bytes(rec.kind, rec.nbytes, p) for rec in m.log) / 4
        assert wire == expect.step_wire
