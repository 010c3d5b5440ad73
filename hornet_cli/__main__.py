"""`python -m hornet_cli ...` is `hornet ...`."""

import sys

from hornet_cli import main

sys.exit(main())
