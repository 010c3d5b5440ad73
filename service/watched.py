"""Files the server reads again when they change while it serves (the API key file,
the TLS certificate and key): what tells one version of such a file from the next."""

from __future__ import annotations

import os
from pathlib import Path


def file_stamp(path: Path) -> tuple[int, ...]:
    """What changes when the file does (a Secret's update swaps the file behind a link)."""
    status = os.stat(path)
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
