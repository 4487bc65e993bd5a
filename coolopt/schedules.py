r"""Cooling schedules: the momentum coefficient :math:`\rho_n` as a function of the step.

Each function returns an `optax.Schedule`: a function of the step count
:math:`n = 0, 1, \dots` giving :math:`\rho_n`, clipped at 0. The schedules lower
:math:`\rho` from :math:`\rho_0` to 0 over :math:`S` steps (``total_steps``);
from step :math:`S` on the dynamics are overdamped and CoolMomentum is plain SGD.

They are computed in float32 (float64 when ``jax_enable_x64`` is on) whatever the
dtype of the hyperparameters, and written as powers of :math:`1 - n/S` rather than
as :math:`\alpha^n`: with :math:`\alpha = (1 - \rho_0)^{1/S}` a hair below 1, the
float32 rounding of :math:`\alpha` would be amplified :math:`n` times.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax.numpy as jnp
import optax

from coolopt import _checks

__all__ = ['exponential_cooling', 'friction_cooling', 'linear_cooling', 'staircase_decay']


def _as_default_float(x: chex.Numeric) -> chex.Array:
  """`x` as the default float dtype: float32, or float64 under x64."""
  return jnp.asarray(x, dtype=jnp.result_type(float))


def _cooling_schedule(
  rho_of_step: Callable[[chex.Array, chex.Array], chex.Array],
  rho_0: chex.Numeric,
  total_steps: chex.Numeric | None,
  warmup_steps: chex.Numeric,
) -> optax.Schedule:
  """A schedule from `rho_of_step(t, rho_0)`, `t = n/S`, with validation and warm-up.

  Without cooling (`total_steps=None`) rho stays `rho_0`; otherwise the value of
  `rho_of_step` is clipped at 0.
  """
  _checks.check_scalar('rho_0', rho_0, allow_schedule=False)
  _checks.check_range('rho_0', rho_0, lower=0.0, upper=1.0)
  if total_steps is not None:
    _checks.check_scalar('total_steps', total_steps, allow_schedule=False)
    _checks.check_range('total_steps', total_steps, lower=0.0, lower_inclusive=False, upper=None)
  _checks.check_scalar('warmup_steps', warmup_steps, allow_schedule=False)
  _checks.check_range('warmup_steps', warmup_steps, lower=0.0, upper=None)
  if (
    total_steps is not None
    and _checks.is_concrete_number(total_steps)
    and _checks.is_concrete_number(warmup_steps)
    and float(warmup_steps) > 0
    and float(warmup_steps) >= float(total_steps)
  ):
    # rho would be 0 before W and the schedule reaches 0 at S <= W: no momentum at all.
    raise ValueError(
      f'warmup_steps must be less than total_steps, got warmup_steps={warmup_steps!r} and '
      f'total_steps={total_steps!r}: rho is 0 during the warm-up and the cooling ends at '
      'total_steps, so rho would be 0 for the whole run. Shorten the warm-up or lengthen '
      'total_steps.'
    )

  def schedule(count: chex.Numeric) -> chex.Array:
    n = _as_default_float(count)
    rho0 = _as_default_float(rho_0)
    if total_steps is None:
      rho = jnp.full_like(n, rho0)
    else:
      # t = n * (1/S) rather than n / S: XLA rewrites division by a constant S as
      # this product, so a concrete and a traced S (`inject_hyperparams`) agree
      # bitwise. t is held at exactly 1 from S on: rho_S == 0 whatever the rounding,
      # and c**(1 - t) of the friction schedule cannot overflow to NaN later.
      total = _as_default_float(total_steps)
      t = jnp.where(n >= total, 1.0, n * (1.0 / total))
      rho = jnp.maximum(0.0, rho_of_step(t, rho0))
    # Warm-up zeroes rho before W and leaves the schedule unshifted after it.
    return jnp.where(n < _as_default_float(warmup_steps), jnp.zeros_like(rho), rho)

  return schedule


def exponential_cooling(
  rho_0: chex.Numeric, total_steps: chex.Numeric | None, warmup_steps: chex.Numeric = 0
) -> optax.Schedule:
  r"""The exponential cooling of CoolMomentum (paper Eqs. 20-21).

  .. math::

    \rho_n = \max\left(0,\; 1 - \frac{1 - \rho_0}{\alpha^n}\right),
    \qquad \alpha = (1 - \rho_0)^{1/S},

  so that :math:`\rho_S = 0`. With momentum warm-up, :math:`\rho_n = 0` for
  :math:`n < W` and the unshifted value above from :math:`n = W` on.

  Examples:
    >>> import coolopt
    >>> schedule = coolopt.exponential_cooling(rho_0=0.99, total_steps=100)
    >>> print(f'{schedule(0):.4f} {schedule(50):.4f} {schedule(100):.4f}')
    0.9900 0.9000 0.0000

  Args:
    rho_0: initial momentum coefficient :math:`\rho_0`, in [0, 1).
    total_steps: :math:`S`, the step at which :math:`\rho` reaches 0; ``None`` for
      no cooling (:math:`\alpha = 1`, :math:`\rho_n = \rho_0`).
    warmup_steps: :math:`W`, number of initial steps with :math:`\rho = 0`.

  Returns:
    An `optax.Schedule` of the step count.

  References:
    Borysenko & Byshkin, `CoolMomentum: a method for stochastic optimization by
    Langevin dynamics with simulated annealing <https://doi.org/10.1038/s41598-021-90144-3>`_,
    Sci. Rep. 11, 10705 (2021).
  """
  # (1 - rho_0) / alpha**n == (1 - rho_0) ** (1 - n/S), with t = n/S.
  return _cooling_schedule(
    lambda t, rho0: 1.0 - (1.0 - rho0) ** (1.0 - t), rho_0, total_steps, warmup_steps
  )


def linear_cooling(
  rho_0: chex.Numeric, total_steps: chex.Numeric | None, warmup_steps: chex.Numeric = 0
) -> optax.Schedule:
  r"""Cooling in which the temperature falls linearly to 0 over ``total_steps``.

  .. math::

    \rho_n = \max\left(0,\; \frac{\rho_0 (1 - n/S)}{\lvert 1 - \rho_0 n/S \rvert}\right).

  This is the same curve as the decaying momentum of Demon (Chen et al.), for which
  :math:`\rho_n / (1 - \rho_n)` falls linearly.

  Examples:
    >>> import coolopt
    >>> schedule = coolopt.linear_cooling(rho_0=0.9, total_steps=100)
    >>> print(f'{schedule(0):.4f} {schedule(50):.4f} {schedule(100):.4f}')
    0.9000 0.8182 0.0000

  Args:
    rho_0: initial momentum coefficient, in [0, 1).
    total_steps: :math:`S`; ``None`` for no cooling.
    warmup_steps: :math:`W`, number of initial steps with :math:`\rho = 0`; the
      unshifted schedule value from step :math:`W` on.

  Returns:
    An `optax.Schedule` of the step count.

  References:
    Borysenko & Byshkin, `CoolMomentum <https://github.com/borbysh/coolmomentum>`_,
    the authors' ``Coollin`` optimizer.

    Chen et al., `Demon: Improved Neural Network Training with Momentum Decay
    <https://arxiv.org/abs/1910.04952>`_, 2019.
  """
  return _cooling_schedule(
    lambda t, rho0: rho0 * (1.0 - t) / jnp.abs(1.0 - rho0 * t), rho_0, total_steps, warmup_steps
  )


def friction_cooling(
  rho_0: chex.Numeric, total_steps: chex.Numeric | None, warmup_steps: chex.Numeric = 0
) -> optax.Schedule:
  r"""Cooling in which the friction coefficient grows exponentially.

  With :math:`r_n = \gamma_n \Delta t / 2`, proportional to the friction (paper
  Eq. 15: :math:`\rho = (1 - r) / (1 + r)`):

  .. math::

    \rho_n = \max\left(0,\; \frac{1 - r_n}{1 + r_n}\right),\quad
    r_n = \frac{c}{\beta^n},\quad c = \frac{1 - \rho_0}{1 + \rho_0},\quad
    \beta = c^{1/S}.

  Examples:
    >>> import coolopt
    >>> schedule = coolopt.friction_cooling(rho_0=0.99, total_steps=100)
    >>> print(f'{schedule(0):.4f} {schedule(50):.4f} {schedule(100):.4f}')
    0.9900 0.8676 0.0000

  Args:
    rho_0: initial momentum coefficient, in [0, 1).
    total_steps: :math:`S`; ``None`` for no cooling.
    warmup_steps: :math:`W`, number of initial steps with :math:`\rho = 0`; the
      unshifted schedule value from step :math:`W` on.

  Returns:
    An `optax.Schedule` of the step count.

  References:
    Borysenko & Byshkin, `CoolMomentum <https://github.com/borbysh/coolmomentum>`_,
    the authors' ``Coolmom`` optimizer.
  """

  def rho_of_step(t, rho0):
    c = (1.0 - rho0) / (1.0 + rho0)
    r = c ** (1.0 - t)  # c / beta**n
    return (1.0 - r) / (1.0 + r)

  return _cooling_schedule(rho_of_step, rho_0, total_steps, warmup_steps)


# The clock cooling schedules by name, as `coolopt.coolmomentum(cooling=...)` takes them.
COOLING_SCHEDULES = {
  'exponential': exponential_cooling,
  'linear': linear_cooling,
  'friction': friction_cooling,
}


def staircase_decay(
  initial_value: chex.Numeric, steps_per_stair: chex.Numeric, factor: chex.Numeric
) -> optax.Schedule:
  r"""A value multiplied by `factor` every `steps_per_stair` steps.

  .. math::

    v_n = v_0 \, f^{\lfloor n / s \rfloor}

  `optax.exponential_decay(v_0, s, f, staircase=True)` computes the same, but tests its
  arguments with Python `if`s, which fail on traced values (`optax.inject_hyperparams`
  inside `jit`, or one value per run under `jax.vmap`); this one takes them traced.

  Args:
    initial_value: :math:`v_0`.
    steps_per_stair: :math:`s > 0`, the steps between two multiplications.
    factor: :math:`f`.

  Returns:
    The schedule :math:`n \mapsto v_n`.

  Example:
    >>> import coolopt
    >>> schedule = coolopt.staircase_decay(1.0, 10, 0.5)
    >>> [float(schedule(n)) for n in (0, 9, 10, 25)]
    [1.0, 1.0, 0.5, 0.25]
  """

  def schedule(count: chex.Numeric) -> chex.Array:
    stairs = jnp.floor(jnp.asarray(count, jnp.float32) / steps_per_stair)
    return initial_value * jnp.power(factor, stairs)

  return schedule
