"""Dropout under tensor parallelism (chapter 12): per-rank random state, and the dense model replaying the masks.

Ranks are threads (`run_threads`): they share torch's global generator, so the model must draw
from its `RNGTracker`'s own generators. The TP model, trained with dropout on, must equal the
dense model run with the masks the ranks drew, assembled into full-shape masks (float64, 1e-12:
the same arithmetic in another order). Two mistakes fail: one seed everywhere (rank 1's heads
repeat rank 0's masks) and per-rank seeds in a replicated region (the residual streams part).
"""

import math

import pytest
import torch
import torch.nn as nn

from tp_helpers import FLOAT64
from tputil.comm import RankError, SingleGroup, run_threads
from tputil.model import GPTConfig, untrained_gpt
from tputil.rng import (
    PARALLEL_SEED_OFFSET,
    Dropout,
    RNGTracker,
    assemble_masks,
    dropout_sites,
    mask_correlation,
    recording,
    replaying,
    use_rng,
)
from tputil.shard import shard_state_dict
from tputil.tp_model import TPGPT

CONFIG = dict(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, dropout=0.1)
B, T = 3, 10  # T = 10: padded to 12 by sequence parallelism at p = 4


def make_dense(dropout=0.1):
    return untrained_gpt(GPTConfig(**{**CONFIG, "dropout": dropout}), seed=0).to(torch.float64)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (B, T), generator=g), torch.randint(0, 64, (B, T), generator=g)


def tp_step(dense, p, *, sequence_parallel=False, tracker=None, vocab_parallel=False):
    """On p thread ranks: one training forward and backward, recording the masks; per rank a dict."""
    idx, targets = batch()

    def fn(group):
        options = dict(sequence_parallel=sequence_parallel, vocab_parallel=vocab_parallel, rng_seed=7)
        model = TPGPT.from_dense(dense, group=group, **options).train()
        if tracker is not None:
            use_rng(model, tracker(group.rank))
        streams = []
        model.transformer.ln_f.register_forward_hook(lambda m, args, out: streams.append(args[0].detach()))
        with recording(model) as masks:
            logits, loss = model(idx, targets)
        loss.backward()
        if sequence_parallel:
            model.all_reduce_sequence_parallel_grads()
        return dict(
            logits=model.gather_logits(logits).detach(),
            plan=model.plan,
            loss=loss.detach(),
            grads={n: q.grad for n, q in model.named_parameters()},
            masks=masks,
            regions={n: s.region for n, s in dropout_sites(model).items()},
            stream=streams[0],  # the residual stream entering ln_f
        )

    return run_threads(fn, p)


def dense_step(dense, masks):
    """The dense model, one training forward and backward with the given masks: (logits, loss, grads)."""
    idx, targets = batch()
    dense.train().zero_grad(set_to_none=True)
    with replaying(dense, masks):
        logits, loss = dense(idx, targets)
    loss.backward()
    dense.eval()
    return logits.detach(), loss.detach(), {n: q.grad for n, q in dense.named_parameters()}


@pytest.mark.parametrize("vocab_parallel", [False, True], ids=["replicated-head", "vocab-parallel"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_the_dense_model_with_the_ranks_masks_equals_the_tp_model(p, sequence_parallel, vocab_parallel):
    dense = make_dense()
    ranks = tp_step(dense, p, sequence_parallel=sequence_parallel, vocab_parallel=vocab_parallel)
    masks = assemble_masks([r["masks"] for r in ranks], ranks[0]["regions"], seq_len=T)
    assert len(masks) == 1 + 3 * CONFIG["n_layer"]  # drop; attn_dropout, resid_dropout, mlp.dropout per layer
    attn = masks["transformer.h.0.attn.attn_dropout"][0]
    assert attn.shape == (B, CONFIG["n_head"], T, T)
    assert masks["transformer.h.1.mlp.dropout"][0].shape == (B, T, CONFIG["n_embd"])
    assert 0.8 < attn.double().mean() < 1.0  # p = 0.1: about 90% kept (n = 1200, std 0.009)
    logits, loss, grads = dense_step(dense, masks)
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["logits"], logits, **FLOAT64)
        torch.testing.assert_close(r["loss"], loss, **FLOAT64)
        expected = shard_state_dict(grads, dense.config, rank, p, plan=r["plan"])
        assert set(r["grads"]) == set(expected)
        for n, g in r["grads"].items():
            torch.testing.assert_close(g, expected[n], **FLOAT64, msg=lambda m: f"rank {rank} {n}: {m}")
    # dropout is on: without the masks (eval mode) the dense loss is another number
    with torch.no_grad():
        assert abs(dense.eval()(*batch())[1] - loss) > 1e-3


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "tp+sp"])
def test_regions_replicated_sites_agree_and_parallel_ones_do_not(sequence_parallel):
    ranks = tp_step(make_dense(), 2, sequence_parallel=sequence_parallel)
    regions = ranks[0]["regions"]
    for name, region in regions.items():
        expected = "tensor" if name.endswith("attn_dropout") else ("sequence" if sequence_parallel else "replicated")
        assert region == expected, name
        m0, m1 = ranks[0]["masks"][name][0], ranks[1]["masks"][name][0]
        assert torch.equal(m0, m1) == (region == "replicated"), name


def test_one_seed_everywhere_repeats_the_masks_across_ranks_heads():
    dense = make_dense()
    name = "transformer.h.0.attn.attn_dropout"
    right = tp_step(dense, 2)
    wrong = tp_step(dense, 2, tracker=lambda rank: RNGTracker(7, rank=0))  # every rank's parallel state alike
    a, b = (r["masks"][name][0] for r in wrong)
    assert mask_correlation(a, b) == 1.0  # rank 1's heads drop exactly what rank 0's drop
    a, b = (r["masks"][name][0] for r in right)
    n = a.numel()  # B * nh/p * T * T = 600: independent masks correlate by about normal(0, 1/n)
    assert abs(mask_correlation(a, b)) < 5 / math.sqrt(n)


def test_per_rank_seeds_in_a_replicated_region_part_the_residual_streams():
    dense = make_dense()
    ranks = tp_step(dense, 2, tracker=lambda rank: RNGTracker(7 + rank, rank=rank))  # replicated state per rank
    assert not torch.equal(ranks[0]["masks"]["transformer.drop"][0], ranks[1]["masks"]["transformer.drop"][0])
    gap = (ranks[0]["stream"] - ranks[1]["stream"]).abs().max()
    assert gap > 1e-2  # replicated activations that should be equal to the last bit
    with pytest.raises(ValueError, match="transformer.drop .call 0. is a replicated site, but the ranks drew"):
        assemble_masks([r["masks"] for r in ranks], ranks[0]["regions"])
    right = tp_step(dense, 2)
    assert torch.equal(right[0]["stream"], right[1]["stream"])  # rank-order sums: the same bits on every rank


def test_the_tracker_seeds_as_megatron_and_leaves_the_global_generator_alone():
    trackers = [RNGTracker(5, rank=r) for r in range(2)]
    assert trackers[1].seeds == {"replicated": 5, "parallel": 5 + PARALLEL_SEED_OFFSET + 1}
    torch.manual_seed(0)
    before = torch.get_rng_state()
    draws = [torch.rand(4, generator=t.generator("tensor")) for t in trackers]
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(draws[0], draws[1])
    assert torch.equal(draws[1], torch.rand(4, generator=torch.Generator().manual_seed(5 + 2718 + 1)))
    # "sequence" shares the parallel state; the generator continues until manual_seed starts it again
    assert trackers[0].generator("sequence") is trackers[0].generator("tensor")
    trackers[0].manual_seed(5)
    assert torch.equal(torch.rand(4, generator=trackers[0].generator("tensor")), draws[0])


def test_fork_restores_the_global_generator_and_advances_the_region():
    tracker = RNGTracker(3, rank=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("tensor"):
        inside = torch.rand(5)  # the global generator continues the parallel state
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork("tensor"):
        second = torch.rand(5)
    reference = torch.Generator().manual_seed(3 + PARALLEL_SEED_OFFSET + 1)
    assert torch.equal(inside, torch.rand(5, generator=reference))
    assert torch.equal(second, torch.rand(5, generator=reference))  # it went on, not back to the start
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(KeyError), tracker.fork("replicated"):
        torch.rand(1)
        raise KeyError("inside the fork")
    assert torch.equal(torch.get_rng_state(), before)  # restored on an error too


def test_fork_refuses_ranks_as_threads_sharing_the_global_generator():
    def fn(group):
        tracker = RNGTracker(0, rank=group.rank)
        with tracker.fork("tensor"):
            group.all_reduce(torch.ones(1))  # both ranks inside a fork at once
        return True

    with pytest.raises(RankError) as info:
        run_threads(fn, 2, timeout=5.0)
    assert "another fork is open in this process" in str(info.value.__cause__)


def test_an_untouched_dropout_is_nn_dropout():
    x = torch.randn(4, 6)
    torch.manual_seed(3)
    ours = Dropout(0.3).train()(x)
    torch.manual_seed(3)
    assert torch.equal(ours, nn.Dropout(0.3).train()(x))
    assert torch.equal(Dropout(0.3).eval()(x), x)


def test_a_dense_model_records_and_replays_its_own_masks():
    dense = make_dense()
    idx, targets = batch()
    dense.train()
    use_rng(dense, RNGTracker(0, rank=0))
    with recording(dense) as masks:
        first = dense(idx, targets)[1]
    again = dense_step(dense, masks)[1]
    assert torch.equal(first.detach(), again)
    use_rng(dense, None)
    assert dense.rng is None and all(s.rng is None for s in dropout_sites(dense).values())


def test_eval_mode_and_zero_dropout_draw_nothing():
    dense = make_dense(dropout=0.0)

    def fn(group):
        model = TPGPT.from_dense(dense, group=group).train()
        with recording(model) as masks:
            model(batch()[0])
        return model.rng.generator("replicated").get_state(), masks

    state, masks = run_threads(fn, 2)[0]
    assert torch.equal(state, torch.Generator().manual_seed(0).get_state())
    assert all(len(m) == 1 and m[0].all() for m in masks.values())  # p = 0: every element kept
    model = TPGPT.from_dense(make_dense(), group=SingleGroup()).eval()
    with recording(model) as masks:
        model(batch()[0])
    assert all(m == [] for m in masks.values())


def test_bad_input_names_what_to_change():
    with pytest.raises(ValueError, match=r"dropout p=1.0: it must be in \[0, 1\)"):
        Dropout(1.0)
    with pytest.raises(ValueError, match="region='heads': a dropout site is one of"):
        Dropout(0.1, region="heads")
    with pytest.raises(ValueError, match="region='heads'"):
        RNGTracker(0, rank=0).generator("heads")
    with pytest.raises(ValueError, match="rank=-1"):
        RNGTracker(0, rank=-1)
    with pytest.raises(ValueError, match="seed=1.5"):
        RNGTracker(1.5, rank=0)
    dense = make_dense()
    site = Dropout(0.1).train()
    site.replay = [torch.ones(2, 3, dtype=torch.bool)]
    with pytest.raises(ValueError, match=r"a replayed mask of shape \(2, 3\).*input of shape \(3, 3\)"):
        site(torch.ones(3, 3))
    site.replay = []
    with pytest.raises(RuntimeError, match="ran out of masks"):
        site(torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"none for \['transformer.drop'"):
        with replaying(dense, {}):
            pass
    masks = {name: [] for name in dropout_sites(dense)}
    masks["transformer.drop"] = [torch.ones(B, T, 32, dtype=torch.bool)]
    with pytest.raises(RuntimeError, match="masks left unused after replaying"):
        with replaying(dense, masks):
            pass
    with pytest.raises(ValueError, match="need the same number"):
        mask_correlation(torch.ones(3), torch.ones(4))
