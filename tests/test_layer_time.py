"""Time per layer and generation time (chapter 14, `course.layer_time`) against what ranks count.

Counted on `run_threads` ranks: one TP and one TP+SP block's collectives (kind and bytes, forward
and backward), each rank's FLOPs (PyTorch's FlopCounterMode) for a block and for generation, and
generation's all-reduces. DP, FSDP and PP are derived only: checked against `cost_model`'s step
(which follows `course.compare`'s definitions), not against a run.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tputil.comm import run_threads
from tputil.course import compare, cost_model, layer_time
from tputil.course.cost_model import DEVICES, LINKS, SCHEMES, Device, Link
from tputil.model import GPTConfig, untrained_gpt
from tputil.tp_model import TPGPT, VocabParallelTPGPT

CONFIG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
B, T = 2, 8
UNIT = Device("one FLOP a second", 0.0, {"float32": 1.0}, "test")  # seconds == FLOPs
WIRE = Link("one byte a second", 1.0, 0.0, "test")  # seconds == ring bytes
GPT2 = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)


def one_block(group, dense, sp):
    """Forward and backward of block 0 of a rank's VocabParallelTPGPT: collectives and FLOPs."""
    block = VocabParallelTPGPT.from_dense(dense, group=group, sequence_parallel=sp).transformer.h[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T // group.world_size if sp else T, CONFIG.n_embd, generator=g, requires_grad=True)
    out = {}
    with FlopCounterMode(display=False) as flops:
        with group.stats.measure() as m:
            y = block(x)
        out["forward"] = (dict(m.calls), dict(m.bytes))
        with group.stats.measure() as m:
            y.backward(torch.ones_like(y))
        out["backward"] = (dict(m.calls), dict(m.bytes))
    out["flops"] = flops.get_total_flops()
    return out


@pytest.mark.parametrize("scheme", ["TP", "TP+SP"])
@pytest.mark.parametrize("p", [2, 4])
def test_one_block_counts_what_layer_time_charges(p, scheme):
    ranks = run_threads(one_block, p, untrained_gpt(CONFIG), scheme == "TP+SP")
    calls = layer_time.layer_calls(CONFIG, scheme, B=B, T=T, p=p)
    t = layer_time.layer_time(CONFIG, scheme, B=B, T=T, p=p, precision="float32", device=UNIT, link=WIRE)
    for r in ranks:
        for phase, listed in calls.items():
            kinds, nbytes = {}, {}
            for k, n in listed:
                kinds[k] = kinds.get(k, 0) + 1
                nbytes[k] = nbytes.get(k, 0) + n
            assert r[phase] == (kinds, nbytes)
        assert r["flops"] == t["compute"]  # 3 (24 B T C^2 + 4 B T^2 C) / p, at one FLOP a second
    assert sum(t["calls"].values()) == sum(len(c) for c in calls.values())


@pytest.mark.parametrize("scheme", ["TP", "TP+SP", "FSDP"])
@pytest.mark.parametrize("p", [2, 4])
def test_layers_plus_the_rest_is_the_step(p, scheme):
    """L layers' collectives, plus what a step adds outside them, cost what `step_time` says."""
    kw = dict(B=8, T=1024, p=p, precision="bf16 mixed")
    dev, link = DEVICES["H100 SXM 80GB"], LINKS["NVLink 4"]
    layer = layer_time.layer_time(GPT2, scheme, **kw, device=dev, link=link)
    step = cost_model.step_time(GPT2, scheme, **kw, device=dev, link=link)
    listed = cost_model.step_collectives(GPT2, scheme, **kw)
    rest = [c for c in listed["forward"][GPT2.n_layer * len(layer_time.layer_calls(GPT2, scheme, **kw)["forward"]) :]]
    rest += listed["backward"][GPT2.n_layer * len(layer_time.layer_calls(GPT2, scheme, **kw)["backward"]) :]
    rest += listed["grad_sync"]
    rest_time = sum(cost_model.ring_time(k, n, p, latency=link.latency, bandwidth=link.bandwidth) for k, n in rest)
    assert math.isclose(
        GPT2.n_layer * sum(layer["collectives"].values()) + rest_time, step["communication"], rel_tol=1e-12
    )
    head = 3 * 2 * 8 * 1024 * GPT2.n_embd * GPT2.vocab_size / p / dev.flops["bf16 mixed"]
    assert math.isclose(GPT2.n_layer * layer["compute"] + head, step["compute"], rel_tol=1e-12)


def test_dp_and_pp_layers_add_up_to_their_step():
    """Derived only: DP's per-layer buckets carry the blocks' gradients; PP's L/p layers the stage's sends."""
    kw = dict(B=8, T=1024, p=4, precision="bf16 mixed")
    dev, link = DEVICES["H100 SXM 80GB"], LINKS["PCIe 5.0 x16"]
    dp = layer_time.layer_calls(GPT2, "DP", **kw)
    blocks = GPT2.n_layer * sum(compare.layer_params(GPT2).values()) * 2
    assert (
        GPT2.n_layer * dp["backward"][0][1] == blocks < cost_model.step_collectives(GPT2, "DP", **kw)["grad_sync"][0][1]
    )
    pp = layer_time.layer_time(GPT2, "PP", **kw, device=dev, link=link)
    step = cost_model.step_time(GPT2, "PP", **kw, device=dev, link=link)
    tied = cost_model.ring_time(
        "all_reduce", GPT2.vocab_size * GPT2.n_embd * 2, 2, latency=link.latency, bandwidth=link.bandwidth
    )
    stage = GPT2.n_layer // 4
    assert math.isclose(stage * pp["collectives"]["send"] + tied, step["communication"], rel_tol=1e-12)
    assert math.isclose(stage * pp["bubble"], step["bubble"] * stage * pp["compute"] / step["compute"], rel_tol=1e-12)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_overlap_is_bounded(scheme):
    for link in LINKS.values():
        t = layer_time.layer_time(
            GPT2, scheme, B=8, T=1024, p=4, precision="bf16 mixed", device=DEVICES["A100 SXM 80GB"], link=link
        )
        comm = sum(t["collectives"].values())
        assert math.isclose(t["exposed"] + t["overlappable"], comm, rel_tol=1e-12)
        assert 0 <= t["hidden"] <= min(t["overlappable"], t["compute"])
        assert t["overlapped"] >= t["compute"] + t["exposed"] + t["bubble"] - 1e-15
        assert math.isclose(t["serial"], t["compute"] + comm + t["bubble"], rel_tol=1e-12)
    assert scheme in layer_time.OVERLAP


def test_p1_has_no_communication():
    for scheme in SCHEMES:
        t = layer_time.layer_time(CONFIG, scheme, B=B, T=T, p=1, precision="float32", device=UNIT, link=WIRE)
        assert t["collectives"] == {} and t["serial"] == t["compute"] == 3 * (24 * B * T * 32**2 + 4 * B * T * T * 32)


def generate_counted(group, dense, idx, cache):
    model = TPGPT.from_dense(dense, group=group)
    with FlopCounterMode(display=False) as flops:
        with group.stats.measure() as m:
            model.generate(idx, 6, kv_cache=cache)
    return flops.get_total_flops(), dict(m.calls), dict(m.bytes)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_generation_flops_and_all_reduces_are_counted(p, cache):
    dense = untrained_gpt(CONFIG)
    idx = torch.randint(0, CONFIG.vocab_size, (B, 5), generator=torch.Generator().manual_seed(0))
    g = layer_time.generation_time(CONFIG, B=B, prompt=5, new_tokens=6, p=p, kv_cache=cache, device=UNIT, link=WIRE)
    for flops, calls, nbytes in run_threads(generate_counted, p, dense, idx, cache):
        assert flops == g["compute"]  # blocks over p, the replicated head whole
        assert calls.get("all_reduce", 0) == g["all_reduces"] == (0 if p == 1 else 2 * CONFIG.n_layer * 6)
        assert nbytes.get("all_reduce", 0) == g["all_reduce_bytes"]
    if p == 2:  # at p = 2 a ring all-reduce sends its message once
        assert g["communication"] == g["all_reduce_bytes"]


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="generate fewer tokens"):
        layer_time.generation_time(CONFIG, B=1, prompt=8, new_tokens=10, p=1, kv_cache=True, device=UNIT, link=WIRE)
    with pytest.raises(ValueError, match="must both be >= 1"):
        layer_time.generation_time(CONFIG, B=1, prompt=0, new_tokens=1, p=1, kv_cache=True, device=UNIT, link=WIRE)
    with pytest.raises(ValueError, match="unknown scheme"):
        layer_time.layer_time(CONFIG, "ZeRO-9", B=B, T=T, p=2, precision="float32", device=UNIT, link=WIRE)
    with pytest.raises(ValueError, match="n_head"):
        layer_time.layer_time(CONFIG, "TP", B=B, T=T, p=3, precision="float32", device=UNIT, link=WIRE)


def test_the_stored_generation_run_says_what_made_it():
    """book/data/kv_cache_2cpu.json, which chapter 14 calibrates against, names its command and machine."""
    run = json.loads((Path(__file__).parent.parent / "book" / "data" / "kv_cache_2cpu.json").read_text())
    made_by = run["made_by"]
    assert made_by["command"].endswith("python -m tputil.bench.kv_cache --json book/data/kv_cache_2cpu.json")
    assert {"cpu", "cores", "system", "python", "torch", "load_average_before", "environment"} <= set(made_by)
    assert [(r["model"], r["kv_cache"]) for r in run["rows"]] == [
        ("dense", False),
        ("dense", True),
        ("TP", False),
        ("TP", True),
    ]


@pytest.mark.slow
def test_the_benchmark_json_records_command_and_machine(tmp_path, monkeypatch):
    from tputil.bench import kv_cache as kv_bench

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    out = tmp_path / "run.json"
    argv = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "16", "--prompt", "4"]
    argv += ["--new-tokens", "4", "--rounds", "1", "--json", str(out)]
    assert kv_bench.main(argv) == 0
    made_by = json.loads(out.read_text())["made_by"]
    assert made_by["command"].endswith("python -m tputil.bench.kv_cache " + " ".join(argv))
    assert made_by["command"].startswith("OMP_WAIT_POLICY=PASSIVE ")  # the variables that change timings, first
    assert made_by["environment"]["OMP_WAIT_POLICY"] == "PASSIVE" and made_by["cores"] >= 1


def test_the_stored_all_reduce_run_says_what_made_it_and_its_fit_is_redone():
    """book/data/all_reduce_2cpu.json (chapter 2's timings, chapter 14's table): command, machine, fit."""
    from tputil.course import cost

    run = json.loads((Path(__file__).parent.parent / "book" / "data" / "all_reduce_2cpu.json").read_text())
    assert run["made_by"]["command"].endswith("python -m tputil.bench.all_reduce --json book/data/all_reduce_2cpu.json")
    assert len(run["nbytes"]) == len(run["seconds"]) == 13 and all(t > 0 for t in run["seconds"])
    fit = cost.fit_latency_bandwidth("all_reduce", run["nbytes"], run["seconds"], run["setup"]["p"])
    assert fit == (run["latency"], run["bandwidth"])


@pytest.mark.slow
def test_the_all_reduce_command_times_every_size_and_records_its_run(tmp_path):
    from tputil.bench import all_reduce

    out = tmp_path / "run.json"
    assert all_reduce.main(["--reps", "1", "--warmup", "0", "--json", str(out)]) == 0
    run = json.loads(out.read_text())
    assert run["nbytes"] == all_reduce.SIZES and len(run["seconds"]) == len(all_reduce.SIZES)
    assert run["made_by"]["command"].endswith(
        "python -m tputil.bench.all_reduce --reps 1 --warmup 0 --json " + str(out)
    )
    with pytest.raises(SystemExit):
        all_reduce.main(["--p", "1"])  # an all-reduce needs two processes: the error names --p
