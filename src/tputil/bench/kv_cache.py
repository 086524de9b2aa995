"""Tokens per second with and without the KV cache, dense and tensor-parallel (chapter 13).

    python -m tputil.bench.kv_cache                 # p = 2, a 4-layer GPT, 240 new tokens
    python -m tputil.bench.kv_cache --p 2 --n-layer 6 --n-embd 384 --n-head 6 --json out.json

A benchmark, not a test: it prints one table, the four ways side by side, and the speed-up the
cache buys each model. The dense GPT generates in this process; the tensor-parallel one on p real
processes (`launch.run_processes`, gloo on CPU), each with one intra-op thread; the dense model
gets p threads, the cores the p ranks use. Every variant greedily continues the same prompt,
within block_size (past it, generate refills the cache from the cropped window every step, and
the cache saves nothing; see `model.generate`). Rounds are interleaved (with and without the
cache, one after the other) after one warm-up run each, and the fastest round is kept: the rest is
noise from the machine's other work. TP time is the slowest rank's (`timing.slowest_rank_times`).

Every variant's tokens are compared with the dense model's without a cache; float32 sums in
another order may flip a near-tie, so a difference is reported in the table, not raised.
"""

import argparse
import sys

import torch

from ..launch import run_processes
from ..model import GPTConfig, untrained_gpt
from ..tp_model import TPGPT
from . import timing
from .timing import seconds, slowest_rank_times


def _models_and_prompt(config_kwargs, batch, prompt, seed):
    config = GPTConfig(**config_kwargs)
    dense = untrained_gpt(config, seed)  # eval mode, every parameter random
    g = torch.Generator().manual_seed(seed + 1)
    return dense, torch.randint(config.vocab_size, (batch, prompt), generator=g)


def _rounds(timed, rounds):
    """{kv_cache: [seconds per round]} of timed(kv_cache) -> seconds, interleaved after one warm-up each."""
    for cache in (False, True):
        timed(cache)
    times = {False: [], True: []}
    for _ in range(rounds):
        for cache in (False, True):
            times[cache].append(timed(cache))
    return times


def worker(group, config_kwargs, batch, prompt, new_tokens, rounds, seed):
    """One rank: this rank's slice of the seeded dense GPT generates with and without the cache."""
    torch.set_num_threads(1)
    dense, idx = _models_and_prompt(config_kwargs, batch, prompt, seed)
    model = TPGPT.from_dense(dense, group=group)
    tokens = {}

    def timed(cache):
        def run():
            tokens[cache] = model.generate(idx, new_tokens, kv_cache=cache)

        return slowest_rank_times(run, group, reps=1, warmup=0)[0]

    times = _rounds(timed, rounds)
    return {"times": times, "tokens": tokens}


def run(*, p=2, n_layer=4, n_embd=256, n_head=8, block_size=256, batch=1, prompt=16, new_tokens=240, rounds=3, seed=0):
    """Run the benchmark; return {"setup": ..., "rows": [one dict per (model, kv_cache)], "speedup": ...}.

    rows: model ("dense" or "TP"), p, kv_cache, seconds (fastest round), tokens_per_second
    (batch * new_tokens / seconds), same_tokens (as the dense model's without a cache).
    speedup: per model, tokens per second with the cache over without.
    """
    if prompt + new_tokens > block_size:
        raise ValueError(
            f"prompt {prompt} + new_tokens {new_tokens} > block_size {block_size}: past block_size the cache "
            f"is refilled every step and saves nothing; generate at most {block_size - prompt} tokens"
        )
    config_kwargs = dict(n_layer=n_layer, n_embd=n_embd, n_head=n_head, block_size=block_size, vocab_size=256)
    dense, idx = _models_and_prompt(config_kwargs, batch, prompt, seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(p)
    try:
        dense_tokens = {}

        def timed(cache):
            t, dense_tokens[cache] = seconds(lambda: dense.generate(idx, new_tokens, kv_cache=cache))
            return t

        dense_times = _rounds(timed, rounds)
    finally:
        torch.set_num_threads(threads)
    ranks = run_processes(worker, p, config_kwargs, batch, prompt, new_tokens, rounds, seed, timeout=600, echo=False)
    reference = dense_tokens[False]
    rows = []
    for name, degree, times, tokens in (
        ("dense", 1, dense_times, dense_tokens),
        ("TP", p, ranks[0]["times"], ranks[0]["tokens"]),
    ):
        for cache in (False, True):
            best = min(times[cache])
            rows.append(
                dict(
                    model=name,
                    p=degree,
                    kv_cache=cache,
                    seconds=best,
                    tokens_per_second=batch * new_tokens / best,
                    same_tokens=bool(torch.equal(tokens[cache], reference)),
                )
            )
    speedup = {
        name: next(r for r in rows if r["model"] == name and r["kv_cache"])["tokens_per_second"]
        / next(r for r in rows if r["model"] == name and not r["kv_cache"])["tokens_per_second"]
        for name in ("dense", "TP")
    }
    setup = dict(config_kwargs, p=p, batch=batch, prompt=prompt, new_tokens=new_tokens, rounds=rounds, seed=seed)
    return {"setup": setup, "rows": rows, "speedup": speedup}


def table(result) -> str:
    """The benchmark's result as a text table."""
    s = result["setup"]
    lines = [
        f"GPT n_layer={s['n_layer']} n_embd={s['n_embd']} n_head={s['n_head']} block_size={s['block_size']}, "
        f"float32; B={s['batch']}, prompt {s['prompt']} tokens + {s['new_tokens']} new (greedy); "
        f"fastest of {s['rounds']} rounds",
        f"{'model':<7}{'p':>3}{'KV cache':>10}{'seconds':>10}{'tokens/s':>10}{'cache speed-up':>16}{'same tokens':>13}",
    ]
    for r in result["rows"]:
        gain = f"{result['speedup'][r['model']]:.2f}x" if r["kv_cache"] else ""
        lines.append(
            f"{r['model']:<7}{r['p']:>3}{'yes' if r['kv_cache'] else 'no':>10}{r['seconds']:>10.3f}"
            f"{r['tokens_per_second']:>10.0f}{gain:>16}{'yes' if r['same_tokens'] else 'NO':>13}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tputil.bench.kv_cache", description=__doc__.split("\n\n")[0])
    for name, default, what in (
        ("--p", 2, "tensor-parallel degree (processes)"),
        ("--n-layer", 4, "transformer blocks"),
        ("--n-embd", 256, "channels C"),
        ("--n-head", 8, "heads; p must divide it"),
        ("--block-size", 256, "context length"),
        ("--batch", 1, "sequences generated at once, B"),
        ("--prompt", 16, "prompt tokens"),
        ("--new-tokens", 240, "tokens to generate; prompt + new at most block_size"),
        ("--rounds", 3, "timed rounds; the fastest is kept"),
    ):
        parser.add_argument(name, type=int, default=default, help=f"{what} (default {default})")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k != "json"}
    return timing.run_command(parser, "python -m tputil.bench.kv_cache", argv, args.json, lambda: run(**options), table)


if __name__ == "__main__":
    from tputil.bench import kv_cache  # the package's module, not this __main__ copy: the ranks import worker

    raise SystemExit(kv_cache.main())
