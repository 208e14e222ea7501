"""The small vocabulary the training config's rules are written in (:data:`twinflow.train.config.RULES`).

A :class:`Rule` says in words what a key accepts and turns a value into the one the run uses
(``"1e-3"`` -> 0.001), or raises :class:`ConfigError` naming the key, the value and what fits:
``training.checkpoint_every must be an integer >= 0, got 'abc'``. The builders below (``integer``,
``number``, ``choice``, ...) make the rules; booleans are never integers here, and numbers are
finite.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from twinflow.checks import is_integer
from twinflow.sampler import sampler_from_spec, split_specs
from twinflow.train.lora import lora_options


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


class Rule:
    """What one key accepts. ``accept`` returns the value the run uses (``"1e-3"`` -> 0.001)
    or raises ``ValueError`` (its text, if any, is the reason); ``expected`` says in words what fits."""

    def __init__(self, expected: str, accept: Callable[[Any], Any]):
        self.expected = expected
        self.accept = accept

    def check(self, value: Any, key: str) -> Any:
        """The accepted value, or ConfigError ``<key> must be <expected>, got <value>``."""
        try:
            return self.accept(value)
        except ConfigError:
            raise
        except (TypeError, ValueError) as error:
            reason = f" ({error})" if str(error) else ""
            raise ConfigError(f"{key} must be {self.expected}, got {value!r}{reason}") from None


def _as_number(value: Any) -> float:
    """YAML reads ``1e-3`` (no dot) as a string; accept it, refuse what is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError
    try:
        number = float(value)
    except ValueError:
        raise ValueError from None  # the message says what fits; float()'s words add nothing
    if not math.isfinite(number):
        raise ValueError
    return number


def _interval(minimum: float | None, maximum: float | None, open_minimum: bool, open_maximum: bool) -> str:
    if maximum is None:
        return "" if minimum is None else f" {'>' if open_minimum else '>='} {minimum:g}"
    return f" in {'(' if open_minimum else '['}{minimum:g}, {maximum:g}{')' if open_maximum else ']'}"


def _inside(value: float, minimum: float | None, maximum: float | None, open_minimum: bool, open_maximum: bool) -> bool:
    above = minimum is None or (value > minimum if open_minimum else value >= minimum)
    below = maximum is None or (value < maximum if open_maximum else value <= maximum)
    return above and below


def integer(minimum: int = 0) -> Rule:
    def accept(value: Any) -> int:
        if not is_integer(value) or value < minimum:
            raise ValueError
        return value

    return Rule("a positive integer" if minimum == 1 else f"an integer >= {minimum}", accept)


def number(
    minimum: float | None = None, maximum: float | None = None, open_minimum: bool = False, open_maximum: bool = False
) -> Rule:
    """A finite number within the bounds; ``open_*`` leave the bound itself out."""

    def accept(value: Any) -> float:
        result = _as_number(value)
        if not _inside(result, minimum, maximum, open_minimum, open_maximum):
            raise ValueError
        return result

    return Rule("a number" + _interval(minimum, maximum, open_minimum, open_maximum), accept)


def numbers(count: int, minimum: float, maximum: float, open_maximum: bool = False) -> Rule:
    """A list of ``count`` numbers within the bounds (``training.betas``)."""

    def accept(value: Any) -> list[float]:
        if not isinstance(value, (list, tuple)) or len(value) != count:
            raise ValueError
        result = [_as_number(item) for item in value]
        if not all(_inside(item, minimum, maximum, False, open_maximum) for item in result):
            raise ValueError
        return result

    return Rule(f"a list of {count} numbers" + _interval(minimum, maximum, False, open_maximum), accept)


def integers(minimum: int = 1) -> Rule:
    """A non-empty list of integers (``model.channels``); kept as given, a list or a tuple."""

    def accept(value: Any) -> Any:
        if not isinstance(value, (list, tuple)) or not value or not all(is_integer(v) and v >= minimum for v in value):
            raise ValueError
        return value

    return Rule("a list of positive integers" if minimum == 1 else f"a list of integers >= {minimum}", accept)


def boolean() -> Rule:
    def accept(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ValueError
        return value

    return Rule("true or false", accept)


def choice(*options: Any) -> Rule:
    def accept(value: Any) -> Any:
        if not any(type(value) is type(option) and value == option for option in options):  # 1 is not True
            raise ValueError
        return value

    return Rule(f"one of {list(options)}", accept)


def string() -> Rule:
    def accept(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise ValueError
        return value

    return Rule("a non-empty string", accept)


def optional(rule: Rule) -> Rule:
    return Rule(f"null or {rule.expected}", lambda value: None if value is None else rule.accept(value))


def device() -> Rule:
    def accept(value: Any) -> str:
        if not isinstance(value, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
            raise ValueError
        return value

    return Rule("auto, cpu, cuda, cuda:N or mps", accept)


def sampler_specs() -> Rule:
    """Sampler presets or one-line specs (``multi:steps=50``), read by the sampler's own parser;
    a comma-separated string (``--set sampling.presets=1nfe,2nfe``) becomes the list."""

    def accept(value: Any) -> list[str]:
        specs = split_specs(value) if isinstance(value, str) else value
        if not isinstance(specs, list) or not all(isinstance(spec, str) for spec in specs):
            raise ValueError
        for spec in specs:
            try:
                sampler_from_spec(spec)
            except ValueError as error:
                raise ValueError(f"{spec!r}: {error}") from None
        return specs

    return Rule("a list of sampler presets or specs like multi:steps=50", accept)


def lora() -> Rule:
    """``training.lora``, completed with the LoRA defaults; its own messages name the sub-key."""

    def accept(value: Any) -> dict | None:
        try:
            return lora_options(value)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    return Rule("null or a mapping like {rank: 16}", accept)
