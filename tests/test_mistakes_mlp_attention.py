"""The negative controls of chapters 4 and 5: each mistake fails the check the correct version passes.

A check that cannot fail is no check. `tputil.course.mistakes` builds the wrong variants (c_fc split by
rows, so GELU sees partial sums; c_attn's fused q/k/v weight cut into contiguous chunks); here they
must miss the dense result by far more than float32 rounding, while the package's tensor-parallel
MLP and attention, built from the same dense module, stay within 1e-5 of it (tp_helpers explains
the tolerance).
"""

import pytest
import torch

from tp_helpers import FLOAT32
from tputil.comm import run_threads
from tputil.course import mistakes
from tputil.model import MLP, CausalSelfAttention, GPTConfig
from tputil.tp_model import TPMLP, TPCausalSelfAttention

LARGE = 1e-2  # a real mistake moves outputs of order 1 by more than this; rounding moves them ~1e-7


def dense_and_input(make, config, seed):
    torch.manual_seed(seed)
    return make(config), torch.randn(2, 8, config.n_embd)


def correct_error(tp_cls, make, config, p, seed):
    """Largest |TP - dense| over ranks for the package's correct TP module."""
    dense, x = dense_and_input(make, config, seed)
    with torch.no_grad():
        y = dense(x)
        outs = run_threads(lambda g: tp_cls.from_dense(dense, group=g)(x), p)
    return max((out - y).abs().max().item() for out in outs)


@pytest.mark.parametrize("p", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_splitting_c_fc_by_rows_applies_gelu_to_partial_sums(p, seed):
    assert mistakes.mlp_split_before_gelu(p, seed) > LARGE
    assert correct_error(TPMLP, MLP, GPTConfig(n_embd=48, n_head=1), p, seed) < FLOAT32["atol"]


@pytest.mark.parametrize("p", [2, 3, 6])
@pytest.mark.parametrize("seed", [0, 1])
def test_contiguous_chunks_of_the_fused_qkv_weight_mix_q_k_and_v(p, seed):
    assert mistakes.attention_contiguous_qkv_split(p, seed) > LARGE
    config = GPTConfig(n_embd=48, n_head=6)
    assert correct_error(TPCausalSelfAttention, CausalSelfAttention, config, p, seed) < FLOAT32["atol"]


def test_one_rank_splits_nothing_so_there_is_no_mistake():
    # Not bit for bit: c_proj's bias comes after its matmul here and inside it (addmm) in the dense
    # layer, which rounds differently under some kernels (MKL_CBWR=COMPATIBLE): rounding only.
    assert mistakes.mlp_split_before_gelu(1) < FLOAT32["atol"]
    assert mistakes.attention_contiguous_qkv_split(1) < FLOAT32["atol"]


def test_the_mistakes_are_deterministic_and_leave_the_global_rng_alone():
    torch.manual_seed(0)
    first = (mistakes.mlp_split_before_gelu(2, seed=3), mistakes.attention_contiguous_qkv_split(2, seed=3))
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))
    assert first == (mistakes.mlp_split_before_gelu(2, seed=3), mistakes.attention_contiguous_qkv_split(2, seed=3))


def test_the_mistakes_reject_a_degree_that_does_not_divide():
    with pytest.raises(Exception, match="not divisible"):
        mistakes.attention_contiguous_qkv_split(4)  # n_head = 6


@pytest.mark.parametrize("p", [1, 2, 4])
def test_from_dense_builds_tp_modules_that_match_the_dense_ones(p):
    """TPMLP.from_dense and TPCausalSelfAttention.from_dense (added for chapters 4 and 5)."""
    config = GPTConfig(n_embd=48, n_head=4)
    for tp_cls, make in [(TPMLP, MLP), (TPCausalSelfAttention, CausalSelfAttention)]:
        dense, x = dense_and_input(make, config, seed=5)
        state = torch.get_rng_state()

        def build_and_run(group):
            module = tp_cls.from_dense(dense, group=group)
            return module, module(x)

        results = run_threads(build_and_run, p)
        assert torch.equal(torch.get_rng_state(), state)  # built without drawing random numbers
        n_dense = sum(t.numel() for t in dense.parameters())
        n_bias = config.n_embd  # c_proj's bias, replicated on every rank
        for module, out in results:
            torch.testing.assert_close(out, dense(x), **FLOAT32)
            assert sum(t.numel() for t in module.parameters()) == (n_dense - n_bias) // p + n_bias
