"""The command line, `python -m tputil`, as one process and as real processes under torchrun.

The torchrun runs are subprocesses with a timeout, so a hang fails the test instead of freezing
it; each takes a few seconds (every process imports torch). OMP_NUM_THREADS=1: the processes
share this machine's cores (torchrun would set it too, with a warning).
"""

import os
import re
import subprocess
import sys

import pytest
import torch

from tputil import cli
from tputil.tp_model import TPGPT
from tputil.train import loss_tolerance

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
ROW = re.compile(r"^\s*(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d\.\de[+-]\d+)$")


def run(args, timeout=120):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.mark.slow
def test_help_lists_the_commands():
    out = run([sys.executable, "-m", "tputil", "--help"])
    assert out.returncode == 0, out.stderr
    assert "{train,generate,bench}" in out.stdout and "torchrun" in out.stdout


def test_train_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    train_help = capsys.readouterr().out
    for flag in ("--n-layer", "--n-head", "--n-embd", "--steps", "--seed", "--dtype {float32,float64}"):
        assert flag in train_help


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, head, comm",
    [
        ([], "", "8 all-reduces (4 per layer)"),
        (
            ["--vocab-parallel"],
            "vocabulary parallel: the embedding, the tied head and the loss are sharded",
            "13 all-reduces (4 per layer and 5 for the embedding, head and loss)",
        ),
        (
            ["--vocab-parallel", "--shm"],
            "vocabulary parallel: the embedding, the tied head and the loss are sharded",
            "13 all-reduces (4 per layer and 5 for the embedding, head and loss)",
        ),
        (  # chapter 11: per layer 6 all-gathers and 4 reduce-scatters; + ln_f's gather and its backward
            ["--sequence-parallel"],
            "sequence parallel: outside the tensor-parallel regions each rank keeps its own T/p tokens",
            "14 all-gathers, 8 reduce-scatters and 1 all-reduces",
        ),
        (  # + the embedding's reduce-scatter, the head's gathers and reduce-scatter, the loss's 3 all-reduces
            ["--sequence-parallel", "--vocab-parallel", "--block-size", "31"],  # 31: padded to 32
            "sequence parallel: outside the tensor-parallel regions each rank keeps its own T/p tokens",
            "15 all-gathers, 10 reduce-scatters and 4 all-reduces",
        ),
    ],
)
def test_train_under_torchrun_on_two_processes_matches_the_dense_loss(flags, head, comm):
    out = run(
        TORCHRUN
        + [
            "--nproc-per-node",
            "2",
            "-m",
            "tputil",
            "train",
            "--steps",
            "5",
            "--n-layer",
            "2",
            "--n-embd",
            "32",
            "--block-size",
            "32",
            "--batch-size",
            "4",
            *flags,
        ]
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [ROW.match(line) for line in out.stdout.splitlines()]
    rows = [tuple(float(x) for x in m.groups()) for m in rows if m]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]  # printed once: by rank 0 only
    for step, tp, dense, gap in rows:
        assert abs(tp - dense) <= loss_tolerance(torch.float32, int(step) - 1) + 1e-7  # printed to 7 decimals
        assert gap <= loss_tolerance(torch.float32, int(step) - 1)
    assert rows[-1][1] < rows[0][1]  # it trains
    assert "tensor parallel over p=2 process(es), backend gloo" in out.stdout
    assert head in out.stdout and ("vocabulary parallel" in out.stdout) == ("--vocab-parallel" in flags)
    assert ("backend gloo, all-reduces through shared memory" in out.stdout) == ("--shm" in flags)
    assert comm in out.stdout
    assert out.stdout.count("summary:") == 1
    assert "OK: the TP loss matched the dense loss at every step" in out.stdout


@pytest.mark.slow
def test_bad_input_names_what_to_change_and_exits_with_code_2():
    out = run([sys.executable, "-m", "tputil", "train", "--n-head", "3", "--n-embd", "64"])
    assert out.returncode == 2
    assert "n_embd=64 is not divisible by n_head=3" in out.stderr and "(flags --n-embd and --n-head)" in out.stderr


@pytest.mark.slow
def test_a_degree_that_does_not_divide_the_heads_stops_every_rank_under_torchrun():
    out = run(
        TORCHRUN + ["--nproc-per-node", "2", "-m", "tputil", "train", "--n-head", "3", "--n-embd", "48"], timeout=60
    )
    assert out.returncode != 0  # torchrun reports its workers' failure with its own exit code, 1
    message = "--n-head 3 cannot be split over p=2 processes"
    assert out.stderr.count(message) == 1, out.stderr  # said once, by rank 0
    assert "Run with --nproc-per-node in [1, 3], or choose --n-head (and --n-embd) a multiple of 2" in out.stderr
    assert "exitcode  : 2" in out.stderr  # the ranks' own exit code


@pytest.mark.parametrize("flags, how", [([], "with a KV cache"), (["--no-kv-cache"], "without a KV cache")])
def test_generate_in_one_process_matches_the_dense_model(monkeypatch, capsys, flags, how):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # keep this test process's thread setting
    # 9 prompt bytes + 12 > block_size 16: the context window slides, and the cache is refilled
    argv = ["generate", "--steps", "0", "--new-tokens", "12", "--n-embd", "32", "--block-size", "16", *flags]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "prompt: 'The rank '" in printed and "OK: identical to the dense model's continuation" in printed
    assert f"(12 bytes, greedy, {how}" in printed and "tokens per second" in printed


def test_generate_uses_the_cache_unless_told_not_to(monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen = []
    real = TPGPT.generate

    def spy(self, idx, n, **kwargs):
        seen.append(kwargs["kv_cache"])
        return real(self, idx, n, **kwargs)

    monkeypatch.setattr(TPGPT, "generate", spy)
    for flags in ([], ["--no-kv-cache"]):
        assert cli.main(["generate", "--steps", "0", "--new-tokens", "2", "--n-embd", "32", *flags]) == 0
    assert seen == [True, False]


@pytest.mark.slow
def test_generate_under_torchrun_with_and_without_the_cache_gives_the_dense_tokens():
    """p = 2 real processes, float64, past block_size; both ways print the same continuation."""
    continuations = []
    for flags in ([], ["--no-kv-cache"], ["--vocab-parallel"]):
        args = ["generate", "--steps", "0", "--new-tokens", "24", "--n-embd", "32", "--block-size", "16"]
        out = run(TORCHRUN + ["--nproc-per-node", "2", "-m", "tputil", *args, "--dtype", "float64", *flags])
        assert out.returncode == 0, out.stdout + out.stderr
        assert out.stdout.count("OK: identical to the dense model's continuation") == 1  # rank 0 only
        line = next(x for x in out.stdout.splitlines() if x.startswith("TP continuation"))
        assert ("without a KV cache" in line) == ("--no-kv-cache" in flags)
        continuations.append(line.split("): ", 1)[1])
    assert len(set(continuations)) == 1


def test_generate_reports_a_continuation_that_differs_as_a_bug(monkeypatch, capsys):
    """The negative control: a TP generate that changes its last byte is caught, with exit code 1."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    real = TPGPT.generate

    def off_by_one(self, idx, n, **kwargs):
        out = real(self, idx, n, **kwargs)
        out[:, -1] = (out[:, -1] + 1) % 256
        return out

    monkeypatch.setattr(TPGPT, "generate", off_by_one)
    assert cli.main(["generate", "--steps", "0", "--new-tokens", "4", "--n-embd", "32", "--block-size", "16"]) == 1
    printed = capsys.readouterr().out
    assert "DIFFERENT from the dense model's from byte 4 on" in printed
    assert "more than rounding can explain: a bug" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "--prompt", ""], "--prompt is empty"),
        (["train", "--block-size", "20000"], "--block-size 20000 is too long for the 16384-byte corpus"),
        (["train", "--steps", "0"], "argument --steps: 0 is not a positive integer"),
        (["train", "--dtype", "bfloat16"], "argument --dtype: invalid choice: 'bfloat16'"),
    ],
)
def test_more_bad_input_exits_with_code_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_is_a_sub_command_and_refuses_torchrun(monkeypatch, capsys):
    """bench starts its own processes: under torchrun (WORLD_SIZE > 1) it says how to run it instead."""
    from tputil.cli import build_parser, main

    args, rest = build_parser().parse_known_args(["bench", "--sizes", "tiny", "--repeats", "1"])
    assert args.command == "bench" and rest == ["--sizes", "tiny", "--repeats", "1"]  # for tputil.bench.run
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2
    assert "python -m tputil bench --p N" in capsys.readouterr().err


def test_bench_options_are_the_benchmarks_own(capsys):
    """`python -m tputil bench --help` shows the benchmark's options; an unknown one is refused there."""
    from tputil.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m tputil bench") and "--sizes" in out and "--repeats" in out
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--no-such-option"])
    assert exc.value.code == 2 and "--no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["train", "--no-such-option"])
    assert exc.value.code == 2 and "unrecognized arguments: --no-such-option" in capsys.readouterr().err


def test_shm_on_a_gpu_backend_says_what_to_change(monkeypatch, capsys):
    monkeypatch.setattr(cli, "default_backend", lambda n: "nccl")  # as on a machine with a GPU per process
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--shm", "--steps", "1"])
    assert info.value.code == 2
    assert (
        "--shm joins CPU processes, but the backend is nccl (GPUs): drop --shm, or add --backend gloo"
        in capsys.readouterr().err
    )


def test_both_launchers_choose_the_device_with_select_device(monkeypatch):
    """cli.setup and run_processes' children pick each rank's GPU through launch.select_device."""
    import inspect

    from tputil import cli, launch

    class Chosen(Exception):
        pass

    def select_device(backend, local_rank):
        raise Chosen(backend, local_rank)

    monkeypatch.setattr(cli, "select_device", select_device)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 4)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    parser = cli.build_parser()
    with pytest.raises(Chosen) as exc:
        cli.setup(parser.parse_args(["train", "--backend", "nccl"]), parser)
    assert exc.value.args == ("nccl", 2)
    assert "select_device(" in inspect.getsource(launch._child_main)


@pytest.mark.slow
def test_train_with_dropout_under_torchrun_matches_the_dense_model_replaying_the_ranks_masks():
    """Chapter 12: p = 2 real processes, float64; the dense reference replays the masks the ranks drew."""
    args = ["train", "--steps", "3", "--n-embd", "32", "--block-size", "32", "--batch-size", "4", "--dtype", "float64"]
    first = {}
    for dropout in ("0.1", "0"):
        out = run(TORCHRUN + ["--nproc-per-node", "2", "-m", "tputil", *args, "--dropout", dropout])
        assert out.returncode == 0, out.stdout + out.stderr
        assert ("the dense reference then replays the masks the ranks drew" in out.stdout) == (dropout == "0.1")
        rows = [ROW.match(x) for x in out.stdout.splitlines()]
        rows = [tuple(float(v) for v in m.groups()) for m in rows if m]
        assert [int(r[0]) for r in rows] == [1, 2, 3]  # rank 0 only
        assert all(gap <= 1e-12 for *_, gap in rows)
        assert out.stdout.count("OK: the TP loss matched the dense loss at every step") == 1
        first[dropout] = rows[0][1]
    assert abs(first["0.1"] - first["0"]) > 1e-3  # the masks act: dropout changes the loss


@pytest.mark.slow
def test_train_with_dropout_and_sequence_parallelism_under_torchrun_matches_the_dense_model():
    """Own-token masks concatenated along T and cropped (block size 31: padded to 32); the vocabulary-parallel head."""
    args = ["train", "--steps", "3", "--n-embd", "32", "--block-size", "31", "--batch-size", "4", "--dtype", "float64"]
    flags = ["--dropout", "0.1", "--sequence-parallel", "--vocab-parallel"]
    out = run(TORCHRUN + ["--nproc-per-node", "2", "-m", "tputil", *args, *flags])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the dense reference then replays the masks the ranks drew" in out.stdout
    assert "sequence parallel: outside the tensor-parallel regions" in out.stdout
    rows = [ROW.match(x) for x in out.stdout.splitlines()]
    rows = [tuple(float(v) for v in m.groups()) for m in rows if m]
    assert [int(r[0]) for r in rows] == [1, 2, 3]
    assert all(gap <= 1e-12 for *_, gap in rows)
    assert out.stdout.count("OK: the TP loss matched the dense loss at every step") == 1


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_dropout_outside_0_1_exits_with_code_2(value, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--dropout", value])
    assert info.value.code == 2
    assert f"argument --dropout: {float(value)} is not in [0, 1)" in capsys.readouterr().err
