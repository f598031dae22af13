"""Search spaces for `detr tune`: dotted config keys -> distributions, read from YAML.

A search-space file (``configs/tune/*.yaml``) is a flat mapping from the dotted keys that
``-o KEY=VALUE`` accepts to a distribution, or to a fixed value applied to every trial::

    train.lr: {loguniform: [1.0e-4, 1.0e-3]}     # log-uniform between low and high
    model.dropout: {uniform: [0.0, 0.2]}          # uniform between low and high
    model.dec_layers: {randint: [2, 5]}           # an integer, low <= n < high (like range())
    train.weight_decay: {choice: [0.0, 1.0e-4]}   # one of the options, at random
    train.batch_size: {grid: [4, 8]}              # every option: each sample runs all of them
    train.epochs: 6                               # fixed: the same for every trial
    data.train.view: {fixed: {max_images: 500}}   # a fixed mapping needs the explicit form

YAML reads ``1e-4`` (no dot) as text, not a number: write ``1.0e-4``. Every key and every value a
distribution can produce at its edges (both bounds, each option) is checked against the config
schema before anything runs, so a typo fails in a second instead of in each trial.

This module knows nothing of Ray; ``detr.search.tune`` turns the distributions into ``ray.tune`` ones.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from detr.config import Config, apply_overrides, read_yaml
from detr.errors import ConfigError

# Set by the search itself, never by the space: each trial trains in its own checkpoint directory,
# and only the sweep run (the base config's tracking section) talks to MLflow.
RESERVED_KEYS = {
    "train.checkpoint.dir": "each trial gets its own checkpoint directory inside its Ray working directory",
}
RESERVED_PREFIXES = {
    "tracking": "trials do not log to MLflow themselves: the sweep run does, with the base config's "
                "tracking section (set tracking.* there)",
}
# Keys that may be fixed but not searched.
NOT_SEARCHABLE = {
    "train.epochs": "ASHA decides how long each trial trains: give the budget as a fixed value "
                    "(train.epochs: 6) or in the base config",
    "train.eval_every_epochs": "ASHA compares trials on the metric of every epoch: it must be 1",
}
_KEY_PATTERN = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


# ---------------------------------------------------------------------------------------------
# distributions
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogUniform:
    low: float
    high: float

    def edges(self) -> tuple[Any, ...]:
        return (self.low, self.high)


@dataclass(frozen=True)
class Uniform:
    low: float
    high: float

    def edges(self) -> tuple[Any, ...]:
        return (self.low, self.high)


@dataclass(frozen=True)
class RandInt:
    low: int
    high: int  # exclusive, as in range() and ray.tune.randint

    def edges(self) -> tuple[Any, ...]:
        return (self.low, self.high - 1)


@dataclass(frozen=True)
class Choice:
    options: tuple[Any, ...]

    def edges(self) -> tuple[Any, ...]:
        return self.options


@dataclass(frozen=True)
class Grid:
    options: tuple[Any, ...]

    def edges(self) -> tuple[Any, ...]:
        return self.options


@dataclass(frozen=True)
class Fixed:
    value: Any

    def edges(self) -> tuple[Any, ...]:
        return (self.value,)


Distribution = LogUniform | Uniform | RandInt | Choice | Grid | Fixed
DISTRIBUTIONS = {"loguniform": LogUniform, "uniform": Uniform, "randint": RandInt, "choice": Choice,
                 "grid": Grid, "fixed": Fixed}
_NAMES = {cls: name for name, cls in DISTRIBUTIONS.items()}


def distribution_name(distribution: Distribution) -> str:
    return _NAMES[type(distribution)]


def describe(distribution: Distribution) -> dict[str, Any]:
    """The YAML form, e.g. ``{"loguniform": [0.0001, 0.001]}`` (JSON-able, for logging)."""
    name = distribution_name(distribution)
    if isinstance(distribution, Fixed):
        return {name: distribution.value}
    if isinstance(distribution, (Choice, Grid)):
        return {name: list(distribution.options)}
    return {name: [distribution.low, distribution.high]}


# ---------------------------------------------------------------------------------------------
# the space
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """Validated dotted key -> distribution, in file order; ``source`` names the file in errors."""

    parameters: Mapping[str, Distribution]
    source: str = "<search space>"

    @property
    def searched(self) -> dict[str, Distribution]:
        return {k: d for k, d in self.parameters.items() if not isinstance(d, Fixed)}

    @property
    def fixed(self) -> dict[str, Any]:
        return {k: d.value for k, d in self.parameters.items() if isinstance(d, Fixed)}

    def grid_size(self) -> int:
        """Trials per sample: Ray runs every grid combination once for each sample."""
        return math.prod(len(d.options) for d in self.parameters.values() if isinstance(d, Grid))

    def to_dict(self) -> dict[str, Any]:
        return {key: describe(d) for key, d in self.parameters.items()}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def check_against(self, config: Config) -> Config:
        """Apply the fixed values and each edge value of every distribution to ``config``; raise a
        ``ConfigError`` naming the file, key and value the schema rejects. Returns the config with
        the fixed values (what every trial starts from)."""
        first = {key: d.edges()[0] for key, d in self.parameters.items()}
        self._apply(config, first, key=None)
        for key, distribution in self.searched.items():
            for value in distribution.edges()[1:]:
                self._apply(config, {**first, key: value}, key=key)
        return apply_overrides(config, self.fixed, source=self.source)

    def _apply(self, config: Config, overrides: dict[str, Any], *, key: str | None) -> Config:
        try:
            return apply_overrides(config, overrides, source="the config schema")
        except ConfigError as error:
            if key is None:
                # Every key at its first value: name the key the schema rejects on its own, if any.
                for single_key, value in overrides.items():
                    self._apply(config, {single_key: value}, key=single_key)
                raise ConfigError(f"{self.source}: the first values of the keys do not fit together: {error}") from None
            distribution = self.parameters[key]
            which = "" if isinstance(distribution, Fixed) else f" (from {describe(distribution)})"
            raise ConfigError(f"{self.source}: '{key}' = {overrides[key]!r}{which} is rejected by {error}") from None


def load_search_space(path: str | Path) -> SearchSpace:
    path = Path(path)
    raw = read_yaml(path, what="search space file")
    return search_space_from_dict(raw, source=str(path))


def search_space_from_dict(raw: Any, *, source: str = "<search space>") -> SearchSpace:
    if not isinstance(raw, Mapping) or not raw:
        got = "an empty file" if not raw else type(raw).__name__
        raise ConfigError(
            f"{source}: a search space is a mapping of dotted config keys to distributions, e.g. "
            f"'train.lr: {{loguniform: [1.0e-4, 1.0e-3]}}'; got {got}"
        )
    parameters = {}
    for key, spec in raw.items():
        if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
            raise ConfigError(f"{source}: key {key!r} is not a dotted config key like 'train.lr'")
        _check_reserved(key, source)
        distribution = _parse_distribution(spec, f"{source}: '{key}'")
        if key in NOT_SEARCHABLE and not isinstance(distribution, Fixed):
            raise ConfigError(f"{source}: '{key}' cannot be searched: {NOT_SEARCHABLE[key]}")
        parameters[key] = distribution
    space = SearchSpace(parameters=parameters, source=source)
    if not space.searched:
        raise ConfigError(f"{source}: nothing to search: every key has a fixed value; give at least one of "
                          f"{', '.join(n for n in DISTRIBUTIONS if n != 'fixed')}")
    return space


def _check_reserved(key: str, source: str) -> None:
    if key in RESERVED_KEYS:
        raise ConfigError(f"{source}: '{key}' is set by the search ({RESERVED_KEYS[key]}); remove it")
    section = key.split(".")[0]
    if section in RESERVED_PREFIXES:
        raise ConfigError(f"{source}: '{key}': {RESERVED_PREFIXES[section]}")


def _parse_distribution(spec: Any, where: str) -> Distribution:
    if not isinstance(spec, Mapping):
        return Fixed(spec)
    accepted = ", ".join(DISTRIBUTIONS)
    if len(spec) != 1:
        raise ConfigError(
            f"{where}: a distribution is a mapping with one key ({accepted}), e.g. "
            f"{{loguniform: [1.0e-4, 1.0e-3]}}; got keys {list(spec)} (a fixed mapping is written {{fixed: ...}})"
        )
    ((name, args),) = spec.items()
    if name not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(name), DISTRIBUTIONS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: unknown distribution {name!r}{hint}; accepted: {accepted}")
    where = f"{where}: {name}"
    if name == "fixed":
        return Fixed(args)
    if name in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where} takes a non-empty list of options, e.g. {{{name}: [0.0, 1.0e-4]}}; "
                              f"got {args!r}")
        return DISTRIBUTIONS[name](tuple(args))
    low, high = _bounds(args, where, integers=name == "randint")
    if low >= high:
        raise ConfigError(f"{where}: low ({low}) must be below high ({high})"
                          + ("; high is exclusive, as in range()" if name == "randint" else ""))
    if name == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: bounds must be positive (the logarithm is sampled), got low {low}")
    return DISTRIBUTIONS[name](low, high)


def _bounds(args: Any, where: str, *, integers: bool) -> tuple[Any, Any]:
    kind = "integers" if integers else "numbers"
    example = "[2, 6]" if integers else "[1.0e-4, 1.0e-3]"
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where} takes [low, high] ({kind}), e.g. {example}; got {args!r}")
    for bound in args:
        wanted = int if integers else (int, float)
        if isinstance(bound, bool) or not isinstance(bound, wanted):
            hint = ""
            if isinstance(bound, str) and _looks_numeric(bound):
                hint = f" (YAML reads {bound!r} as text: write it with a dot, e.g. 1.0e-4)"
            raise ConfigError(f"{where}: bound {bound!r} is not one of the {kind} it takes{hint}")
        if not integers and not math.isfinite(bound):
            raise ConfigError(f"{where}: bound {bound!r} is not finite")
    return args[0], args[1]


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

