"""tputil: Megatron-style tensor parallelism, built step by step on a nanoGPT-style GPT.

The package behind the course in ``book/``. Each module derives one concept and says in its
docstring which chapter builds it. Import the modules you need, e.g. ``from tputil import lists``.
"""

__version__ = "0.1.0"
