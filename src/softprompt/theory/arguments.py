"""Argument types of ``softprompt theory``: a value out of range is an argparse usage error (exit code 2)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from .closed_form import ALL_REGIMES, REGIMES

__all__ = ["at_least", "finite_float", "int_list", "overrides", "regime_list"]


def int_list(text: str) -> list[int]:
    """``"1,10,20"`` -> ``[1, 10, 20]``: context lengths, non-negative integers."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one value")
    if min(vals) < 0:
        raise argparse.ArgumentTypeError(f"context lengths must be >= 0, got {text!r}")
    return vals


def at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (a smaller one is a usage error, exit code 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}{why}, got {value}")
        return value

    return parse


def finite_float(minimum: float, inclusive: bool) -> Callable[[str], float]:
    """An argparse type: a finite float above ``minimum`` (or equal to it when ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if inclusive else '>'} {minimum}, "
                                             f"got {text!r}")
        return value

    return parse


def regime_list(text: str) -> list[str]:
    """``"pt,jt"`` -> ``["pt", "jt"]``, each among :data:`~.closed_form.ALL_REGIMES`."""
    vals = [v.strip().lower() for v in text.split(",") if v.strip()]
    bad = [v for v in vals if v not in ALL_REGIMES]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"regimes must be among {','.join(ALL_REGIMES)}, got {text!r}")
    return vals


def overrides(text: str | None, cast: Callable[[str], Any]) -> dict[str, Any]:
    """Parse ``dec=60000,pt=20000`` into a dict."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        if "=" not in item:
            raise argparse.ArgumentTypeError(f"expected REGIME=VALUE pairs, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().lower()
        if k not in REGIMES:
            raise argparse.ArgumentTypeError(f"unknown regime {k!r} in {text!r}")
        try:
            out[k] = cast(v)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise argparse.ArgumentTypeError(f"{k}={v.strip()}: {exc}") from None
    return out
