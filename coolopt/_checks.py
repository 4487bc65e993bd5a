"""Validation of hyperparameters and helpers shared by the transformations."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax


def is_concrete_number(value: Any) -> bool:
  """Whether `value` is a number known when the transformation is built.

  Traced values (inside `jit` or `optax.inject_hyperparams`) and schedules are
  not: they cannot be checked in Python and are taken as they are.
  """
  if isinstance(value, jax.core.Tracer) or callable(value):
    return False
  if isinstance(value, (int, float, np.number)):
    return True
  return isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0


def check_range(
  name: str,
  value: Any,
  *,
  lower: float | None = None,
  upper: float | None = None,
  lower_inclusive: bool = True,
  upper_inclusive: bool = False,
) -> None:
  """Raises `ValueError` if a concrete `value` lies outside the given range."""
  if not is_concrete_number(value):
    return
  x = float(value)
  ok = np.isfinite(x)
  if lower is not None:
    ok = ok and (x >= lower if lower_inclusive else x > lower)
  if upper is not None:
    ok = ok and (x <= upper if upper_inclusive else x < upper)
  if not ok:
    left = '[' if lower_inclusive else '('
    right = ']' if upper_inclusive else ')'
    lo = '-inf' if lower is None else f'{lower:g}'
    hi = 'inf' if upper is None else f'{upper:g}'
    raise ValueError(f'{name} must be in {left}{lo}, {hi}{right}, got {name}={value!r}.')


def check_schedule_or_positive(name: str, value: Any) -> None:
  """Checks a `ScalarOrSchedule`: a schedule, a traced value or a number > 0."""
  check_range(name, value, lower=0.0, lower_inclusive=False, upper=None)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(
      f'{name} must be one of {", ".join(map(repr, choices))}, got {name}={value!r}.'
    )


def split_kwargs_for(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
  """The subset of `kwargs` that `fn` accepts by name (all of them for `**kwargs`)."""
  try:
    parameters = inspect.signature(fn).parameters
  except (TypeError, ValueError):  # Builtins and some callables have no signature.
    return {}
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
    return dict(kwargs)
  accepted = {
    name
    for name, p in parameters.items()
    if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  }
  return {k: v for k, v in kwargs.items() if k in accepted}


def find_states(tree: Any, state_type: type) -> list[Any]:
  """Every node of type `state_type` in a (nested) optimizer state, in tree order."""
  found = optax.tree_utils.tree_get_all_with_path(tree, state_type.__name__)
  return [node for _, node in found if isinstance(node, state_type)]


def find_state(tree: Any, state_type: type, hint: str) -> Any:
  """The one node of type `state_type` in a (nested) optimizer state.

  Raises:
    ValueError: if there is none or more than one, with `hint` on what to do.
  """
  states = find_states(tree, state_type)
  if len(states) != 1:
    raise ValueError(
      f'opt_state must contain exactly one {state_type.__name__}, found {len(states)}: {hint}'
    )
  return states[0]


def key_data_and_impl(key: Any) -> tuple[jax.Array, Any]:
  """Raw uint32 key data and the PRNG implementation to wrap it with again.

  Takes an int seed (possibly traced by `optax.inject_hyperparams`; the default
  implementation), a typed `jax.random.key` of any implementation (threefry2x32,
  rbg, unsafe_rbg), or raw key data of the default implementation (the implementation
  is then None). A state holds the raw data, an integer array that orbax saves and
  `jnp.where` selects; `jax.random.wrap_key_data(data, impl=impl)` makes it a key.
  """
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key), jax.random.key_impl(key)
  if np.ndim(key) == 0:
    return jax.random.key_data(jax.random.key(key)), None
  return jax.numpy.asarray(key, jax.numpy.uint32), None
