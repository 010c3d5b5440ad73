"""`python -m model_export ...` is `hornet ...` (export, list, and the other subcommands)."""

import sys

from hornet_cli import main

sys.exit(main())
