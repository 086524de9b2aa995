"""The benchmark: the dense GPT, ours and PyTorch's tensor parallelism timed side by side.

``run`` (the command and its sizes and variants), ``ranks`` (what each process does: the
correctness guard, the interleaved timed rounds), ``report`` (the table), ``torch_tp`` (PyTorch's
``parallelize_module`` on our GPT; the only place that touches PyTorch's private distributed APIs),
``timing`` (timing whole runs on every rank, also for the chapters). Run ``python -m tputil.bench``
or ``python -m tputil bench``.
"""
