"""`python -m qatpass ...`: the same as the `qatpass` command."""

import sys

from qatpass.cli import main

sys.exit(main())
