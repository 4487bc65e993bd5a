"""Validation of hyperparameters and helpers shared by the transformations."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
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


def _describe(value: Any) -> str:
  """`value` for an error message: arrays by shape and dtype, other values by repr."""
  if isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer)):
    return f'an array of shape {tuple(np.shape(value))} and dtype {value.dtype}'
  return repr(value)


def check_scalar(name: str, value: Any, *, allow_schedule: bool = True) -> None:
  """Raises `ValueError` unless `value` is a real scalar or (if allowed) a schedule.

  A number, a 0-d array (traced or not) of a real dtype, or a callable (a
  schedule, where `allow_schedule`) passes; `None`, a string, a complex number or
  an array of any other shape is refused here, rather than failing at the first
  update with an error that does not name the argument.
  """
  expected = 'a real number (or 0-d array)'
  if callable(value) and not isinstance(value, (jax.Array, np.ndarray, jax.core.Tracer)):
    if allow_schedule:
      return
    raise ValueError(f'{name} must be {expected}, not a schedule, got {name}={value!r}.')
  if allow_schedule:
    expected += ' or a schedule of the step count'
  if value is None or isinstance(value, (str, bytes)):
    raise ValueError(f'{name} must be {expected}, got {name}={value!r}.')
  try:
    dtype = np.result_type(value.dtype if hasattr(value, 'dtype') else value)
  except TypeError:
    raise ValueError(f'{name} must be {expected}, got {name}={_describe(value)}.') from None
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)) and (
    dtype != np.bool_
  ):
    raise ValueError(f'{name} must be {expected}, got {name}={_describe(value)}.')
  if np.ndim(value) != 0:
    raise ValueError(
      f'{name} must be {expected}, got {name}={_describe(value)}: one value for all '
      'parameters is expected (use a schedule for a value that changes with the step).'
    )


def _low_precision_hint(value: Any) -> str:
  """A hint when `value` arrived in a float type narrower than float32.

  `optax.inject_hyperparams` casts numeric hyperparameters to the parameters'
  dtype: with bfloat16 parameters, rho_0 = 0.999 becomes 1.
  """
  dtype = getattr(value, 'dtype', None)
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits >= 32:
    return ''
  return (
    f' The value arrived in {np.dtype(dtype).name}, which rounds it: optax.inject_hyperparams '
    'casts hyperparameters to the dtype of the parameters unless it is given '
    'hyperparam_dtype=jnp.float32.'
  )


def check_range(
  name: str,
  value: Any,
  *,
  lower: float | None = None,
  upper: float | None = None,
  lower_inclusive: bool = True,
  upper_inclusive: bool = False,
) -> None:
  """Raises `ValueError` if `value` is not a scalar, or a concrete one lies outside the range."""
  check_scalar(name, value)
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
    raise ValueError(
      f'{name} must be in {left}{lo}, {hi}{right}, got {name}={value!r}.'
      + _low_precision_hint(value)
    )


def check_schedule_or_positive(name: str, value: Any) -> None:
  """Checks a `ScalarOrSchedule`: a schedule, a traced value or a number > 0."""
  check_range(name, value, lower=0.0, lower_inclusive=False, upper=None)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(
      f'{name} must be one of {", ".join(map(repr, choices))}, got {name}={value!r}.'
    )


def check_inexact_params(name: str, params: Any) -> None:
  """Refuses parameters with a leaf that is not floating-point or complex, naming it.

  An integer (or boolean) parameter cannot take a fractional step: the update cast
  to its dtype is truncated to 0, and a state of that dtype (a displacement, a
  moment) is truncated with it.

  Raises:
    ValueError: naming the first such leaf by its path, dtype and shape.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in leaves:
    dtype = jnp.result_type(leaf)
    if jnp.issubdtype(dtype, jnp.inexact):
      continue
    raise ValueError(
      f'{name} needs floating-point (or complex) parameters, got '
      f'params{jax.tree_util.keystr(path)} of dtype {dtype} and shape '
      f'{tuple(np.shape(leaf))}: a step cast to an integer dtype is truncated, so the '
      'parameter would not move. Cast it (e.g. x.astype(jnp.float32)), or keep it out of '
      'the optimizer with optax.partition.'
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


def _check_seed(name: str, seed: int) -> int:
  """`seed`, if distinct seeds in its range give distinct keys; a ValueError if not."""
  x64 = jax.config.jax_enable_x64
  lower, upper, bits = (-(2**63), 2**63, 64) if x64 else (0, 2**32, 32)
  if not lower <= seed < upper:
    raise ValueError(
      f'{name} must be an int seed in [{lower}, {upper}) or a jax.random key, got '
      f'{name}={seed!r}: jax.random.key keeps {bits} bits of a seed, so this one would '
      'give the key of another seed, or fail.'
    )
  return seed


def key_data_and_impl(key: Any, name: str = 'key') -> tuple[jax.Array, Any]:
  """Raw uint32 key data and the PRNG implementation to wrap it with again.

  Takes an int seed (possibly traced by `optax.inject_hyperparams`; the default
  implementation), a typed `jax.random.key` of any implementation (threefry2x32,
  rbg, unsafe_rbg), or raw key data of the default implementation (the implementation
  is then None). A state holds the raw data, an integer array that orbax saves and
  `jnp.where` selects; `jax.random.wrap_key_data(data, impl=impl)` makes it a key.

  Raises:
    ValueError: naming `name`, for anything else, and for an int seed outside
      the range in which distinct seeds give distinct keys: [0, 2**32) (JAX takes
      the seed modulo 2**32 unless `jax_enable_x64` is on), [-2**63, 2**63) with x64.
  """
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key), jax.random.key_impl(key)
  expected = (
    'an int seed, a typed jax.random.key(...) or raw key data (a uint32 array) of the '
    'default implementation'
  )
  if key is None or isinstance(key, (str, bytes, bool, np.bool_)):
    raise ValueError(f'{name} must be {expected}, got {name}={key!r}.')
  if isinstance(key, int):
    key = _check_seed(name, key)
  try:
    dtype = np.result_type(key.dtype if hasattr(key, 'dtype') else key)
  except TypeError:
    raise ValueError(f'{name} must be {expected}, got {name}={_describe(key)}.') from None
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f'{name} must be {expected}, got {name}={_describe(key)}.')
  if np.ndim(key) == 0:
    if isinstance(key, np.integer):
      _check_seed(name, int(key))
    return jax.random.key_data(jax.random.key(key)), None
  expected_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape
  if tuple(np.shape(key)) != tuple(expected_shape):
    raise ValueError(
      f'{name} as raw key data must have the shape {tuple(expected_shape)} of the default '
      f'PRNG implementation, got {name}={_describe(key)}; pass a typed '
      'jax.random.key(...) for other implementations.'
    )
  return jax.numpy.asarray(key, jax.numpy.uint32), None


def add_decayed_weights(weight_decay: Any, mask: Any) -> optax.GradientTransformation:
  """`optax.add_decayed_weights`, whose `init` checks that `mask` fits the parameters.

  Otherwise a mask of the wrong tree structure fails at the first update with a
  pytree error that names neither `mask` nor the two structures.
  """
  decay = optax.add_decayed_weights(weight_decay, mask)
  if mask is None:
    return decay

  def init_fn(params: optax.Params) -> optax.OptState:
    mask_tree = mask(params) if callable(mask) else mask
    try:
      flags = jax.tree.structure(mask_tree).flatten_up_to(params)
    except (ValueError, TypeError):
      raise ValueError(
        'mask must be a tree of booleans with the structure of the parameters (or a '
        'prefix of it), or a function of the parameters that returns one; got a mask '
        f'with structure {jax.tree.structure(mask_tree)} for parameters with structure '
        f'{jax.tree.structure(params)}.'
      ) from None
    del flags
    for flag in jax.tree.leaves(mask_tree):
      if not (isinstance(flag, (bool, np.bool_)) or getattr(flag, 'dtype', None) == np.bool_):
        raise ValueError(
          f'mask must hold booleans (True where weight decay applies), got a leaf {flag!r}.'
        )
    return decay.init(params)

  return decay._replace(init=init_fn)
