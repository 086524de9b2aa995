"""Sharding and gathering: exact round trips, the stride for fused q/k/v, the plan, the error messages."""

import pytest
import torch
from hypothesis import given, strategies as st

from tp_helpers import PROPERTY, make_gpt
from tputil.model import GPTConfig
from tputil.shard import (
    GPT_TP_PLAN,
    Replicate,
    Shard,
    check_shard_state_dict,
    dense_shapes,
    divide,
    gather_state_dict,
    gather_tensors,
    placement,
    shard_shapes,
    shard_state_dict,
    shard_tensor,
    valid_degrees,
)


def test_divide_and_its_message():
    assert divide(12, 4, "n_head") == 3
    with pytest.raises(
        ValueError,
        match=r"^n_head=6 is not divisible by p=4; p must divide n_head: "
        r"try one of \[1, 2, 3, 6\]$",
    ):
        divide(6, 4, "n_head")
    with pytest.raises(ValueError, match=r"p=0: the parallel degree must be a positive integer"):
        divide(6, 0)


def test_valid_degrees_are_the_divisors_of_n_head():
    assert valid_degrees(GPTConfig(n_head=12, n_embd=48)) == [1, 2, 3, 4, 6, 12]
    assert valid_degrees(GPTConfig(n_head=12, n_embd=48), max_p=4) == [1, 2, 3, 4]


def test_shard_tensor_by_hand():
    t = torch.arange(12).view(6, 2)  # rows 0..5
    assert torch.equal(shard_tensor(t, 1, 2, dim=0), t[3:6])
    assert torch.equal(shard_tensor(t, 0, 2, dim=1), t[:, :1])
    # stride 3: sections (rows 0-1 | 2-3 | 4-5) like q | k | v; rank 1 of 2 takes the 2nd row of each
    assert torch.equal(shard_tensor(t, 1, 2, dim=0, stride=3), t[[1, 3, 5]])


def test_strided_shards_differ_from_contiguous_chunks():
    """The negative control of chapter 5: a contiguous chunk of c_attn is not a rank's q, k and v."""
    w = torch.randn(3 * 8, 8)
    assert not torch.equal(shard_tensor(w, 0, 2, dim=0, stride=3), shard_tensor(w, 0, 2, dim=0))
    q, k, v = w.split(8)
    assert torch.equal(shard_tensor(w, 0, 2, dim=0, stride=3), torch.cat([q[:4], k[:4], v[:4]]))


@PROPERTY
@given(
    p=st.integers(1, 4),
    stride=st.integers(1, 3),
    per=st.integers(1, 3),
    other=st.integers(1, 4),
    dim=st.sampled_from([0, 1, -1]),
    seed=st.integers(0, 999),
)
def test_shard_then_gather_is_bitwise_exact(p, stride, per, other, dim, seed):
    shape = [other, other]
    shape[dim] = p * stride * per
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    shards = [shard_tensor(t, r, p, dim, stride) for r in range(p)]
    assert all(s.shape[dim] == stride * per for s in shards)
    assert torch.equal(gather_tensors(shards, dim, stride), t)


def test_shard_tensor_errors():
    t = torch.zeros(10, 4)
    with pytest.raises(
        ValueError,
        match=r"cannot shard dim 0 \(size 10\) of a tensor of shape \(10, 4\) into "
        r"p=4 shards with stride 1: 10 is not divisible by stride \* p = 4",
    ):
        shard_tensor(t, 0, 4, dim=0)
    with pytest.raises(ValueError, match=r"rank=2 is not in range\(world_size=2\)"):
        shard_tensor(t, 2, 2, dim=0)
    with pytest.raises(ValueError, match=r"shard 1 has shape \(2, 3\).*shard 0 has \(2, 4\)"):
        gather_tensors([torch.zeros(2, 4), torch.zeros(2, 3)], dim=0)


def test_the_plan_places_every_parameter():
    assert placement("transformer.h.3.attn.c_attn.weight") == Shard(0, stride=3)
    assert placement("transformer.h.0.attn.c_proj.weight") == Shard(1)
    assert placement("transformer.h.0.attn.c_proj.bias") == Replicate()
    assert placement("transformer.h.0.mlp.c_fc.bias") == Shard(0)
    assert placement("transformer.h.11.ln_2.bias") == Replicate()
    assert placement("lm_head.weight") == Replicate()
    with pytest.raises(KeyError, match=r"no entry in the plan matches parameter 'transformer.h.0.mlp.gate.weight'"):
        placement("transformer.h.0.mlp.gate.weight")


@pytest.mark.parametrize("p", [1, 2, 3, 4, 6])
def test_state_dict_round_trip_is_bitwise_exact(p):
    dense = make_gpt()
    sd = dense.state_dict()
    shards = [shard_state_dict(sd, dense.config, r, p) for r in range(p)]
    expected = shard_shapes(dense.config, p)
    for shard in shards:
        assert list(shard) == list(sd)
        assert {k: v.shape for k, v in shard.items()} == expected
    c_attn = "transformer.h.0.attn.c_attn.weight"
    assert shards[0][c_attn].shape == (3 * 48 // p, 48)
    gathered = gather_state_dict(shards, dense.config)
    assert list(gathered) == list(sd)
    for name in sd:
        assert torch.equal(gathered[name], sd[name]), name


def test_shards_are_new_tensors():
    dense = make_gpt()
    shard = shard_state_dict(dense.state_dict(), dense.config, 0, 2)
    shard["transformer.wpe.weight"].zero_()
    assert dense.transformer.wpe.weight.abs().sum() > 0


def test_wrong_degree_is_rejected():
    config = GPTConfig(n_head=6, n_embd=48)
    sd = make_gpt(n_head=6).state_dict()
    with pytest.raises(
        ValueError, match=r"n_head=6 is not divisible by p=4; p must divide n_head: try one of \[1, 2, 3, 6\]"
    ):
        shard_state_dict(sd, config, 0, 4)
    shards = [shard_state_dict(sd, config, r, 2) for r in range(2)]
    with pytest.raises(ValueError, match=r"gather_state_dict got 4 shards: n_head=6 is not divisible by p=4"):
        gather_state_dict(shards * 2, config)


def test_wrong_count_of_shards_is_rejected_naming_the_parameter():
    dense = make_gpt()
    shards = [shard_state_dict(dense.state_dict(), dense.config, r, 2) for r in range(2)]
    with pytest.raises(
        ValueError,
        match=r"rank 0: transformer.h.0.attn.c_attn.weight: expected shape \(36, 48\) "
        r"for a shard at p=4, got \(72, 48\)",
    ):
        gather_state_dict(shards + shards, dense.config)  # four shards made for p=2


def test_wrong_shard_shape_is_rejected_naming_the_parameter():
    dense = make_gpt()
    shards = [shard_state_dict(dense.state_dict(), dense.config, r, 2) for r in range(2)]
    shards[1]["transformer.h.2.mlp.c_proj.weight"] = torch.zeros(48, 192)  # the dense shape, not a shard
    with pytest.raises(
        ValueError,
        match=r"rank 1: transformer.h.2.mlp.c_proj.weight: expected shape \(48, 96\) "
        r"for a shard at p=2, got \(48, 192\)",
    ):
        gather_state_dict(shards, dense.config)


def test_missing_and_unexpected_keys_are_named():
    dense = make_gpt()
    shard = shard_state_dict(dense.state_dict(), dense.config, 0, 2)
    del shard["transformer.ln_f.bias"]
    shard["transformer.h.0.attn.bias"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing \['transformer.ln_f.bias'\], unexpected \['transformer.h.0.attn.bias'\]"
    ):
        check_shard_state_dict(shard, dense.config, 2)


def test_replicas_that_drifted_apart_are_reported():
    dense = make_gpt()
    shards = [shard_state_dict(dense.state_dict(), dense.config, r, 2) for r in range(2)]
    shards[1]["transformer.h.1.ln_1.weight"][0] += 1e-3
    with pytest.raises(
        ValueError, match=r"replicated parameter transformer.h.1.ln_1.weight differs between rank 0 and rank 1"
    ):
        gather_state_dict(shards, dense.config)
    gather_state_dict(shards, dense.config, check_replicas=False)  # rank 0's copy is taken


def test_plan_covers_every_dense_parameter():
    for name in make_gpt(n_layer=2).state_dict():
        placement(name, GPT_TP_PLAN)


@pytest.mark.parametrize("bias", [True, False])
def test_dense_shapes_are_the_models_state_dict_shapes(bias):
    model = make_gpt(n_layer=2, bias=bias)
    assert dense_shapes(model.config) == {k: v.shape for k, v in model.state_dict().items()}
    assert list(dense_shapes(model.config)) == list(model.state_dict())
