"""What the command line prints (chapters 8, 9, 13 and 16), apart from running it (`cli`).

The model and the run described; `train`'s table of the TP loss beside the dense loss at every
step and its summary (the largest gap against `train.loss_tolerance`, the collectives of one step);
`generate`'s continuation beside the dense model's, and, where they differ, whether a near-tie
explains it. Only rank 0 prints (`cli.Context.say`); the exit codes are `cli`'s docstring's.
"""

import torch

from . import train as tr


def describe(config, args, ctx, dense):
    """The model's shape and size, the degree p and the backend, and the options that split more."""
    ctx.say(
        f"model: GPT n_layer={config.n_layer} n_head={config.n_head} n_embd={config.n_embd} "
        f"block_size={config.block_size} vocab_size={config.vocab_size} ({dense.num_params():,} parameters), "
        f"{args.dtype}"
    )
    ctx.say(
        f"tensor parallel over p={ctx.world_size} process(es), backend {ctx.backend}; the dense reference "
        f"runs on rank 0"
    )
    if args.vocab_parallel:
        ctx.say("vocabulary parallel: the embedding, the tied head and the loss are sharded over the vocabulary")
    if getattr(args, "sequence_parallel", False):
        ctx.say("sequence parallel: outside the tensor-parallel regions each rank keeps its own T/p tokens")


class LossTable:
    """`train`'s table: a step's TP loss, the dense loss and their gap, a row per step; `gaps` keeps the gaps."""

    def __init__(self, ctx, dtype_name: str):
        self.ctx, self.gaps = ctx, []
        self.digits = 7 if dtype_name == "float32" else 13
        self.width = self.digits + 4
        w = self.width
        ctx.say(f"{'step':>5} {'TP loss':>{w}} {'dense loss':>{w}} {'|TP - dense|':>13}")

    def row(self, step: int, loss: float, dense_loss: float):
        self.gaps.append(abs(loss - dense_loss))
        w, d = self.width, self.digits
        self.ctx.say(f"{step + 1:>5} {loss:>{w}.{d}f} {dense_loss:>{w}.{d}f} {self.gaps[-1]:>13.1e}")


def train_summary(args, config, ctx, losses, dense_losses, gaps, stats, seconds) -> int:
    """Rank 0's last lines of `train`: the losses, the largest gap, the collectives of one step
    (`stats`, its CommStats) and the time per step; 1 if a gap passed `train.loss_tolerance`, else 0."""
    dtype = getattr(torch, args.dtype)
    worst = max(range(args.steps), key=lambda s: gaps[s])
    bad = [s for s in range(args.steps) if gaps[s] > tr.loss_tolerance(dtype, s)]
    calls, nbytes = stats.calls.get("all_reduce", 0), stats.bytes.get("all_reduce", 0)
    tolerance = "1e-12" if dtype == torch.float64 else "5e-6 + 1e-7 per step"
    ctx.say(
        f"summary: {args.steps} steps; TP loss {losses[0]:.4f} -> {losses[-1]:.4f}, dense "
        f"{dense_losses[0]:.4f} -> {dense_losses[-1]:.4f}; largest |TP - dense| = {gaps[worst]:.1e} "
        f"(step {worst + 1}), tolerance {tolerance}"
    )
    where = (
        f"4 per layer and {calls - 4 * config.n_layer} for the embedding, head and loss"
        if args.vocab_parallel
        else f"{calls / config.n_layer:g} per layer"
    )
    if args.sequence_parallel:  # chapter 11: per layer 6 all-gathers and 4 reduce-scatters, no all-reduce
        gathers, scatters = stats.calls.get("all_gather", 0), stats.calls.get("reduce_scatter", 0)
        calls = f"{gathers} all-gathers, {scatters} reduce-scatters and {calls}"
        where = "6 all-gathers and 4 reduce-scatters per layer; all-reduces: the own-token gradients' sum" + (
            ", the loss's" if args.vocab_parallel else ""
        )
        nbytes = stats.total_bytes
    ctx.say(
        f"communication per training step on each rank: {calls} all-reduces ({where}), "
        f"{nbytes / 2**20:.2f} MiB; {1000 * seconds:.1f} ms per TP step"
    )
    if bad:
        ctx.say(
            f"MISMATCH: the TP loss left the dense loss at {len(bad)} step(s), first at step {bad[0] + 1}. "
            f"A gap at the first steps is a bug; one that appears late and then grows fast is training "
            f"amplifying rounding, as at a large learning rate (try a smaller --lr; see train.loss_tolerance)"
        )
        return 1
    ctx.say(f"OK: the TP loss matched the dense loss at every step, within the {args.dtype} tolerance")
    return 0


def compare_continuation(ctx, args, out, reference, seconds, *, unit, decode, how="", dense) -> int | None:
    """Rank 0 prints the prompt, the TP continuation `out` (`decode` turns a tensor of ids into text),
    its speed, and whether the dense model's `reference` is the same; None when it is, else the index
    of the first differing token. `unit` names a token ("byte"), `how` how the TP model generated,
    `dense` how the reference was. Used by `generate` and by its checkpoint options (cli_checkpoint)."""
    ctx.say(f"prompt: {args.prompt!r}")
    ctx.say(f"TP continuation ({args.new_tokens} {unit}s, greedy{how}): {decode(out)!r}")
    ctx.say(f"{args.new_tokens / seconds:.0f} tokens per second (TP, rank 0's wall clock)")
    if torch.equal(out, reference):
        ctx.say(f"OK: identical to the dense model's continuation ({dense})")
        return None
    first = int((out != reference).nonzero()[0])
    ctx.say(f"DIFFERENT from the dense model's from {unit} {first + 1} on: {decode(reference)!r}")
    return first


def explain_difference(args, config, ctx, dense, idx, out, reference, first: int) -> int:
    """`generate`'s TP tokens `out` left the dense model's `reference` at index `first` (after the
    prompt `idx`): 0 if training (`--steps`) or a near-tie of the dense logits explains it, else 1."""
    if args.steps:  # not necessarily a bug: see cli's docstring
        ctx.say(
            f"after {args.steps} training steps the two models' weights differ by rounding that training "
            f"amplified (a lot at a large --lr), which can flip a near-tie; with --steps 0 they must agree"
        )
        return 0
    # the same weights: only a near-tie, two logits within rounding, may go either way
    context = torch.cat([idx[0], reference[:first]])[None, -config.block_size :]  # (1, <= T)
    with torch.no_grad():
        logits = dense(context)[0][0, -1]  # (V,) the dense model's logits for the differing byte
    margin = (logits[reference[first]] - logits[out[first]]).abs().item()
    tie = margin <= (1e-4 if args.dtype == "float32" else 1e-10) * logits.abs().max().item()
    ctx.say(
        f"the dense logits of the two bytes differ by {margin:.1e}: "
        + ("a near-tie within rounding, not a bug" if tie else "more than rounding can explain: a bug")
    )
    return 0 if tie else 1
