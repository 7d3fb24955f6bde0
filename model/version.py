"""The installed package's version, for every CLI's ``--version`` (no torch, no service dependencies)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    """The installed mt-service version."""
    try:
        return version("mt-service")
    except PackageNotFoundError:
        return "unknown (not installed)"
