"""A config key's allowed range, written once beside its type in a settings dataclass
(`prune: float = ranged(0.5, "[0, 1)")`) and checked by the experiment's config
validation before any work."""

import re
from dataclasses import field
from typing import Any


def ranged(default: Any, allowed: str, **kwargs: Any) -> Any:
    """A dataclass field whose value must lie in `allowed`: "[0, 1)", "(0, 1]", ">= 1", "> 0"."""
    return field(default=default, metadata={"range": allowed}, **kwargs)


_BOUND = re.compile(r"^([\[(])\s*(\S+),\s*(\S+)\s*([\])])$")


def in_range(value: float, allowed: str) -> bool:
    """Whether `value` lies in the range written as in `ranged`."""
    if interval := _BOUND.match(allowed):
        low_open, low, high, high_open = interval.groups()
        low_ok = value > float(low) if low_open == "(" else value >= float(low)
        high_ok = value < float(high) if high_open == ")" else value <= float(high)
        return low_ok and high_ok
    op, bound = allowed.split()
    return {">=": value >= float(bound), ">": value > float(bound)}[op]
