r"""CoolMomentum: momentum SGD as Langevin dynamics, cooled by lowering the momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from coolopt import _checks

__all__ = ['CoolMomentumState', 'scale_by_coolmomentum']


class CoolMomentumState(NamedTuple):
  """State for :func:`scale_by_coolmomentum`.

  Attributes:
    count: number of updates made so far (int32); the step :math:`n` at which
      the next update evaluates the schedules.
    displacement: :math:`\\Delta x_n`, the last displacement of every parameter.
  """

  count: chex.Array
  displacement: optax.Updates


def _value_at(value: optax.ScalarOrSchedule, count: chex.Array) -> chex.Array:
  """A number or a schedule at step `count`, in float32 (float64 under x64)."""
  value = value(count) if callable(value) else value
  return jnp.asarray(value, dtype=jnp.result_type(float))


def _check_accumulator_dtype(accumulator_dtype: Any | None) -> Any | None:
  """`accumulator_dtype` as a dtype, if it is None or floating-point; a ValueError if not."""
  if accumulator_dtype is None:
    return None
  try:
    dtype = jnp.dtype(accumulator_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
    raise ValueError(
      'accumulator_dtype must be None (the dtype of each parameter) or a floating-point '
      f'dtype such as jnp.float32, got accumulator_dtype={accumulator_dtype!r}: an integer '
      'displacement is truncated to 0.'
    )
  return dtype


def scale_by_coolmomentum(
  learning_rate: optax.ScalarOrSchedule,
  momentum: optax.ScalarOrSchedule,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Discretised Langevin dynamics with unit mass: the CoolMomentum update.

  For gradients :math:`g_n` (at the parameters :math:`x_n`), base learning rate
  :math:`\eta_n = \Delta t^2` and momentum coefficient :math:`\rho_n`
  (paper Eqs. 14-16 and Table 1):

  .. math::

    \Delta x_{n+1} = \rho_n \Delta x_n - \eta_n \frac{1 + \rho_n}{2} g_n,
    \qquad \Delta x_0 = 0,

  and the returned update is :math:`\Delta x_{n+1}` (the sign is included: add it
  to the parameters with `optax.apply_updates`). The state holds the displacement
  itself, so a change of :math:`\eta_n` or :math:`\rho_n` acts on the next step only;
  this is not `optax.sgd` with momentum, whose trace sums raw gradients.

  The update takes one optional extra argument, ``learning_rate_multiplier``
  (default 1): a factor on this step's :math:`\eta_n`. :func:`coolopt.metropolis`
  passes its step multiplier this way, so that the stored displacement is the move
  that was made.

  Complex parameters move as pairs of real ones: the rule, linear in :math:`g_n` and
  :math:`\Delta x_n` with a real :math:`\rho_n`, acts on the real and the imaginary
  part alike (as it would on the pairs of `optax.contrib.split_real_and_imaginary`).
  Integer parameters are refused: a step cast to an integer is truncated.

  Examples:
    >>> import jax.numpy as jnp
    >>> import coolopt
    >>> opt = coolopt.scale_by_coolmomentum(learning_rate=0.5, momentum=0.5)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.array([1.0, -2.0]), state, params)
    >>> print(updates)  # -0.5 * (1 + 0.5) / 2 * g
    [-0.375  0.75 ]
    >>> updates, state = opt.update(jnp.array([1.0, -2.0]), state, params)
    >>> print(updates)  # 0.5 * previous displacement - 0.375 * g
    [-0.5625  1.125 ]

  Args:
    learning_rate: :math:`\eta_n`, a number or a schedule of the step count.
    momentum: :math:`\rho_n`, a number or a schedule of the step count (for example
      :func:`coolopt.exponential_cooling`).
    accumulator_dtype: dtype of the displacement, floating-point (complex for
      complex parameters); ``None`` keeps the parameters'.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for an invalid hyperparameter, or, in ``init``, for a parameter that
      is not floating-point or complex (named by its path).
  """
  _checks.check_schedule_or_positive('learning_rate', learning_rate)
  _checks.check_range('momentum', momentum, lower=0.0, upper=1.0)
  accumulator_dtype = _check_accumulator_dtype(accumulator_dtype)

  def init_fn(params: optax.Params) -> CoolMomentumState:
    _checks.check_inexact_params('CoolMomentum', params)
    if accumulator_dtype is not None and not jnp.issubdtype(accumulator_dtype, jnp.complexfloating):
      for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if jnp.iscomplexobj(leaf):
          raise ValueError(
            f'accumulator_dtype={accumulator_dtype} is real, but params'
            f'{jax.tree_util.keystr(path)} is complex ({jnp.result_type(leaf)}): its '
            'displacement would lose its imaginary part. Pass a complex accumulator_dtype, '
            'or None to keep the dtype of each parameter.'
          )
    return CoolMomentumState(
      count=jnp.zeros([], jnp.int32),
      displacement=optax.tree_utils.tree_zeros_like(params, dtype=accumulator_dtype),
    )

  def update_fn(updates, state, params=None, *, learning_rate_multiplier=1.0, **extra_args):
    del params, extra_args
    rho = _value_at(momentum, state.count)
    eta = _value_at(learning_rate, state.count)
    if not (isinstance(learning_rate_multiplier, float) and learning_rate_multiplier == 1.0):
      eta = eta * jnp.asarray(learning_rate_multiplier, eta.dtype)
    step_size = eta * (1.0 + rho) / 2.0
    displacement = jax.tree.map(
      lambda g, dx: (rho * dx - step_size * g).astype(dx.dtype), updates, state.displacement
    )
    updates = jax.tree.map(lambda dx, g: dx.astype(g.dtype), displacement, updates)
    return updates, CoolMomentumState(optax.safe_increment(state.count), displacement)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
