"""The search space of our Optuna sweeper: Hydra's sweep syntax (`interval()`, `range()`,
`choice()`, `tag(log, ...)`, `tag(int, ...)`) read into Optuna's distributions, and each
trial's sampled values written back as the overrides of its Hydra job."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


class SearchError(Exception):
    """A search that cannot be carried out as configured."""


@dataclass(frozen=True)
class Space:
    """What each trial sets: a distribution per searched key, and the overrides every trial
    passes unchanged (as written: `+group=option`, `~key` and `key=value` alike)."""

    distributions: dict[str, BaseDistribution]
    prefixes: dict[str, str]  # "+" or "++" where the searched key is added, not changed
    fixed: tuple[str, ...]

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """One trial's job overrides: the fixed ones, then its sampled values."""
        sampled = [f"{self.prefixes.get(k, '')}{k}={Transformer.str(v)}" for k, v in params.items()]
        return [*self.fixed, *sampled]


def _primitive(value: Any, override: Override) -> Any:
    if not isinstance(value, str | int | float | bool | type(None)):
        raise SearchError(
            f"{override.input_line}: a choice must be of strings, numbers, booleans or null"
        )
    return value


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of a sweep override:
    - `interval(a, b)`: a float in [a, b]; `tag(log, interval(a, b))` on a log scale;
      `tag(int, interval(a, b))` an integer in [a, b] (with `log` too, on a log scale);
    - `range(start, stop[, step])`: as Hydra and Python mean it, `stop` excluded, so
      `range(1, 11)` is 1..10; integers or floats on the step's grid; `tag(log, ...)` for
      integers on a log scale (step 1);
    - `choice(a, b, ...)`, `a,b,...`, `glob(...)`, `shuffle(...)`: one of the values."""
    value = override.value()
    tags = getattr(value, "tags", set())
    unknown = tags - {"log", "int"}
    if unknown:
        raise SearchError(f"{override.input_line}: unknown tag {sorted(unknown)} (log, int)")
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if low is None or high is None or not low < high:
            raise SearchError(f"{override.input_line}: an interval needs low < high")
        if "int" in tags:
            if low != int(low) or high != int(high):
                raise SearchError(f"{override.input_line}: tag(int, ...) needs integer bounds")
            return IntDistribution(int(low), int(high), log="log" in tags)
        return FloatDistribution(float(low), float(high), log="log" in tags)
    if isinstance(value, RangeSweep) and not value.shuffle:
        points = list(value.range())
        if not points:
            raise SearchError(f"{override.input_line}: an empty range")
        if "log" in tags and value.step != 1:
            raise SearchError(f"{override.input_line}: tag(log, range(...)) needs step 1")
        if all(isinstance(p, int) for p in (value.start, value.stop, value.step)):
            return IntDistribution(points[0], points[-1], step=value.step, log="log" in tags)
        if "log" in tags:
            raise SearchError(f"{override.input_line}: tag(log, range(...)) needs integers")
        return FloatDistribution(float(points[0]), float(points[-1]), step=float(value.step))
    if isinstance(value, ChoiceSweep | RangeSweep) or override.is_sweep_override():
        if "log" in tags or "int" in tags:
            raise SearchError(f"{override.input_line}: tags apply to interval() and range()")
        choices = [_primitive(v, override) for v in override.sweep_iterator(Transformer.encode)]
        return CategoricalDistribution(choices)
    raise SearchError(f"{override.input_line}: not a sweep")  # pragma: no cover


def search_space(
    params: dict[str, str] | None, arguments: Sequence[str], config_loader: Any = None
) -> Space:
    """The search space of `hydra.sweeper.params` (key: sweep) and the command line's
    overrides. A key on the command line replaces the same key in `params`: a sweep there
    searches it instead, a plain value fixes it (`finetune.epochs=1`)."""
    lines = [f"{key}={value}" for key, value in (params or {}).items()]
    parser = OverridesParser.create(config_loader=config_loader)
    parsed = parser.parse_overrides([*lines, *arguments])
    by_key: dict[str, Override] = {}
    for override in parsed:
        by_key.pop(override.key_or_group, None)  # the later one wins, in its own place
        by_key[override.key_or_group] = override
    distributions: dict[str, BaseDistribution] = {}
    prefixes: dict[str, str] = {}
    fixed: list[str] = []
    for override in by_key.values():
        if not override.is_sweep_override():
            fixed.append(override.input_line)
            continue
        name = override.get_key_element().lstrip("+")
        distributions[name] = distribution(override)
        if override.is_add() or override.is_force_add():
            prefixes[name] = "++" if override.is_force_add() else "+"
    if not distributions:
        raise SearchError("nothing to search: set hydra.sweeper.params or sweep a key")
    return Space(distributions, prefixes, tuple(fixed))
