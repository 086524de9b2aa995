"""The benchmark command runs end to end on 2 real processes, and its correctness guard bites.

No timing is asserted: the numbers depend on the machine and its load. What must hold is that one
run measures every variant, prints one table with every column, and refuses to time a wrong model.
Two spawns (a few seconds each): the smoke run, then a run with a deliberately mis-sharded variant.
"""

import argparse

import pytest
import torch

from tputil.bench.ranks import LOGITS_TOL, BenchCorrectnessError, check_close
from tputil.bench.report import COLUMNS, HEADERS
from tputil.bench.run import DEFAULT_VARIANTS, SIZES, VARIANTS, BenchSize, add_arguments, run_bench
from tputil.comm import RankError
from tputil.model import GPTConfig

# smaller than the bench's "tiny": the point is that every code path runs, not the numbers
SMOKE = BenchSize("smoke", GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=64, block_size=16), 2)


@pytest.mark.slow
def test_bench_runs_end_to_end_and_prints_one_table_with_all_columns():
    result = run_bench([SMOKE], repeats=1)
    lines = result.table.splitlines()
    for header in HEADERS:
        assert header in lines[0]
    assert any(line.startswith("smoke: 1 layers, C=32") for line in lines)
    for key in DEFAULT_VARIANTS:
        label = VARIANTS[key][0]
        assert sum(line[: COLUMNS[0][2]].strip() == label for line in lines) == 1, label
    rows = {r["key"]: r for r in result.rows}
    assert set(rows) == set(DEFAULT_VARIANTS)
    for key, row in rows.items():
        assert row["fwd"] > 0 and row["step"] > 0, key
        if key != "dense":
            assert row["fwd/dense"] > 0 and row["step/dense"] > 0, key
        if key.startswith("ours"):  # timed collectives, and a ratio against PyTorch's TP with the same head
            assert row["comm_fwd"] > 0 and row["comm_step"] > 0, key
            assert row["fwd/torch"] > 0 and row["step/torch"] > 0, key
        if key.startswith("torch"):  # profiled collectives
            assert row["comm_fwd"] > 0 and row["comm_step"] > 0, key
    assert "load average" in result.table and "wall time" in result.table


@pytest.mark.slow
def test_the_command_writes_its_rows_and_table_as_json(tmp_path, capsys):
    import argparse
    import json

    from tputil.bench.run import run

    path = tmp_path / "bench.json"
    args = argparse.Namespace(
        sizes=[SMOKE], repeats=1, seed=0, p=2, variants=["ours_rep"], backend=None, omp_wait_policy="", json=str(path)
    )
    assert run(args) == 0
    record = json.loads(path.read_text())
    assert record["sizes"] == ["smoke"] and record["table"] in capsys.readouterr().out
    assert {r["key"] for r in record["rows"]} == {"dense", "ours_rep"}
    assert all(r["fwd"] > 0 and r["step"] > 0 for r in record["rows"])


@pytest.mark.slow
def test_the_guard_stops_a_mis_sharded_variant_before_timing():
    # ours with c_attn cut into contiguous rows (rank 0 gets q and half of k): the guard must raise
    with pytest.raises(RankError, match="correctness guard: ours_rep: logits differs from the dense model"):
        run_bench([SMOKE], repeats=1, variants=["ours_rep"], _sabotage="ours_rep")


def test_check_close_names_the_variant_and_passes_rounding_noise():
    x = torch.randn(4, 8)
    check_close("v: logits", x + 1e-6, x, LOGITS_TOL)  # float32 rounding noise passes
    with pytest.raises(BenchCorrectnessError, match="v: logits differs"):
        check_close("v: logits", x + 1e-2, x, LOGITS_TOL)  # a real error does not


def test_command_line_arguments():
    args = add_arguments(argparse.ArgumentParser()).parse_args([])
    assert args.sizes == ["tiny", "mid", "gpt2"] and args.repeats == 3 and args.p == 2
    assert (SIZES["mid"].config.n_layer, SIZES["mid"].config.n_embd) == (6, 384)
    gpt2 = SIZES["gpt2"].config
    assert (gpt2.n_layer, gpt2.n_embd, gpt2.vocab_size, gpt2.block_size) == (12, 768, 50304, 256)
    assert [name for name, _, _ in COLUMNS][1:] == [
        "fwd",
        "step",
        "comm_fwd",
        "comm_step",
        "fwd/dense",
        "step/dense",
        "fwd/torch",
        "step/torch",
    ]


def test_pytorch_plan_names_existing_modules_and_split_qkv_keeps_the_numbers():
    from fnmatch import fnmatch

    from tputil.bench.ranks import dense_model
    from tputil.bench.torch_tp import split_qkv, torch_tp_plan

    dense = dense_model(SMOKE.config)
    split = split_qkv(dense)  # c_attn's q, k and v sections as three Linears: what ColwiseParallel can split
    idx = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(split(idx)[0], dense(idx)[0], rtol=1e-5, atol=1e-5)
    names = [name for name, _ in split.named_modules()]
    for pattern in torch_tp_plan(vocab_parallel=True):
        assert any(fnmatch(name, pattern) for name in names), pattern


def torch_tp_on_shm(group):
    """PyTorch's TP on a shm mesh made after a gloo mesh over the same ranks: its all-reduces must use shm."""
    from torch.distributed.device_mesh import init_device_mesh

    from tputil.bench.ranks import dense_model
    from tputil.bench.torch_tp import forward_loss, full_logits, local_value, shm_mesh, torch_tp_model
    from tputil.comm import ShmGroup

    x = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(0))
    gloo_mesh = init_device_mesh("cpu", (group.world_size,))  # equal to a shm mesh without a name of its own
    with torch.no_grad():  # DTensor meets the gloo mesh first, as in the benchmark
        forward_loss(torch_tp_model(dense_model(SMOKE.config), gloo_mesh, vocab_parallel=True), x, x)
    shm = ShmGroup(group.process_group)
    model = torch_tp_model(dense_model(SMOKE.config), shm_mesh(shm), vocab_parallel=True)
    with torch.no_grad():
        logits, loss = forward_loss(model, x, x)
    return shm._seq, dict(shm.stats.calls), full_logits(logits), local_value(loss)


@pytest.mark.slow
def test_pytorch_tp_on_the_shm_mesh_all_reduces_through_shared_memory():
    from tputil.bench.ranks import dense_model
    from tputil.launch import run_processes

    x = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, loss = dense_model(SMOKE.config)(x, x)
    for calls, counted, got_logits, got_loss in run_processes(torch_tp_on_shm, 2, backend="gloo", timeout=120.0):
        assert calls == 2 * SMOKE.config.n_layer + 1 + 3  # blocks, embedding, loss_parallel's all-reduces
        assert counted == {"all_reduce": calls}  # through ShmGroup's public all_reduce, counted there
        torch.testing.assert_close(got_logits, logits, **LOGITS_TOL)
        torch.testing.assert_close(got_loss, loss, **LOGITS_TOL)


def test_pytorch_tp_refuses_a_degree_that_does_not_divide_the_heads_as_the_package_does():
    from types import SimpleNamespace

    from tputil.bench.ranks import dense_model
    from tputil.bench.torch_tp import torch_tp_model
    from tputil.shard import divide

    with pytest.raises(ValueError) as ours:
        divide(SMOKE.config.n_head, 3, "n_head")
    with pytest.raises(ValueError) as theirs:
        torch_tp_model(dense_model(SMOKE.config), SimpleNamespace(size=lambda: 3), vocab_parallel=False)
    assert (
        str(theirs.value)
        == str(ours.value)
        == "n_head=2 is not divisible by p=3; p must divide n_head: try one of [1, 2]"
    )


def build_variants(group):
    from tputil.bench.ranks import _build, dense_model

    dense = dense_model(SMOKE.config)
    built = {key: _build(key, dense, {"gloo": group}, {}) for key in ("ours_rep", "ours_vocab", "ours_overlap")}
    return {
        key: (type(r.forward).__name__, r.forward.async_grad_all_reduce, r.group is group) for key, r in built.items()
    }


def test_the_overlap_variant_is_the_vocab_parallel_model_with_the_layer_option():
    from tputil.comm import run_threads

    for built in run_threads(build_variants, 2):
        assert built == {
            "ours_rep": ("TPGPT", False, True),
            "ours_vocab": ("VocabParallelTPGPT", False, True),
            "ours_overlap": ("VocabParallelTPGPT", True, True),
        }
    assert VARIANTS["ours_overlap"][0] == "ours, vocab head + backward overlap"
