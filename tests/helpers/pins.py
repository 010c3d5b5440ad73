"""Lock and constraints files, and `pip freeze` output: `name==version` lines (comments
and blank lines aside) as {canonical name: version}; and where an environment differs."""

from __future__ import annotations

from collections.abc import Iterable

from packaging.utils import canonicalize_name


def pinned_versions(lines: Iterable[str]) -> dict[str, str]:
    pins = (line.split("==") for line in lines if line and not line.startswith("#"))
    return {canonicalize_name(name): version for name, version in pins}


def mismatches(pinned: dict[str, str], installed: dict[str, str]) -> dict[str, tuple]:
    """{name: (pinned, installed or None)} for each pin the environment does not hold."""
    return {n: (v, installed.get(n)) for n, v in pinned.items() if installed.get(n) != v}
