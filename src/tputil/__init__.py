"""tputil: Megatron-style tensor parallelism, built step by step on a nanoGPT-style GPT.

The package behind the course in ``book/``, in three layers:

- the core, which imports nothing else from the package: ``comm`` (groups, collectives, the f/g
  autograd pairs), ``model`` (the dense GPT), ``shard`` (the plan: how each dense tensor is split),
  ``layers`` (the parallel layers), ``tp_model`` (the tensor-parallel GPT), ``loss`` (the
  vocabulary-parallel loss and argmax);
- running it: ``launch`` (p processes from Python), ``train`` (data, optimizer, loop), ``cli``
  (``python -m tputil``, also under torchrun);
- support: ``course`` (what only the chapters use), ``bench`` (the benchmark, with PyTorch's own
  tensor parallelism), ``viz`` (the figures).
"""

__version__ = "0.1.0"
