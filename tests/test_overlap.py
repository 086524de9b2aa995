"""The overlapped forward equals the plain tensor-parallel model: logits, loss, every gradient.

On `run_threads` the all-reduces are synchronous, so these tests check the arithmetic: the chunked
streams, the causal attention over earlier chunks' keys, the fused column-parallel backward, the
counted collectives. The asynchronous path on real processes is checked by the benchmark's
correctness guard (tests/test_bench.py runs it). Tolerance: FLOAT32 (see tp_helpers), with one
chunk too: its products are the plain model's, but through matmuls of other shapes, which some
kernels (MKL_CBWR=COMPATIBLE) round differently.
"""

import pytest
import torch

from tp_helpers import FLOAT32, make_gpt
from tputil.comm import run_threads
from tputil.bench.overlap import overlapped_forward
from tputil.tp_model import TPGPT
from tputil.tp_model import VocabParallelTPGPT

B, T = 2, 16


def plain_and_overlapped(group, dense, cls, idx, targets, chunks):
    model = cls.from_dense(dense, group=group)
    logits, loss = model(idx, targets)
    loss.backward()
    plain = (logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    with group.stats.measure() as comm:
        logits, loss = overlapped_forward(model, idx, targets, chunks=chunks)
    loss.backward()
    overlapped = (logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return plain, overlapped, dict(comm.calls)


@pytest.mark.parametrize("cls", [TPGPT, VocabParallelTPGPT])
@pytest.mark.parametrize("p, chunks", [(2, 1), (2, 2), (2, 4), (3, 2), (4, 4)])
def test_overlapped_forward_equals_the_plain_model(cls, p, chunks):
    dense = make_gpt()  # n_head 12, every bias and norm random
    idx, targets = torch.randint(0, 64, (B, T)), torch.randint(0, 64, (B, T))
    for plain, overlapped, calls in run_threads(plain_and_overlapped, p, dense, cls, idx, targets, chunks):
        torch.testing.assert_close(overlapped[0], plain[0], **FLOAT32)
        torch.testing.assert_close(overlapped[1], plain[1], **FLOAT32)
        assert overlapped[2].keys() == plain[2].keys()
        for name in plain[2]:
            torch.testing.assert_close(overlapped[2][name], plain[2][name], **FLOAT32, msg=name)
        # per chunk: 2 all-reduces per layer (+1 for the vocab-parallel embedding); the loss's 3 once
        n_layer = dense.config.n_layer
        vocab = cls is VocabParallelTPGPT
        assert calls == {"all_reduce": chunks * (2 * n_layer + vocab) + 3 * vocab}


def test_overlapped_forward_needs_chunks_dividing_t():
    dense = make_gpt()
    idx = torch.randint(0, 64, (B, T))

    def run(group):
        return overlapped_forward(TPGPT.from_dense(dense, group=group), idx, chunks=3)

    with pytest.raises(Exception, match="divisible by chunks=3"):
        run_threads(run, 2)
