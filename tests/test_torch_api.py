"""Chapter 15: PyTorch's own tensor parallelism (DTensor, parallelize_module) beside ours, on real gloo ranks."""

import pytest
import torch

from tputil.bench import torch_tp as btp
from tputil.course import ch15_torch_api as ch15
from tputil.launch import run_processes

EXACT = 1e-12  # float64: both sides sum in another order than the dense model, nothing more


def test_split_qkv_gradients_map_back_to_the_dense_names():
    dense, x, y = ch15.config_and_batch(0)
    _, want_loss, want = ch15.dense_grads(dense, x, y)
    split = btp.split_qkv(dense)
    assert next(split.transformer.h[0].attn.q_proj.parameters()).dtype == torch.float64
    _, loss = split(x, y)
    loss.backward()
    got = ch15.torch_grads_as_dense(split)
    assert got.keys() == want.keys()  # c_attn rebuilt from q, k, v; lm_head tied to wte, as in the dense model
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < EXACT
    assert abs(float(loss.detach() - want_loss)) < EXACT


def test_two_d_step_refuses_a_world_that_is_not_2_x_2():
    class Group:
        world_size = 2

    with pytest.raises(ValueError, match=r"4 ranks.*run_processes\(two_d_step, 4\)"):
        ch15.two_d_step(Group())


@pytest.mark.slow
def test_side_by_side_on_two_gloo_ranks():
    """One start of two processes (a few seconds) for all of the checks below."""
    results = run_processes(ch15.side_by_side, 2, backend="gloo", timeout=120, echo=False)
    check_equal_to_ours_and_the_dense_model(results)
    check_collectives_by_kind_and_bytes(results)
    check_pitfalls_fail_and_their_fixes_hold(results)


def check_equal_to_ours_and_the_dense_model(side_by_side):
    for r in side_by_side:
        assert r["dtype"] == "torch.float64"
        for side in ("ours", "torch"):
            assert r[side]["logits"] < EXACT and r[side]["loss"] < EXACT and r[side]["grads"] < EXACT, side
        assert r["torch"]["tied"]
        sp = r["torch_sp"]  # SequenceParallel and PrepareModuleInput: the same numbers
        assert sp["logits"] < EXACT and sp["loss"] < EXACT and sp["grads"] < EXACT
        assert "reduce_scatter" in sp["fwd_kinds"] and "all_gather" in sp["fwd_kinds"]


def check_collectives_by_kind_and_bytes(side_by_side):
    B, T, C, layers = 2, 8, 32, 2
    act = B * T * C * 8  # one (B, T, C) float64 activation
    tok = B * T * 8  # one float64 number a token
    for r in side_by_side:
        ours, theirs = r["ours"], r["torch"]
        # forward: 2 all-reduces a layer, 1 after the embedding, 3 in the vocabulary-parallel loss (max, sum, target)
        want_fwd = ({"all_reduce": 2 * layers + 1 + 3}, {"all_reduce": (2 * layers + 1) * act + 3 * tok})
        assert ours["fwd"] == want_fwd and theirs["fwd"] == want_fwd
        assert theirs["debug_fwd"] == {"c10d_functional.all_reduce": 8}  # PyTorch's CommDebugMode agrees
        # backward: ours all-reduces dL/dx once in front of c_attn and of c_fc, and once for lm_head;
        # PyTorch's q, k and v each make their own DTensor of the input: one all-reduce each
        assert ours["bwd"] == ({"all_reduce": 2 * layers + 1}, {"all_reduce": (2 * layers + 1) * act})
        assert theirs["bwd"] == ({"all_reduce": 4 * layers + 1}, {"all_reduce": (4 * layers + 1) * act})
        assert theirs["debug_bwd"] == {"c10d_functional.all_reduce": 4 * layers + 1}


def check_pitfalls_fail_and_their_fixes_hold(side_by_side):
    for rank, r in enumerate(side_by_side):
        pit = r["pitfalls"]
        assert pit["fused_c_attn"] > 1e-2  # silently wrong logits; split q, k, v (side by side above) is exact
        u = pit["untied"]
        assert not u["same_tensor"] and u["wte_grad"] > 1e-2 and u["head_grad"] > 1e-2
        assert u["summed"] < EXACT  # the two copies each hold a part of the tied gradient
        un = pit["uneven"]
        assert un["full"] == 5 and un["local_rows"] == (3, 2)[rank]  # DTensor: torch.chunk's uneven rows
        assert "rows=5 is not divisible by p=2" in un["ours"] and "n_head=3" in un["heads"]
        m = pit["meshes"]
        assert m["unnamed"] == dict(
            equals_plain=True, own_group=True, result_mesh_is_plain=True, result_group_is_pg=False
        )
        assert m["named"] == dict(
            equals_plain=False, own_group=True, result_mesh_is_plain=False, result_group_is_pg=True
        )


@pytest.mark.slow
def test_two_d_mesh_step_equals_the_dense_gradients_on_the_whole_batch():
    results = run_processes(ch15.two_d_step, 4, backend="gloo", timeout=120, echo=False)
    assert sorted((r["dp"], r["tp"]) for r in results) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in results:
        assert r["grads"] < EXACT and r["loss"] < EXACT
