"""`python -m swapper`."""

import sys

from swapper.cli import main

sys.exit(main())
