"""The checks of single config fields, each failing with the field's name, its value and
what is allowed: what examples/schema.py checks the shared fields with, and each task of
examples/tasks.py its own."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import ml_collections


def invalid_field(field: str, value: Any, expected: str) -> ValueError:
  """The error for `config.<field>` holding `value` where `expected` was."""
  return ValueError(f'config.{field} must be {expected}, got config.{field}={value!r}.')


def check_choice(config: ml_collections.ConfigDict, field: str, choices: Iterable[str]) -> None:
  """Raises `invalid_field` unless `config.<field>` is one of `choices`."""
  choices = tuple(choices)
  if config[field] not in choices:
    raise invalid_field(field, config[field], 'one of ' + ', '.join(map(repr, choices)))


def is_number(value: Any) -> bool:
  """Whether `value` is a finite int or float (not a bool)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_number(
  config: ml_collections.ConfigDict,
  field: str,
  *,
  lower: float | None = None,
  upper: float | None = None,
  lower_inclusive: bool = True,
  upper_inclusive: bool = False,
  integer: bool = False,
) -> None:
  """Raises `invalid_field` unless `config.<field>` is a number (an integer with
  `integer`) between `lower` and `upper`, each bound included as its flag says."""
  value = config[field]
  ok = is_number(value) and (isinstance(value, int) or not integer)
  ok = ok and (lower is None or (value >= lower if lower_inclusive else value > lower))
  ok = ok and (upper is None or (value <= upper if upper_inclusive else value < upper))
  if not ok:
    kind = 'an integer' if integer else 'a number'
    left, right = '[' if lower_inclusive else '(', ']' if upper_inclusive else ')'
    low = '-inf' if lower is None else f'{lower:g}'
    high = 'inf' if upper is None else f'{upper:g}'
    raise invalid_field(field, value, f'{kind} in {left}{low}, {high}{right}')
