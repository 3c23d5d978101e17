"""argparse value types shared by every `glm-ray` subcommand: each error names the value given."""

from __future__ import annotations

import argparse


def int_at_least(low: int):
    """An argparse type: an integer >= low, the message naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def number_in(low: float, high: float, *, low_open: bool = False):
    """An argparse type: a float in [low, high] (or (low, high]), the message naming the value."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < value if low_open else low <= value) or value > high:
            raise argparse.ArgumentTypeError(f"{value} must be in {'(' if low_open else '['}{low}, {high}]")
        return value

    return parse


def device_arg(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N (glm_ray/device.py), the message naming the value."""
    from glm_ray.device import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
