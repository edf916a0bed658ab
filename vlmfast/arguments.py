"""Command-line argument types shared by the commands: a mistake exits 2 naming the option, before any work."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """A count that must be >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
