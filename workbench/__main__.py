"""`python -m workbench ...` (and `torchrun -m workbench ...`): the command line."""

import sys

from workbench.cli.commands import main

sys.exit(main())
