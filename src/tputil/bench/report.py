"""The benchmark's numbers, from every rank's raw timings to the one printed table (`tputil.bench`).

Per variant and phase (forward, training step): the time is the slowest rank's (the step ends when
the last rank finishes), the median over the repeats. The time inside our collectives is split in
two, call by call: the rank that arrives last at a collective waits only for the transfer itself,
so per call `transfer = min over ranks` and each rank's excess over it is waiting for the other
rank; both are medians over the repeats of per-run sums (waiting: the mean over the ranks).
"""

import statistics

COLUMNS = [
    ("variant", "{}", 40),
    ("fwd", "{:.1f}", 8),
    ("step", "{:.1f}", 9),
    ("comm_fwd", "{:.1f}", 10),
    ("comm_step", "{:.1f}", 11),
    ("fwd/dense", "{:.2f}x", 11),
    ("step/dense", "{:.2f}x", 12),
    ("fwd/torch", "{:.2f}x", 11),
    ("step/torch", "{:.2f}x", 12),
]
HEADERS = [
    "variant",
    "fwd ms",
    "step ms",
    "comm fwd",
    "comm step",
    "fwd/dense",
    "step/dense",
    "fwd/torch",
    "step/torch",
]


def _median_ms(runs_per_rank, reduce):
    """1e3 * median over the runs of reduce(this run's value on each rank); None without data."""
    runs_per_rank = [runs for runs in runs_per_rank if runs]
    if not runs_per_rank:
        return None
    return 1e3 * statistics.median(reduce(values) for values in zip(*runs_per_rank))


def _split_comm(calls_per_rank):
    """(calls, transfer ms, waiting ms): medians over the runs; see the module docstring."""
    if not all(calls_per_rank):
        return None, None, None
    transfer, waiting, n = [], [], 0
    for run in zip(*calls_per_rank):  # run: one list of per-call seconds for each rank
        if len({len(c) for c in run}) != 1:
            return None, None, None
        n = len(run[0])
        floor = sum(min(per_call) for per_call in zip(*run))
        transfer.append(floor)
        waiting.append(statistics.mean(sum(c) for c in run) - floor)
    return n, 1e3 * statistics.median(transfer), 1e3 * statistics.median(waiting)


def rows(size, per_rank, variants):
    """The table rows of one size from every rank's {variant: {measure: [per run]}} (see ranks._bench_size)."""
    out = {}
    for key, (label, _) in variants.items():
        if key not in per_rank[0]:
            continue
        ranks = [r[key] for r in per_rank]
        row = dict(size=size.name, variant=label, key=key)
        for phase in ("fwd", "step"):
            row[phase] = _median_ms([r[phase] for r in ranks], max)
            row["comm_" + phase] = _median_ms([r["comm_" + phase] for r in ranks], statistics.mean)
            row["calls_" + phase], row["transfer_" + phase], row["waiting_" + phase] = _split_comm(
                [r["calls_" + phase] for r in ranks]
            )
        out[key] = row
    for key, row in out.items():
        torch_key = variants[key][1]
        for phase in ("fwd", "step"):
            dense = out.get("dense", {}).get(phase)
            against = out.get(torch_key, {}).get(phase) if torch_key else None
            row[f"{phase}/dense"] = row[phase] / dense if dense and key != "dense" else None
            row[f"{phase}/torch"] = row[phase] / against if against else None
    return list(out.values())


def _cell(value, fmt, width, first):
    text = "-" if value is None else fmt.format(value)
    return ("  " + text).ljust(width) if first else text.rjust(width)


def format_table(result_rows, sizes, note="") -> str:
    """The one table: every size, every variant, times and ratios side by side; then where comm goes."""
    head = "".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, (_, _, w)) in enumerate(zip(HEADERS, COLUMNS)))
    lines = [head, "-" * len(head)]
    for size in sizes:
        c = size.config
        lines.append(
            f"{size.name}: {c.n_layer} layers, C={c.n_embd}, nh={c.n_head}, V={c.vocab_size}, "
            f"B={size.batch}, T={c.block_size}"
        )
        for row in (r for r in result_rows if r["size"] == size.name):
            lines.append("".join(_cell(row[name], fmt, width, i == 0) for i, (name, fmt, width) in enumerate(COLUMNS)))
    lines.append(
        "ms: median over the repeats of the slowest rank. comm: ms inside collectives, mean over the ranks "
        "(ours: timed; torch: profiled once).\nx/torch: against PyTorch TP with the same head and transport "
        "(the vocab variants: PyTorch's best plan, vocabulary-parallel head and loss_parallel)." + note
    )
    split = [r for r in result_rows if r.get("calls_fwd")]
    if split:
        lines.append(
            "\nOur time inside collectives = transfer (what the last rank to arrive waits) + waiting "
            "for the other rank, ms:"
        )
        for r in split:
            lines.append(
                f"  {r['size']:>5} {r['variant']:<36} forward: {r['calls_fwd']:3d} calls, "
                f"{r['transfer_fwd']:7.1f} + {r['waiting_fwd']:7.1f}   step: {r['calls_step']:3d} calls, "
                f"{r['transfer_step']:7.1f} + {r['waiting_step']:7.1f}"
            )
    return "\n".join(lines)
