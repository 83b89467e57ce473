"""What the training commands' parsers share: range-checked numbers.

    p.add_argument("--lr", type=number(float, 0, above_low=True))   # refused at parsing: 0, -1, nan, inf

A refused value ends the command with argparse's usage error (exit 2) naming the option and the range,
e.g. `error: argument --lr: must be above 0, got 0`, before any model or data is loaded.
"""
from __future__ import annotations

import argparse
import math


def number(kind: type, low: float, high: float | None = None, below_high: bool = False, above_low: bool = False):
    """An argparse type: a finite int or float from `low` up to `high` (`above_low`, `below_high`: that bound
    itself excluded)."""
    def parse(text: str):
        value = kind(text)
        if math.isinf(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ((low < value if above_low else low <= value)
                and (high is None or (value < high if below_high else value <= high))):  # NaN too
            if high is None:
                bound = f"above {low}" if above_low else f"at least {low}"
            else:
                bound = f"in {'(' if above_low else '['}{low}, {high}{')' if below_high else ']'}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse
