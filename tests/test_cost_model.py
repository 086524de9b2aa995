"""The cost model (chapter 14) against what the package's real tensors and collectives measure.

Run and counted here, on `run_threads` ranks: TP and TP+SP (the package has both), their memory
per rank (parameters, gradients, AdamW's moments, the saved activations as chapter 11 measures
them, the KV cache) and every collective of a training step by kind and bytes, at p = 2 and 4.
Derived only (the package does not run them): DP, FSDP and PP, checked against their definitions
in `course.compare`. The FLOPs against PyTorch's own counter on the dense model.
"""

from collections import Counter

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tputil.comm import run_threads
from tputil.course import activations, compare, cost_model
from tputil.course.cost_model import DEVICES, LINKS, Precision
from tputil.model import GPTConfig, KVCache, untrained_gpt
from tputil.tp_model import VocabParallelTPGPT

CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
B, T = 2, 8
FLOAT64 = Precision("float64", 8, 8, 8, 16)
PRECISION = {torch.float32: "float32", torch.float64: FLOAT64}


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure_rank(group, dense, idx, scheme, T):
    """One training step of a VocabParallelTPGPT rank: bytes held and collectives made, per phase."""
    model = VocabParallelTPGPT.from_dense(dense, group=group, sequence_parallel=scheme == "TP+SP")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    phases = {}
    with group.stats.measure() as m:
        _, loss = model(idx, idx)
    phases["forward"] = m
    with group.stats.measure() as m:
        loss.backward()
    phases["backward"] = m
    with group.stats.measure() as m:
        if scheme == "TP+SP":
            model.all_reduce_sequence_parallel_grads()
    phases["grad_sync"] = m
    opt.step()
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    saved = activations.saved_bytes(model, lambda: model(idx, idx))
    return {
        "params": nbytes(model.parameters()),
        "grads": nbytes(q.grad for q in model.parameters()),
        "optimizer": nbytes(moments),
        "saved": saved,
        "steps": [s["step"] for s in opt.state.values()],
        "calls": {ph: (Counter(m.calls), Counter(m.bytes)) for ph, m in phases.items()},
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["TP", "TP+SP"])
@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("T", [8, 5])
def test_memory_and_collectives_match_a_real_step(p, scheme, dtype, T):
    dense = untrained_gpt(CONFIG).to(dtype)
    idx = torch.randint(0, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    ranks = run_threads(measure_rank, p, dense, idx, scheme, T)
    prec = PRECISION[dtype]
    mem = cost_model.memory(CONFIG, scheme, B=B, T=T, p=p, precision=prec)
    calls = cost_model.step_collectives(CONFIG, scheme, B=B, T=T, p=p, precision=prec)
    for r in ranks:
        assert r["params"] == mem["params"] and r["grads"] == mem["grads"]
        assert r["optimizer"] == mem["optimizer"]  # AdamW's two moments
        assert all(s.numel() == 1 for s in r["steps"])  # plus one scalar step count per tensor, left out
        blocks = sum(r["saved"][k] for k in activations.BLOCK_REGIONS)
        top = sum(r["saved"][k] for k in activations.TOP_REGIONS)
        per_layer = activations.layer_bytes(
            CONFIG, B, T, p, sequence_parallel=scheme == "TP+SP", element_size=dtype.itemsize
        )
        assert blocks == CONFIG.n_layer * sum(per_layer.values())  # the blocks: exactly
        head = mem["activations"] - blocks
        # outside the blocks the model leaves out a few numbers a token: ids, targets, positions, masks, the
        # loss's per-token statistics; at most 3 int64 and 4 of the precision's numbers a (padded) token
        Tp = activations.padded_length(T, p, scheme == "TP+SP")
        assert 0 <= top - head <= (24 + 4 * dtype.itemsize) * B * Tp
        for phase, expected in calls.items():
            want_calls = Counter(k for k, _ in expected)
            want_bytes = Counter()
            for k, n in expected:
                want_bytes[k] += n
            assert r["calls"][phase] == (want_calls, want_bytes), phase


@pytest.mark.parametrize("p", [1, 2, 4])
def test_kv_cache_bytes_match_the_package_cache(p):
    dense = untrained_gpt(CONFIG)
    idx = torch.randint(0, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))

    def fill(group):
        model = VocabParallelTPGPT.from_dense(dense, group=group)
        cache = KVCache(CONFIG.n_layer)
        with torch.no_grad():
            model(idx, kv_cache=cache)
        return cache.nbytes()

    mem = cost_model.memory(CONFIG, "TP", B=B, T=T, p=p, kv_cache=True)
    assert run_threads(fill, p) == [mem["kv_cache"]] * p


def test_flops_match_pytorchs_counter():
    """A training step's matrix FLOPs: PyTorch's FlopCounterMode on the dense model, forward and backward."""
    dense = untrained_gpt(CONFIG)
    idx = torch.randint(0, CONFIG.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        _, loss = dense(idx, idx)
        loss.backward()
    assert counter.get_total_flops() == cost_model.flops_per_step(CONFIG, B=B, T=T)


def test_derived_schemes_follow_their_definitions():
    """DP, FSDP and PP are derived, not run: their numbers are compare's, in bytes."""
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=4, n_head=4, n_embd=32)
    N, p, prec = compare.gpt_num_params(config), 4, "float32"
    dp = cost_model.step_collectives(config, "DP", B=8, T=8, p=p, precision=prec)
    assert dp["grad_sync"] == [("all_reduce", compare.data_parallel(config, B=8, T=8, p=p).step_message * 4)]
    fsdp = cost_model.step_collectives(config, "FSDP", B=8, T=8, p=p, precision=prec)
    flat = compare.fully_sharded(config, B=8, T=8, p=p)
    sent = sum(n for calls in fsdp.values() for _, n in calls)
    layer = sum(compare.layer_params(config).values())
    assert layer % p == 0 and (N - config.n_layer * layer) % p == 0  # then units and one flat tensor agree
    assert sent == flat.step_message * 4 and len(fsdp["forward"]) == config.n_layer + 1
    mem = cost_model.memory(config, "FSDP", B=8, T=8, p=p)
    assert mem["params"] == flat.params_per_rank * 4 and mem["optimizer"] == 2 * mem["params"]
    pp = cost_model.memory(config, "PP", B=8, T=8, p=p)
    assert pp["params"] == compare.pipeline_parallel(config, B=8, T=8, p=p, micro_batches=8).params_per_rank * 4
    dp_mem = cost_model.memory(config, "DP", B=8, T=8, p=p)
    tp1 = cost_model.memory(config, "TP", B=2, T=8, p=1)
    assert dp_mem == tp1  # DP at B/p per rank is one device on B/p (every parameter replicated)
    mixed = cost_model.memory(config, "DP", B=8, T=8, p=p, precision="bf16 mixed")
    assert sum(mixed[k] for k in ("params", "grads", "optimizer")) == 16 * N  # 16 bytes a parameter


def test_times_and_binding():
    gpt2 = GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
    h100, nvl, pcie = DEVICES["H100 SXM 80GB"], LINKS["NVLink 4"], LINKS["PCIe 5.0 x16"]
    kw = dict(B=8, T=1024, precision="bf16 mixed", device=h100)
    one = cost_model.step_time(gpt2, "TP", p=1, link=nvl, **kw)
    assert one["communication"] == 0 and one["compute"] == cost_model.flops_per_step(gpt2, B=8, T=1024) / 989e12
    nv, pc = (cost_model.step_time(gpt2, "TP", p=4, link=k, **kw) for k in (nvl, pcie))
    assert nv["compute"] == pc["compute"] == one["compute"] / 4 and pc["communication"] > nv["communication"]
    compute, comm = cost_model.tp_layer_times(gpt2, p=2, link=nvl, **kw)
    assert compute > 0 and comm > 0
    pp = cost_model.step_time(gpt2, "PP", p=4, link=nvl, **kw)
    assert pp["bubble"] == pytest.approx(pp["compute"] * 3 / 8)
    mem = cost_model.memory(gpt2, "DP", B=8, T=1024, p=1)
    assert cost_model.binding(mem, one, h100) == ("memory" if sum(mem.values()) > 80e9 else "compute")


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="n_head"):
        cost_model.memory(GPTConfig(n_head=25, n_embd=1600), "TP", B=8, T=8, p=8)
    with pytest.raises(ValueError, match="unknown scheme"):
        cost_model.memory(CONFIG, "ZeRO", B=8, T=8, p=2)
    with pytest.raises(ValueError, match="unknown precision"):
        cost_model.memory(CONFIG, "DP", B=8, T=8, p=2, precision="fp8")
    with pytest.raises(ValueError, match="B"):
        cost_model.memory(CONFIG, "DP", B=3, T=8, p=2)
