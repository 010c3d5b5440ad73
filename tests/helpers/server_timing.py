"""Reading a `Server-Timing` header (W3C Server Timing) as the server writes it."""

from __future__ import annotations

import re


def parse_server_timing(header: str) -> dict[str, float]:
    """name -> milliseconds, in the header's order; each entry `name;dur=MS;desc="..."`."""
    stages = {}
    for entry in header.split(", "):
        match = re.fullmatch(r'(\w+);dur=(\d+\.\d{3});desc="[^"]+"', entry)
        assert match, entry
        stages[match[1]] = float(match[2])
    return stages
