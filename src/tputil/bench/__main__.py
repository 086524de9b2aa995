"""`python -m tputil.bench`: the benchmark (`tputil.bench.run`)."""

import sys

from tputil.bench.run import main  # the package's module, not a __main__ copy: the ranks unpickle its classes

sys.exit(main())
