r"""CoolMomentum: momentum SGD as Langevin dynamics, cooled by lowering the momentum."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from coolopt import _checks, schedules

__all__ = ['CoolMomentumState', 'coolmomentum', 'scale_by_coolmomentum']

COOLING_SCHEDULES = schedules.COOLING_SCHEDULES


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
    accumulator_dtype: dtype of the displacement; ``None`` keeps the parameters'.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  _checks.check_schedule_or_positive('learning_rate', learning_rate)
  _checks.check_range('momentum', momentum, lower=0.0, upper=1.0)

  def init_fn(params: optax.Params) -> CoolMomentumState:
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


def coolmomentum(
  learning_rate: optax.ScalarOrSchedule,
  rho_0: chex.Numeric,
  total_steps: chex.Numeric | None,
  *,
  cooling: str = 'exponential',
  warmup_steps: chex.Numeric = 0,
  weight_decay: chex.Numeric = 0.0,
  mask: Any | None = None,
  accumulator_dtype: Any | None = None,
  target_path: str | None = None,
  hot_steps: chex.Numeric | None = None,
  gain: chex.Numeric | None = None,
  smoothing: chex.Numeric | None = None,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""CoolMomentum: stochastic optimisation by Langevin dynamics with simulated annealing.

  Momentum SGD read as discretised Langevin dynamics (paper Eqs. 12-16), where the
  momentum coefficient :math:`\rho_n` is lowered from :math:`\rho_0` to 0 over
  ``total_steps`` :math:`S`. Lowering :math:`\rho` raises the friction, which cools
  the system: this is simulated annealing. From step :math:`S` on the dynamics are
  overdamped and the update is plain SGD with rate :math:`\eta/2`:

  .. math::

    g_n &\leftarrow g_n + \lambda x_n \\
    \Delta x_{n+1} &= \rho_n \Delta x_n - \eta_n \frac{1 + \rho_n}{2} g_n \\
    x_{n+1} &= x_n + \Delta x_{n+1}

  with :math:`\Delta x_0 = 0`, :math:`n` counted from 0, :math:`\eta_n` the base
  learning rate (the squared time step :math:`\Delta t^2`) and :math:`\lambda`
  the coupled weight decay (added to the gradient, as the authors' PyTorch code
  does). ``cooling`` picks :math:`\rho_n`, clipped at 0:

  - ``'exponential'`` (paper Eqs. 20-21): :math:`\rho_n = 1 - (1 - \rho_0)/\alpha^n`,
    :math:`\alpha = (1 - \rho_0)^{1/S}`; see :func:`coolopt.exponential_cooling`.
  - ``'linear'``: the temperature falls linearly,
    :math:`\rho_n = \rho_0 (1 - n/S) / |1 - \rho_0 n/S|`; see
    :func:`coolopt.linear_cooling`.
  - ``'friction'``: the friction grows exponentially; see
    :func:`coolopt.friction_cooling`.
  - ``'thermostat'`` (beyond the paper): :math:`\rho_n` is set by a feedback
    controller so that the measured kinetic temperature follows a target path
    :math:`T_0 f(n/S)`, whatever the learning rate and the gradient noise; see
    :func:`coolopt.scale_by_thermostat` and :func:`coolopt.thermostat_state`,
    which reads the measured and target temperatures.

  With ``warmup_steps`` :math:`W`, :math:`\rho_n = 0` for :math:`n < W` and the
  unshifted schedule value from :math:`n = W` on (the authors' ImageNet recipe).

  This follows the paper's Table 1 and the authors' TensorFlow optimizer. The
  authors' PyTorch ``SGD`` differs deliberately: it skips the first update and
  evaluates :math:`\rho` one step late.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import coolopt
    >>> f = lambda x: jnp.sum(x**2)
    >>> opt = coolopt.coolmomentum(learning_rate=0.1, rho_0=0.9, total_steps=50)
    >>> params = jnp.array([1.0, -2.0, 3.0])
    >>> state = opt.init(params)
    >>> for _ in range(50):
    ...   updates, state = opt.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{f(params):.1e}')
    3.6e-07

  Args:
    learning_rate: base learning rate :math:`\eta = \Delta t^2`, a number or an
      optax schedule of the step count.
    rho_0: initial momentum coefficient, in [0, 1).
    total_steps: :math:`S`, number of steps over which :math:`\rho` cools to 0
      (epochs x steps per epoch). Required: CoolMomentum without a cooling length
      is not CoolMomentum. An explicit ``None`` keeps :math:`\rho = \rho_0`
      (momentum SGD in the Langevin parametrisation, with no annealing).
    cooling: ``'exponential'``, ``'linear'``, ``'friction'`` or ``'thermostat'``.
    warmup_steps: number of initial steps with :math:`\rho = 0`; must be 0 with
      the thermostat, whose hot start needs :math:`\rho_0`.
    weight_decay: coupled L2 weight decay :math:`\lambda \geq 0`.
    mask: where to apply weight decay, as in `optax.add_decayed_weights`.
    accumulator_dtype: dtype of the displacement; ``None`` keeps the parameters'.
    target_path: the shape of the thermostat's target path. This and the next
      four apply with ``cooling='thermostat'`` only; ``None`` takes the default of
      :func:`coolopt.scale_by_thermostat`.
    hot_steps: the number of steps of the thermostat's hot start.
    gain: the thermostat's gain.
    smoothing: the decay of the thermostat's moving average of the temperature.
    axis_name: the `pmap`/`shard_map` axis over which the thermostat averages
      the measured temperature.

  Returns:
    An `optax.GradientTransformationExtraArgs`. For
    `optax.inject_hyperparams`, pass ``hyperparam_dtype=jnp.float32`` when the
    parameters are in bfloat16, so that :math:`\rho_0` is not rounded.

  References:
    Borysenko & Byshkin, `CoolMomentum: a method for stochastic optimization by
    Langevin dynamics with simulated annealing
    <https://doi.org/10.1038/s41598-021-90144-3>`_, Sci. Rep. 11, 10705 (2021).
  """
  _checks.check_schedule_or_positive('learning_rate', learning_rate)
  _checks.check_choice('cooling', cooling, (*COOLING_SCHEDULES, 'thermostat'))
  _checks.check_range('weight_decay', weight_decay, lower=0.0, upper=None)
  thermostat_options = {
    name: value
    for name, value in (
      ('target_path', target_path),
      ('hot_steps', hot_steps),
      ('gain', gain),
      ('smoothing', smoothing),
      ('axis_name', axis_name),
    )
    if value is not None
  }
  if cooling == 'thermostat':
    # Imported here: the thermostat module builds on this one.
    from coolopt import thermostat

    # A traced warm-up (inside `inject_hyperparams`) cannot be checked and is unused.
    if _checks.is_concrete_number(warmup_steps) and float(warmup_steps) != 0.0:
      raise ValueError(
        f"warmup_steps must be 0 with cooling='thermostat', got warmup_steps={warmup_steps!r}."
      )
    langevin = thermostat.scale_by_thermostat(
      learning_rate, rho_0, total_steps, accumulator_dtype=accumulator_dtype, **thermostat_options
    )
  else:
    if thermostat_options:
      raise ValueError(
        f"{', '.join(sorted(thermostat_options))} apply only with cooling='thermostat', "
        f'got cooling={cooling!r}.'
      )
    momentum = COOLING_SCHEDULES[cooling](rho_0, total_steps, warmup_steps)
    langevin = scale_by_coolmomentum(learning_rate, momentum, accumulator_dtype)
  decay = _checks.add_decayed_weights(weight_decay, mask)
  # A concrete zero skips the extra pass over the parameters; a traced one (inside
  # `inject_hyperparams`) cannot be tested in Python and is applied. The decay's
  # state stays either way: `inject_hyperparams` may build the optimizer with a
  # concrete zero in `init` and a traced one in a jitted `update`, and both must
  # agree on the structure of the state.
  if _checks.is_concrete_number(weight_decay) and float(weight_decay) == 0.0:
    decay = optax.GradientTransformation(
      decay.init, lambda updates, state, params=None: (updates, state)
    )
  return optax.chain(decay, langevin)
