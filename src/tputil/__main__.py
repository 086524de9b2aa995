"""`python -m tputil`: the command line (`tputil.cli`)."""

import sys

from .cli import main

sys.exit(main())
