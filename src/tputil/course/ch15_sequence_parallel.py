"""Chapter 15, with sequence parallelism: PyTorch's plan (`bench.torch_tp.torch_sp_plan`) beside ours.

`compare` runs on each rank of `ch15_torch_api.side_by_side` (one start of the processes): our
`TPGPT(..., vocab_parallel=True, sequence_parallel=True)` (chapter 11) and PyTorch's
`torch_tp_model(..., sequence_parallel=True)` from the same dense float64 GPT and batch.

- The collectives of a forward and of a backward on both sides, by place (each block, and
  outside the blocks), kind, count and bytes: `by_place` marks where each block's forward and
  backward begin and end in the call log, `tally` sums the calls by place.
- What each side saves for backward in attention and the MLP (`activations.saved_bytes`): the
  reason for the backward's extra all-gathers on our side.
- The gradients of the parameters used on own tokens only. Ours: partial sums, summed by
  `all_reduce_sequence_parallel_grads` (one all-reduce). PyTorch's: the norms' gradients are
  DTensors with a `Partial` placement, summed by an all-reduce whenever something reads them
  whole (`full_tensor()`, `redistribute`, the optimizer's step), and a rank's `to_local()` is only
  its tokens' share. `all_reduce_partial_grads` sums them in one all-reduce, as ours does.
"""

from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.parallel import loss_parallel

from ..bench import torch_tp as btp
from ..shard import shard_state_dict
from ..tp_model import TPGPT
from . import activations

OUTSIDE = "outside"  # a call made outside every block (embedding, head, loss, optimizer)


@contextmanager
def by_place(blocks, size):
    """Yield a list that fills with (i, start, end): block i's forward or backward made calls [start, end).

    size(): how many calls the log holds now. Hooks on each block mark where its forward begins
    and ends and where its backward begins (the gradient of its output is ready) and ends (the
    gradient of its input is computed).
    """
    spans, began = [], {}

    def enter(i):
        began[i] = size()

    def leave(i):
        spans.append((i, began.pop(i), size()))

    handles = []
    for i, block in enumerate(blocks):
        handles += [
            block.register_forward_pre_hook(lambda m, a, i=i: enter(i)),
            block.register_forward_hook(lambda m, a, o, i=i: leave(i)),
            block.register_full_backward_pre_hook(lambda m, g, i=i: enter(i)),
            block.register_full_backward_hook(lambda m, gi, go, i=i: leave(i)),
        ]
    try:
        yield spans
    finally:
        for h in handles:
            h.remove()


def tally(records, spans, start=0, end=None) -> dict:
    """{place: {kind: (calls, bytes)}} of records[start:end] ([(kind, bytes), ...]) by by_place's spans."""
    where = {k: f"block {i}" for i, lo, hi in spans for k in range(lo, hi)}
    out = {}
    for k in range(start, len(records) if end is None else end):
        kind, nbytes = records[k]
        calls, total = out.setdefault(where.get(k, OUTSIDE), {}).get(kind, (0, 0))
        out[where.get(k, OUTSIDE)][kind] = (calls + 1, total + nbytes)
    return out


def _ours(dense, x, y, group):
    model = TPGPT.from_dense(dense, group=group, vocab_parallel=True, sequence_parallel=True)
    with group.stats.measure() as m, by_place(model.transformer.h, lambda: len(m.log)) as spans:
        _, loss = model(x, y)
        n = len(m.log)  # the forward's calls; the backward's follow
        loss.backward()
    log = [(r.kind, r.nbytes) for r in m.log]
    res = dict(fwd=tally(log, spans, 0, n), bwd=tally(log, spans, n))
    res["saved"] = activations.saved_bytes(model, lambda: model(x, y))
    return model, res


def _theirs(dense, x, y, mesh):
    model = btp.torch_tp_model(dense, mesh, vocab_parallel=True, sequence_parallel=True)
    with btp.CollectiveLog() as m, by_place(model.transformer.h, lambda: len(m.log)) as spans, loss_parallel():
        logits, loss = model(x, y)
        n = len(m.log)
        loss.backward()
    res = dict(fwd=tally(m.log, spans, 0, n), bwd=tally(m.log, spans, n))
    with loss_parallel():
        res["saved"] = activations.saved_bytes(model, lambda: model(x, y))
    return model, logits, loss, res


def _grads_of_own_tokens(ours, theirs, dense_grads, group):
    """What each side must sum after backward, and what summing costs."""
    rank, p = group.rank, group.world_size
    shard = shard_state_dict(dense_grads, ours.config, rank, p, plan=ours.plan)
    own = ours.sequence_parallel_parameters()
    res = {"ours_names": sorted(own), "ours_numbers": sum(w.numel() for w in own.values())}
    res["ours_before"] = max(float((w.grad - shard[n]).abs().max()) for n, w in own.items())
    with group.stats.measure() as m:
        ours.all_reduce_sequence_parallel_grads()
    res["ours_sum"] = (dict(m.calls), dict(m.bytes))
    res["ours_after"] = max(float((w.grad - shard[n]).abs().max()) for n, w in own.items())

    grads = {n: w.grad for n, w in theirs.named_parameters()}
    res["placements"] = {n: str(g.placements[0]) if isinstance(g, DTensor) else "plain" for n, g in grads.items()}
    partial = {n: g for n, g in grads.items() if isinstance(g, DTensor) and g.placements[0].is_partial()}
    res["partial_numbers"] = sum(g.numel() for g in partial.values())
    res["local_vs_dense"] = min(float((g.to_local() - dense_grads[n]).abs().max()) for n, g in partial.items())
    with btp.CollectiveLog() as m:
        whole = {n: g.full_tensor() for n, g in partial.items()}
    res["full_tensor"] = (m.calls, m.bytes)
    res["full_vs_dense"] = max(float((whole[n] - dense_grads[n]).abs().max()) for n in partial)
    res["still_partial"] = all(g.placements[0].is_partial() for g in partial.values())
    complete = {n: g for n, g in grads.items() if not isinstance(g, DTensor) or g.placements[0].is_replicate()}
    res["complete"] = sorted(complete)  # Replicate or plain: this rank's tensor is the whole gradient
    res["complete_vs_dense"] = max(
        float((btp.local_value(g) - dense_grads[n]).abs().max()) for n, g in complete.items()
    )
    return res, partial


def all_reduce_partial_grads(model) -> list:
    """Sum every Partial(sum) gradient of a torch_tp_model in one all-reduce, flattened; they become Replicate.

    PyTorch's side of `TPGPT.all_reduce_sequence_parallel_grads`: the local addends concatenated
    into one Partial DTensor, redistributed to Replicate (one all-reduce), split back. Call it after
    backward, on every rank; the optimizer's step then sends nothing for them. Returns the names.
    """
    partial = {
        n: w for n, w in model.named_parameters() if isinstance(w.grad, DTensor) and w.grad.placements[0].is_partial()
    }
    if partial:
        mesh = next(iter(partial.values())).grad.device_mesh
        parts = [w.grad.to_local() for w in partial.values()]
        flat = DTensor.from_local(torch.cat([g.reshape(-1) for g in parts]), mesh, [Partial()], run_check=False)
        total = flat.redistribute(placements=[Replicate()]).to_local()
        for w, g, t in zip(partial.values(), parts, total.split([g.numel() for g in parts])):
            w.grad = DTensor.from_local(t.view_as(g), mesh, [Replicate()], run_check=False)
    return list(partial)


OPTIMIZERS = {
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1),
    "AdamW": lambda params: torch.optim.AdamW(params, lr=0.1),
}


def _dense_step(dense, want, make) -> dict:
    """The dense model's weights after one step of make(params) with the gradients `want`."""
    params = {n: torch.nn.Parameter(w.detach().clone()) for n, w in dense.named_parameters()}
    for n, w in params.items():
        w.grad = want[n].clone()
    make(params.values()).step()
    return {n: w.detach() for n, w in params.items()}


def _steps(theirs, dense, want, partial, as_dense):
    """One optimizer step on PyTorch's model from the same weights, each against the dense model's step.

    On the DTensors as backward left them (the update reads each Partial gradient whole: it sums,
    each time it reads it); "to_local": the mistake, an SGD update on the local tensors (a rank's
    share taken for the gradient); after `redistribute` of the Partial gradients to Replicate.
    """
    params = dict(theirs.named_parameters())
    before = {n: w.detach().clone() for n, w in params.items()}
    res, weights = {}, {}

    def run(how, step, wanted):
        with torch.no_grad():
            for n, w in params.items():
                w.copy_(before[n])
        with btp.CollectiveLog() as m:
            step()
        got = weights[how] = as_dense({n: w.detach() for n, w in params.items()})
        res[how] = dict(calls=m.calls, bytes=m.bytes, diff=max(float((got[n] - wanted[n]).abs().max()) for n in got))

    wanted = {name: _dense_step(dense, want, make) for name, make in OPTIMIZERS.items()}
    for name, make in OPTIMIZERS.items():
        run(name, lambda make=make: make(params.values()).step(), wanted[name])

    def local_sgd():
        with torch.no_grad():
            for w in params.values():
                local = btp.local_value(w)
                local -= 0.1 * btp.local_value(w.grad)

    run("SGD on to_local()", local_sgd, wanted["SGD"])
    kept = {n: params[n].grad for n in partial}
    with btp.CollectiveLog() as m:
        summed = all_reduce_partial_grads(theirs)
    res["one all-reduce"] = dict(calls=m.calls, bytes=m.bytes, names=sorted(summed))
    run("SGD after one all-reduce", lambda: OPTIMIZERS["SGD"](params.values()).step(), wanted["SGD"])
    for n, g in kept.items():
        params[n].grad = g
    with btp.CollectiveLog() as m:
        for n in partial:
            params[n].grad = params[n].grad.redistribute(placements=[Replicate()])
    res["redistribute"] = dict(calls=m.calls, bytes=m.bytes)
    for name, make in OPTIMIZERS.items():
        after = f"{name} after redistribute"
        run(after, lambda make=make: make(params.values()).step(), wanted[name])
        res[name]["same_as_after"] = all(torch.equal(weights[name][n], weights[after][n]) for n in weights[name])
    return res


def compare(group, mesh, dense, x, y, want_logits, want_loss, want, as_dense):
    """One rank: ours and PyTorch's sequence-parallel models side by side (see the module docstring).

    want_*: the dense model's logits, loss and {name: gradient}; as_dense({name: tensor}) maps
    PyTorch's names and DTensors to the dense model's (`ch15_torch_api.torch_as_dense`).
    """
    ours, mine = _ours(dense, x, y, group)
    theirs, logits, loss, res = _theirs(dense, x, y, mesh)
    out = dict(ours=mine, torch=res)
    out["logits"] = float((btp.full_logits(logits.detach()) - want_logits).abs().max())
    out["loss"] = abs(float(btp.full_logits(loss.detach()) - want_loss))
    out["grads"] = max(
        float((g - want[n]).abs().max()) for n, g in as_dense({n: w.grad for n, w in theirs.named_parameters()}).items()
    )
    out["own_tokens"], partial = _grads_of_own_tokens(ours, theirs, want, group)
    out["steps"] = _steps(theirs, dense, want, partial, as_dense)
    return out
