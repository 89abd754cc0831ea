"""`python -m orchestration` is the `projsweep` CLI."""

import sys

from orchestration.cli import main

sys.exit(main())
