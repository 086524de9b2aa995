"""Checkpoints (chapter 16): GPT-2 in the Hugging Face layout against `transformers`' own model, each rank
reading only its slices, and the TP model's own sharded files reloaded at another p.

All offline: Hugging Face's GPT2LMHeadModel is built from a small random config and written with
save_pretrained (`course.ch16_checkpoints.hf_gpt2`). float32 logits are compared within chapter 7's
first-order bound (`course.precision.gpt_logit_bound`, worst case), float64 within 1e-12.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tputil import checkpoint as ck, cli, tp_checkpoint as tc
from tputil.comm import run_threads
from tputil.comm.threads import RankError
from tputil.course.ch16_checkpoints import bpe_files, hf_generate, hf_gpt2, hf_rank, load_rank, save_rank
from tputil.course.precision import gpt_logit_bound, logit_term_sizes
from tputil.model import GPTConfig, untrained_gpt
from tputil.shard import (
    GPT_TP_PLAN,
    Shard,
    gather_state_dict,
    local_shard,
    placement,
    shard_intervals,
    vocab_parallel_plan,
)
from tputil.tp_model import TPGPT

IDX = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    model = hf_gpt2(directory)
    return directory, model


def bound(dense, idx):
    return gpt_logit_bound(dense.config, idx.size(1), logit_term_sizes(dense, idx).max().item(), torch.float32)["worst"]


def test_gelu_option_and_the_config_repr():
    assert GPTConfig(gelu="tanh").gelu == "tanh" and "gelu" not in repr(GPTConfig())
    assert "gelu='tanh'" in repr(GPTConfig(gelu="tanh"))
    with pytest.raises(ValueError, match="GPTConfig.gelu='relu'"):
        GPTConfig(gelu="relu")
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    mlp = untrained_gpt(GPTConfig(gelu="tanh", n_layer=1)).transformer.h[0].mlp
    assert torch.equal(mlp.gelu(x), torch.nn.functional.gelu(x, approximate="tanh"))


@pytest.mark.parametrize("size,p,stride", [(12, 1, 1), (12, 2, 3), (24, 4, 3), (8, 4, 1)])
def test_shard_intervals_cut_what_shard_tensor_cuts(size, p, stride):
    t = torch.arange(size * 2).view(size, 2)
    for r in range(p):
        ranges = shard_intervals(size, r, p, stride)
        assert torch.equal(torch.cat([t[lo:hi] for lo, hi in ranges]), local_shard(t, Shard(0, stride), r, p))


def test_dense_and_tp_logits_match_transformers(hf_dir):
    directory, hf = hf_dir
    reference = hf(IDX).logits.detach()
    dense = ck.load_gpt2(directory)
    assert dense.config.gelu == "tanh" and not dense.training
    limit = bound(dense, IDX)
    assert (dense(IDX)[0] - reference).abs().max() <= limit
    for p in (1, 2, 4):
        for vocab_parallel in (False, True):
            out = run_threads(hf_rank, p, directory, IDX, 4, vocab_parallel)
            assert all((o["logits"] - reference).abs().max() <= limit for o in out), (p, vocab_parallel)


def test_float64_logits_and_greedy_tokens_equal_transformers(hf_dir):
    directory, hf = hf_dir
    hf64 = hf_gpt2(seed=0).double()  # the same seed: the same weights
    dense = ck.load_gpt2(directory, dtype=torch.float64)
    torch.testing.assert_close(dense(IDX)[0], hf64(IDX).logits, rtol=0, atol=1e-12)
    prompt = IDX[:1, :4]
    assert torch.equal(dense.generate(prompt, 24), hf_generate(hf64, prompt, 24))
    out = run_threads(hf_rank, 2, directory, prompt, 24, False, torch.float64)
    assert torch.equal(out[0]["tokens"], hf_generate(hf64, prompt, 24))


def test_each_rank_reads_only_its_slices(hf_dir):
    """With the vocabulary-parallel head a rank reads exactly the numbers its model holds (256 rows split
    without padding), fewer than the checkpoint holds: no rank ever holds the whole model."""
    directory, _ = hf_dir
    config, source = ck.open_gpt2(directory)
    total = sum(s.numel() for n, s in source.shapes.items() if n != "lm_head.weight")  # tied: stored once
    for p in (2, 4):
        read = [o["elements_read"] for o in run_threads(hf_rank, p, directory, IDX[:, :2], 1, True)]
        assert read == run_threads(lambda g: _shard_numel(g, config), p)
        assert max(read) < total


def _shard_numel(group, config):
    with torch.device("meta"):
        model = TPGPT(config, group=group, vocab_parallel=True)
    return sum(w.numel() for w in model.parameters())  # tied: counted once


def test_read_shard_equals_local_shard_of_the_dense_tensor(hf_dir):
    directory, _ = hf_dir
    _, source = ck.open_gpt2(directory)
    dense = ck.load_gpt2(directory).state_dict()
    for plan in (GPT_TP_PLAN, vocab_parallel_plan(), vocab_parallel_plan(128)):
        for p in (1, 2, 4):
            for r in range(p):
                for name in source.shapes:
                    expected = local_shard(dense[name], placement(name, plan), r, p)
                    assert torch.equal(ck.read_shard(source, name, r, p, plan=plan), expected), (name, p, r)


def test_pytorch_model_bin_loads_the_same_weights(hf_dir, tmp_path):
    directory, _ = hf_dir
    hf_gpt2(tmp_path, safetensors=False)  # the same seed: the same weights, pickled
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    a, b = ck.load_gpt2(directory).state_dict(), ck.load_gpt2(tmp_path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    out = run_threads(hf_rank, 2, tmp_path, IDX[:, :2], 1)
    assert torch.equal(out[0]["logits"], run_threads(hf_rank, 2, directory, IDX[:, :2], 1)[0]["logits"])


def test_the_mistakes_fail_the_checks(hf_dir):
    """Conv1D weights not transposed (square c_proj: the shapes fit) leave float32's bound; the erf GELU
    on GPT-2's weights is off by far more than float64's 1e-12 (within float32's worst-case bound here)."""
    directory, hf = hf_dir
    reference = hf(IDX).logits.detach()
    limit = bound(ck.load_gpt2(directory), IDX)
    untransposed = ck.load_gpt2(directory)
    with torch.no_grad():
        for block in untransposed.transformer.h:
            block.attn.c_proj.weight.copy_(block.attn.c_proj.weight.T.clone())  # as stored: (in, out)
    assert (untransposed(IDX)[0] - reference).abs().max() > 10 * limit
    hf64, erf = hf_gpt2(seed=0).double(), ck.load_gpt2(directory, dtype=torch.float64)
    for block in erf.transformer.h:
        block.mlp.gelu.approximate = "none"
    exact = ck.load_gpt2(directory, dtype=torch.float64)
    assert (exact(IDX)[0] - hf64(IDX).logits).abs().max() <= 1e-12
    assert (erf(IDX)[0] - hf64(IDX).logits).abs().max() > 1e-6


def test_bad_checkpoints_name_the_file(hf_dir, tmp_path):
    directory, _ = hf_dir
    with pytest.raises(ck.CheckpointError, match="no such directory"):
        ck.load_gpt2(tmp_path / "nowhere")
    with pytest.raises(ck.CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        ck.load_gpt2(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    (bad / "config.json").unlink()
    with pytest.raises(ck.CheckpointError, match="config.json: no such file"):
        ck.load_gpt2(bad)
    config = json.loads((directory / "config.json").read_text())
    for change, message in (
        ({"n_embd": 32}, r"transformer.wte.weight has shape \(256, 64\), the config .* needs \(256, 32\)"),
        ({"n_layer": 3}, "no tensor transformer.h.2.ln_1.weight"),
        ({"activation_function": "relu"}, "'activation_function': 'relu'"),
    ):
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ck.CheckpointError, match=message):
            ck.load_gpt2(bad)
    with pytest.raises(RankError, match="n_head=4 is not divisible by p=3"):
        run_threads(lambda g: ck.load_gpt2(directory, group=g), 3)


def test_bpe_tokenizer_from_vocab_and_merges(hf_dir, tmp_path):
    assert ck.tokenizer(tmp_path) is None
    bpe_files(tmp_path, "the rank holds the heads; the ranks hold the heads. " * 20, vocab_size=280)
    encode, decode = ck.tokenizer(tmp_path)
    ids = encode("the ranks hold")
    assert len(ids) < len("the ranks hold") and max(ids) >= 256  # merges were used
    assert decode(ids) == "the ranks hold"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A float64 dense GPT with a vocabulary p = 4 does not divide, saved at p = 2 with each head."""
    dense = untrained_gpt(GPTConfig(n_layer=2, vocab_size=250, block_size=32), seed=3).double()
    dirs = {}
    for vocab_parallel in (False, True):
        dirs[vocab_parallel] = tmp_path_factory.mktemp(f"tp{int(vocab_parallel)}")
        files = run_threads(save_rank, 2, dense, dirs[vocab_parallel], vocab_parallel)[0]
        assert files == ["rank-0-of-2.safetensors", "rank-1-of-2.safetensors", "tputil.json"]
    return dense, dirs


@pytest.mark.parametrize("vocab_parallel", [False, True])
def test_saved_at_p2_loads_at_p1_and_p4_with_equal_weights_logits_and_tokens(saved, vocab_parallel):
    dense, dirs = saved
    idx = IDX % 250
    reference, tokens = dense(idx)[0], dense.generate(idx[:, :4], 16)
    plan = vocab_parallel_plan() if vocab_parallel else GPT_TP_PLAN
    for p in (1, 2, 4):
        out = run_threads(load_rank, p, dirs[vocab_parallel], idx[:, :4], 16)
        models = run_threads(
            lambda g: {k: v.detach() for k, v in tc.load(dirs[vocab_parallel], group=g).state_dict().items()}, p
        )
        gathered = gather_state_dict(models, dense.config, plan=plan)
        assert all(torch.equal(gathered[k], v) for k, v in dense.state_dict().items())  # bit for bit
        assert all(torch.equal(o["tokens"], tokens) for o in out)
        logits = run_threads(load_rank, p, dirs[vocab_parallel], idx, 1)[0]["logits"]
        torch.testing.assert_close(logits, reference, rtol=0, atol=1e-12)
    assert torch.equal(tc.load_dense(dirs[vocab_parallel]).state_dict()["lm_head.weight"], dense.lm_head.weight)


def test_bad_tp_checkpoints_name_the_file_and_load_nothing(saved, tmp_path):
    dense, dirs = saved
    broken = tmp_path / "broken"
    shutil.copytree(dirs[False], broken)
    (broken / "rank-1-of-2.safetensors").unlink()
    with pytest.raises(RankError, match="rank-1-of-2.safetensors: missing"):
        run_threads(lambda g: tc.load(broken, group=g), 2)
    (broken / "tputil.json").unlink()
    with pytest.raises(ck.CheckpointError, match=r"tputil.json: missing; .*\(an unfinished save has none\)"):
        tc.load(broken, group=None)
    other = tmp_path / "other"
    shutil.copytree(dirs[False], other)
    index = json.loads((other / "tputil.json").read_text())
    index["config"]["n_embd"] = 32
    (other / "tputil.json").write_text(json.dumps(index))
    with pytest.raises(RankError, match=r"rank-0-of-2.safetensors: rank 0: transformer.wte.weight: expected"):
        run_threads(lambda g: tc.load(other, group=g), 1)
    with pytest.raises(RankError, match="n_head=4 is not divisible by p=3"):
        run_threads(lambda g: tc.load(dirs[False], group=g), 3)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--checkpoint", "NOWHERE"], "--checkpoint NOWHERE: no such directory"),
        (["generate", "--load", "NOWHERE"], "--load NOWHERE: no such directory"),
        (["generate", "--checkpoint", "HF", "--steps", "5"], "--steps 5 trains the course's model"),
        (["generate", "--checkpoint", "HF", "--load", "HF"], "not allowed with argument"),
    ],
)
def test_command_line_refuses_bad_checkpoints(hf_dir, argv, message, capsys):
    directory, _ = hf_dir
    argv = [str(directory) if a == "HF" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_byte_tokens_need_a_vocabulary_of_256(tmp_path, capsys):
    hf_gpt2(tmp_path, vocab_size=200)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--checkpoint", str(tmp_path)])
    assert exit_info.value.code == 2 and "cannot hold the 256 byte values" in capsys.readouterr().err


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]


def run(args):
    out = subprocess.run(args, capture_output=True, text=True, timeout=240, env=ENV)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def continuation(stdout):
    assert stdout.count("OK: identical to the dense model's continuation") == 1  # rank 0 only
    return next(x for x in stdout.splitlines() if x.startswith("TP continuation")).split("): ", 1)[1]


@pytest.mark.slow
def test_torchrun_saved_at_p2_generates_the_same_at_p1_p2_and_p4(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    flags = ["--steps", "3", "--n-layer", "1", "--n-embd", "32", "--block-size", "16", "--dtype", "float64"]
    out = run(TORCHRUN + ["2", "-m", "tputil", "train", *flags, "--save", ckpt])
    assert "saved: " in out and sorted(os.listdir(ckpt)) == [
        "rank-0-of-2.safetensors",
        "rank-1-of-2.safetensors",
        "tputil.json",
    ]
    gen = ["generate", "--load", ckpt, "--new-tokens", "24", "--dtype", "float64"]
    texts = [continuation(run([sys.executable, "-m", "tputil", *gen]))]
    texts += [continuation(run(TORCHRUN + [p, "-m", "tputil", *gen])) for p in ("2", "4")]
    assert len(set(texts)) == 1


@pytest.mark.slow
def test_torchrun_generate_from_a_hugging_face_directory_with_its_bpe(tmp_path):
    hf_gpt2(tmp_path, vocab_size=300)
    bpe_files(tmp_path, "the rank holds the heads; the ranks hold the heads. " * 20, vocab_size=300)
    out = run(TORCHRUN + ["2", "-m", "tputil", "generate", "--checkpoint", str(tmp_path), "--prompt", "the ranks"])
    assert "prompt tokens: GPT-2's byte-level BPE" in out
    continuation(out)
