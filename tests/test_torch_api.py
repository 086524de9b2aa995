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


def test_tally_counts_calls_by_block_and_outside():
    from tputil.course.ch15_sequence_parallel import tally

    records = [("all_reduce", 8), ("all_gather", 4), ("all_gather", 4), ("reduce_scatter", 16), ("all_reduce", 8)]
    spans = [(0, 1, 3), (1, 3, 4)]  # block 0 made calls 1 and 2, block 1 call 3
    assert tally(records, spans) == {
        "outside": {"all_reduce": (2, 16)},
        "block 0": {"all_gather": (2, 8)},
        "block 1": {"reduce_scatter": (1, 16)},
    }
    assert tally(records, spans, 3) == {"block 1": {"reduce_scatter": (1, 16)}, "outside": {"all_reduce": (1, 8)}}


@pytest.mark.slow
def test_side_by_side_on_two_gloo_ranks():
    """One start of two processes (a few seconds) for all of the checks below."""
    results = run_processes(ch15.side_by_side, 2, backend="gloo", timeout=120, echo=False)
    check_equal_to_ours_and_the_dense_model(results)
    check_collectives_by_kind_and_bytes(results)
    check_sequence_parallel_collectives_by_place(results)
    check_sequence_parallel_gradients_of_own_tokens(results)
    check_pitfalls_fail_and_their_fixes_hold(results)


def check_equal_to_ours_and_the_dense_model(side_by_side):
    for r in side_by_side:
        assert r["dtype"] == "torch.float64"
        for side in ("ours", "torch"):
            assert r[side]["logits"] < EXACT and r[side]["loss"] < EXACT and r[side]["grads"] < EXACT, side
        assert r["torch"]["tied"]
        sp = r["torch_sp"]  # SequenceParallel and PrepareModuleInput: the same numbers
        assert sp["logits"] < EXACT and sp["loss"] < EXACT and sp["grads"] < EXACT


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


def check_sequence_parallel_collectives_by_place(side_by_side):
    B, T, C, L, p = 2, 8, 32, 2, 2
    act, shard, tok = B * T * C * 8, B * T * C * 8 // p, B * T * 8  # bytes put in: (B, T, C), (B, T/p, C), (B, T)
    block_fwd = {"all_gather": (2, 2 * shard), "reduce_scatter": (2, 2 * act)}  # both sides: chapter 11's
    want = {
        "ours": dict(
            fwd={"outside": {"reduce_scatter": (1, act), "all_gather": (1, shard), "all_reduce": (3, 3 * tok)}},
            # the column-parallel layers gather their input again for the weight gradient
            bwd={"outside": {"all_gather": (2, 2 * shard), "reduce_scatter": (1, act)}},
            block_bwd={"all_gather": (4, 4 * shard), "reduce_scatter": (2, 2 * act)},
        ),
        "torch": dict(
            # the embedding all-reduced whole (the dense forward adds wpe over all T), h.0 takes its chunk
            fwd={"outside": {"all_reduce": (1 + 3, act + 3 * tok), "all_gather": (1, shard)}},
            bwd={"outside": {"all_gather": (1, shard), "reduce_scatter": (1, act)}},
            block_bwd={"all_gather": (2, 2 * shard), "reduce_scatter": (2, 2 * act)},
        ),
    }
    for r in side_by_side:
        for side, w in want.items():
            got = r["torch_sp"][side]
            assert got["fwd"] == {**w["fwd"], **{f"block {i}": block_fwd for i in range(L)}}, side
            assert got["bwd"] == {**w["bwd"], **{f"block {i}": w["block_bwd"] for i in range(L)}}, side
        ours, theirs = r["torch_sp"]["ours"]["saved"], r["torch_sp"]["torch"]["saved"]
        # PyTorch keeps the gathered input of q/k/v, c_fc and lm_head for backward, ours its own tokens
        assert theirs["attn"] - ours["attn"] == theirs["mlp"] - ours["mlp"] == L * (act - shard)
        assert theirs["lm_head"] - ours["lm_head"] == act - shard


def check_sequence_parallel_gradients_of_own_tokens(side_by_side):
    C, L, block_size = 32, 2, 8
    for r in side_by_side:
        own, steps = r["torch_sp"]["own_tokens"], r["torch_sp"]["steps"]
        # ours: norms, row-parallel biases and wpe hold partial sums until one flat all-reduce
        assert own["ours_numbers"] == block_size * C + L * 6 * C + 2 * C
        assert own["ours_sum"] == ({"all_reduce": 1}, {"all_reduce": own["ours_numbers"] * 8})
        assert own["ours_before"] > 1e-6 and own["ours_after"] < EXACT
        # PyTorch's: the norms' gradients are Partial DTensors, the others complete
        partial = sorted(n for n, pl in own["placements"].items() if pl.startswith("P"))
        assert partial == sorted(n for n in own["placements"] if ".ln_" in n) and len(partial) == 2 * (2 * L + 1)
        assert own["partial_numbers"] == (2 * L + 1) * 2 * C and own["local_vs_dense"] > 1e-6
        assert own["full_tensor"] == ({"all_reduce": len(partial)}, {"all_reduce": own["partial_numbers"] * 8})
        assert own["full_vs_dense"] < EXACT and own["still_partial"]
        assert all(".c_proj.bias" in n or n == "transformer.wpe.weight" for n in own["complete"])
        assert len(own["complete"]) == 2 * L + 1 and own["complete_vs_dense"] < EXACT
        # the optimizer sums them: SGD reads each gradient once, AdamW three times
        for name, reads in (("SGD", 1), ("AdamW", 3)):
            n = reads * len(partial)
            assert (steps[name]["calls"], steps[name]["bytes"]) == (
                {"all_reduce": n},
                {"all_reduce": reads * own["partial_numbers"] * 8},
            )
            assert steps[name]["same_as_after"] and steps[f"{name} after redistribute"]["calls"] == {}
        assert steps["redistribute"] == dict(
            calls={"all_reduce": len(partial)}, bytes={"all_reduce": own["partial_numbers"] * 8}
        )
        assert steps["SGD"]["diff"] < EXACT and steps["SGD on to_local()"]["diff"] > 1e-6
        one, after = steps["one all-reduce"], steps["SGD after one all-reduce"]  # as ours: one call, flattened
        assert (one["calls"], one["bytes"]) == ({"all_reduce": 1}, {"all_reduce": own["partial_numbers"] * 8})
        assert one["names"] == partial and after["calls"] == {} and after["diff"] < EXACT
        # AdamW's first step moves each weight by lr * g / (|g| + eps): a gradient's rounding times lr / eps
        assert steps["AdamW"]["diff"] <= 0.1 / 1e-8 * r["torch_sp"]["grads"] + EXACT


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


def sequence_parallel_model_on_tokens(group, T):
    """One rank: PyTorch's sequence-parallel model fed T tokens; the error it raises, or None."""
    from torch.distributed.device_mesh import init_device_mesh

    dense, x, _ = ch15.config_and_batch()
    mesh = init_device_mesh("cpu", (group.world_size,), mesh_dim_names=("tp",))
    model = btp.torch_tp_model(dense, mesh, vocab_parallel=True, sequence_parallel=True)
    try:
        model(x[:, :T])
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_torch_sequence_parallel_model_refuses_tokens_p_does_not_divide():
    """Every rank names T and p before the first all-gather (which would fail on one rank only)."""
    errors = run_processes(sequence_parallel_model_on_tokens, 2, 7, backend="gloo", timeout=120, echo=False)
    assert errors == ["T=7 is not divisible by p=2; p must divide T: try one of [1, 7]"] * 2
    assert run_processes(sequence_parallel_model_on_tokens, 2, 8, backend="gloo", timeout=120, echo=False) == [None] * 2


def test_torch_sequence_parallel_needs_the_vocabulary_parallel_plan():
    dense, _, _ = ch15.config_and_batch()
    with pytest.raises(ValueError, match="needs vocab_parallel=True"):
        btp.torch_tp_model(dense, mesh=_OneRankMesh(), vocab_parallel=False, sequence_parallel=True)


class _OneRankMesh:
    """Just enough of a DeviceMesh for the checks torch_tp_model makes before it parallelizes."""

    def size(self):
        return 1
