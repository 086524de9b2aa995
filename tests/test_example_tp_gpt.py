"""examples/tp_gpt.py, the whole course in one torch-only file (issue 10, item 1): its budget, and that it checks.

The torchrun runs are subprocesses with a timeout, so a hang fails the test instead of freezing it; each takes a
few seconds (every process imports torch). OMP_NUM_THREADS=1: the processes share this machine's cores. The
negative controls break one line each (the per-q/k/v split of c_attn, f's backward) and expect the script to fail.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "tp_gpt.py"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# Negative controls, one line of the script broken each: (the line's text, its replacement, the first check that fails).
MISTAKES = {
    # c_attn's shard becomes rows [r*3C/p, (r+1)*3C/p): a contiguous block mixing q, k, v of other heads (chapter 5).
    "c_attn sharded contiguously": ("for s in w.chunk(sections)", "for s in [w]", "FAIL logits: |TP - dense|"),
    # f without its backward all-reduce: the forward is right, every gradient that flows through f is partial.
    "f's backward not all-reduced": (
        "forward, backward = staticmethod(_identity), staticmethod(_all_reduce)",
        "forward, backward = staticmethod(_identity), staticmethod(_identity)",
        "FAIL grad h.0.ln_1.weight: |TP - dense|",
    ),
}


def torchrun(script, nproc=2):
    args = [TORCHRUN, "--standalone", "--nproc-per-node", str(nproc), str(script)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)


def test_the_script_fits_in_120_lines_imports_only_torch_and_the_standard_library_and_cites_the_chapters():
    source = SCRIPT.read_text()
    assert len(source.splitlines()) <= 120
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module is not None  # no relative import
            modules.add(node.module.split(".")[0])
    assert "torch" in modules
    assert modules - {"torch"} <= set(sys.stdlib_module_names), modules
    cited = {int(n) for pair in re.findall(r"ch\. (\d+)(?: and (\d+))?", source, flags=re.I) for n in pair if n}
    assert cited == {3, 4, 5, 6, 8, 9}, cited  # the chapters that derive each part
    for line, _, _ in MISTAKES.values():
        assert source.count(line) == 1  # each negative control below edits exactly this line


@pytest.mark.slow
def test_on_two_processes_the_logits_loss_and_every_gradient_match_the_dense_model():
    out = torchrun(SCRIPT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "TP over p=2 process(es), backend gloo, float64" in out.stdout
    assert "largest |TP - dense|: logits" in out.stdout
    assert "OK: logits, loss and all 28 gradients match the dense model" in out.stdout
    assert "FAIL" not in out.stdout and out.stdout.count("OK") == 1  # printed by rank 0 only


@pytest.mark.slow
@pytest.mark.parametrize("mistake", MISTAKES)
def test_a_broken_shard_or_collective_fails_and_names_what_differs(mistake, tmp_path):
    line, replacement, failure = MISTAKES[mistake]
    broken = tmp_path / "tp_gpt_broken.py"
    broken.write_text(SCRIPT.read_text().replace(line, replacement))
    out = torchrun(broken)
    assert out.returncode != 0, out.stdout + out.stderr
    assert failure in out.stdout and "OK" not in out.stdout, out.stdout
    if mistake == "f's backward not all-reduced":
        assert "FAIL logits" not in out.stdout and "FAIL loss" not in out.stdout  # the forward is still right


@pytest.mark.slow
def test_a_degree_that_does_not_divide_the_heads_is_refused_naming_the_flag():
    out = torchrun(SCRIPT, nproc=3)
    assert out.returncode != 0
    assert "n_head=4 cannot be split over p=3 processes: run with --nproc-per-node in [1, 2, 4]" in out.stderr
