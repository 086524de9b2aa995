"""Training under tensor parallelism follows the dense model: losses at every step, gradients of
every parameter, and the communication of a step, counted.

The TP ranks run as threads (`run_threads`): the same SPMD code as on real processes, in one
process, fast (the command-line test, test_cli.py, trains on real torchrun processes). Every rank
builds `TPGPT.from_dense` from the same dense initialization and draws the same batches.
Tolerances: `train.loss_tolerance` for the losses (chosen in chapter 9; measured here); for
gradients FLOAT32 / FLOAT64 from tp_helpers (the same sums in another order: float32 noise about
1e-7 relative, measured 4e-6 of a tensor's largest gradient at worst, float64 about 1e-15).
"""

import copy

import pytest
import torch

from tp_helpers import FLOAT32, FLOAT64
from tputil import train as tr
from tputil.comm import run_threads
from tputil.model import GPT, GPTConfig
from tputil.shard import shard_state_dict
from tputil.tp_model import TPGPT

TINY = dict(block_size=32, vocab_size=256, n_layer=2, n_head=4, n_embd=32)  # p in {1, 2, 4} divides n_head
RUN = dict(batch_size=4, lr=1e-3, seed=0)
STEPS = 50


def tiny_gpt(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**TINY)).to(dtype)


def tp_train(group, dense, steps, run):
    """One rank: its slice of the dense model, trained; losses, last step's grads and comm per step."""
    model = TPGPT.from_dense(dense, group=group)
    comm = []
    losses = tr.train(model, steps, **run, on_step=lambda step, loss, stats: comm.append(stats))
    grads = {name: p.grad for name, p in model.named_parameters(remove_duplicate=False)}  # lm_head too
    return dict(losses=losses, grads=grads, comm=comm)


def dense_train(dense, steps, run):
    model = copy.deepcopy(dense)
    losses = tr.train(model, steps, **run)
    return losses, {name: p.grad for name, p in model.named_parameters(remove_duplicate=False)}


# ------------------------------------------------------------------------------- the pieces


def test_the_corpus_is_generated_deterministically_and_is_bytes():
    text = tr.corpus()
    assert text == tr.corpus() and text != tr.corpus(seed=1)
    assert len(text) == 16384 and text.isascii()
    assert tr.decode(tr.encode(text)) == text
    assert int(tr.encode(text).max()) < 256


def test_the_batches_are_seeded_shifted_by_one_and_leave_the_global_rng_alone():
    data = tr.encode(tr.corpus())
    state = torch.get_rng_state()
    a, b = tr.batches(data, 4, 16, seed=3), tr.batches(data, 4, 16, seed=3)
    for _ in range(3):
        (xa, ya), (xb, yb) = next(a), next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == (4, 16) and torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(next(tr.batches(data, 4, 16, seed=4))[0], next(tr.batches(data, 4, 16, seed=3))[0])
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match=r"not more than block_size=16: use more data or a smaller block_size"):
        next(tr.batches(data[:16], 4, 16))


# ------------------------------------------------------------------------ TP follows dense


@pytest.fixture(scope="module")
def dense_run():
    return dense_train(tiny_gpt(), STEPS, RUN)


def test_the_dense_model_learns_the_corpus(dense_run):
    losses, _ = dense_run
    assert losses[0] > 5.0  # about ln(256) = 5.55 at init
    assert sum(losses[-5:]) / 5 < 3.7  # 50 steps in, it has picked up the corpus' letters


@pytest.mark.parametrize("p", [2, 4])
def test_tp_loss_matches_the_dense_loss_at_every_step(p, dense_run):
    dense_losses, _ = dense_run
    ranks = run_threads(tp_train, p, tiny_gpt(), STEPS, RUN)
    for r in ranks:
        assert r["losses"] == ranks[0]["losses"]  # every rank computes the same loss, bit for bit
    gaps = [abs(a - b) for a, b in zip(ranks[0]["losses"], dense_losses)]
    print(
        f"p={p}: max |TP - dense| loss over {STEPS} steps = {max(gaps):.2e} (step {gaps.index(max(gaps))}), "
        f"{dense_losses[0]:.3f} -> {dense_losses[-1]:.3f}"
    )
    for step, gap in enumerate(gaps):
        assert gap <= tr.loss_tolerance(torch.float32, step), (step, gap)


def test_float64_tp_loss_matches_to_1e_12():
    dense = tiny_gpt(torch.float64)
    dense_losses, _ = dense_train(dense, 20, RUN)
    tp_losses = run_threads(tp_train, 2, dense, 20, RUN)[0]["losses"]
    gaps = [abs(a - b) for a, b in zip(tp_losses, dense_losses)]
    assert max(gaps) <= tr.loss_tolerance(torch.float64, 20)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, FLOAT32), (torch.float64, FLOAT64)])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_every_gradient_is_the_dense_gradients_slice(p, dtype, tol):
    """After a step, rank r's grad of each parameter is the plan's slice of the dense grad (the whole
    grad, on every rank and bit for bit the same, for replicated parameters)."""
    dense = tiny_gpt(dtype)
    _, dense_grads = dense_train(dense, 1, RUN)
    ranks = run_threads(tp_train, p, dense, 1, RUN)
    for r, out in enumerate(ranks):
        expected = shard_state_dict(dense_grads, dense.config, r, p, plan=TPGPT.plan)
        assert out["grads"].keys() == expected.keys()
        for name, grad in out["grads"].items():
            torch.testing.assert_close(grad, expected[name], **tol, msg=lambda m: f"rank {r}, {name}: {m}")
            if expected[name].shape == dense_grads[name].shape:  # replicated: identical on every rank
                assert torch.equal(grad, ranks[0]["grads"][name]), (r, name)


def test_a_training_step_makes_4_all_reduces_per_layer_and_nothing_else():
    B, T, C, L = RUN["batch_size"], TINY["block_size"], TINY["n_embd"], TINY["n_layer"]
    ranks = run_threads(tp_train, 2, tiny_gpt(), 2, RUN)
    for out in ranks:
        for step in out["comm"]:
            assert dict(step.calls) == {"all_reduce": 4 * L}  # replicated embedding, head and loss: none
            assert dict(step.bytes) == {"all_reduce": 4 * L * B * T * C * 4}  # each B*T*C float32 numbers
            tags = [c.tag for c in step.log]
            assert tags.count("reduce_from_parallel_region.forward") == 2 * L  # g after each c_proj
            assert tags.count("copy_to_parallel_region.backward") == 2 * L  # f before c_attn and c_fc


class _ForgetsTheBackwardAllReduce:
    """A bug on purpose: f's backward returns this rank's partial gradient without summing it."""

    def __init__(self, group):
        self._group = group

    def __getattr__(self, name):
        return getattr(self._group, name)

    def all_reduce(self, t, **kwargs):
        return t if kwargs.get("tag") == "copy_to_parallel_region.backward" else self._group.all_reduce(t, **kwargs)


def _buggy_tp_train(group, dense, steps, run):
    return tr.train(TPGPT.from_dense(dense, group=_ForgetsTheBackwardAllReduce(group)), steps, **run)


def test_the_tolerance_catches_a_missing_backward_all_reduce(dense_run):
    """The negative control: with f's all-reduce left out, step 0 (same weights) still matches, and
    the very next step is far outside the tolerance."""
    dense_losses, _ = dense_run
    buggy = run_threads(_buggy_tp_train, 2, tiny_gpt(), 3, RUN)[0]
    assert abs(buggy[0] - dense_losses[0]) <= tr.loss_tolerance(torch.float32, 0)
    assert abs(buggy[1] - dense_losses[1]) > 20 * tr.loss_tolerance(torch.float32, 1)


def test_train_checks_its_arguments_and_restores_the_mode():
    model = tiny_gpt().eval()
    with pytest.raises(ValueError, match=r"steps=-1: it must be a non-negative integer"):
        tr.train(model, -1)
    assert tr.train(model, 0) == [] and not model.training
    with pytest.raises(ValueError, match=r"no stated tolerance for torch.bfloat16"):
        tr.loss_tolerance(torch.bfloat16, 0)
