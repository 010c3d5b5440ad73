"""`python -m service ...` is `hornet serve ...`."""

from __future__ import annotations

import sys

from service.cli import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
