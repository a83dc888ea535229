"""`python -m swapper`."""

import sys

from swapper.app.cli import main

sys.exit(main())
