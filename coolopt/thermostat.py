r"""A thermostat for CoolMomentum: the momentum follows the measured temperature, not the clock.

CoolMomentum's clock schedules lower :math:`\rho_n` as a fixed function of the step.
The kinetic temperature that results (paper Eq. 22) depends on the learning rate,
the gradient noise and the batch size, so the same schedule anneals along
different temperature paths from one setting to the next. Here :math:`\rho_n` is
the output of a feedback controller that makes the measured temperature follow a
target path :math:`T^*(n) = T_0 f(n/S)`, where :math:`T_0` is measured during a hot
start at :math:`\rho_0`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from coolopt import _checks, schedules
from coolopt.coolmomentum import CoolMomentumState, scale_by_coolmomentum
from coolopt.diagnostics import mean_squared_update

__all__ = ['ThermostatState', 'scale_by_thermostat', 'thermostat_state']

# The target paths have the shapes of the clock schedules.
TARGET_PATHS = schedules.COOLING_SCHEDULES

# Defaults, chosen from the measurements of benchmarks/thermostat.py (docs/thermostat.md).
DEFAULT_HOT_FRACTION = 0.05
DEFAULT_GAIN = 2.0
DEFAULT_SMOOTHING = 0.8


class ThermostatState(NamedTuple):
  """State for :func:`scale_by_thermostat`.

  The integer ``count`` is the clock of the target path; all the other leaves are
  floating point and describe the trajectory. Inside :func:`coolopt.metropolis`,
  which advances integer leaves on every proposal and rolls floating-point leaves
  back on a rejection, the target therefore moves on with every proposal while the
  measurement and the friction only see accepted moves: after a rejection the
  controller compares the last accepted temperature with a target that has moved
  on, as it should.

  Attributes:
    count: number of updates proposed so far (int32): the step :math:`n` of the next
      update, on which the target path and the end of cooling depend.
    log_friction: :math:`\\log r` of the controller for the next update after the hot
      start; :math:`\\rho = (1 - r)/(1 + r)` (paper Eq. 15).
    rho: :math:`\\rho` used by the last update (float32).
    kinetic_temperature: the smoothed measured temperature, an exponential moving
      average of the mean over all parameters of :math:`\\Delta x^2` (float32).
    hot_temperature: :math:`T_0`, the smoothed temperature at the end of the hot
      start (followed step by step until then).
    target_temperature: :math:`T^*(n)` of the last update; during the hot start,
      the smoothed temperature itself.
    coolmomentum: the state of the Langevin update (displacement and its own count).
  """

  count: chex.Array
  log_friction: chex.Array
  rho: chex.Array
  kinetic_temperature: chex.Array
  hot_temperature: chex.Array
  target_temperature: chex.Array
  coolmomentum: CoolMomentumState


def _as_float(x: chex.Numeric) -> chex.Array:
  return jnp.asarray(x, dtype=jnp.float32)


def _log_friction(rho: chex.Array) -> chex.Array:
  """:math:`\\log r` for :math:`r = (1 - \\rho)/(1 + \\rho)`, paper Eq. 15."""
  return jnp.log1p(-rho) - jnp.log1p(rho)


def scale_by_thermostat(
  learning_rate: optax.ScalarOrSchedule,
  rho_0: chex.Numeric,
  total_steps: chex.Numeric | None,
  *,
  target_path: str = 'exponential',
  hot_steps: chex.Numeric | None = None,
  gain: chex.Numeric = DEFAULT_GAIN,
  smoothing: chex.Numeric = DEFAULT_SMOOTHING,
  axis_name: str | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The CoolMomentum update with :math:`\rho_n` set by a thermostat.

  The update is :func:`coolopt.scale_by_coolmomentum`'s,
  :math:`\Delta x_{n+1} = \rho_n \Delta x_n - \eta_n \frac{1 + \rho_n}{2} g_n`, and
  the thermostat measures the kinetic temperature it produces, smoothed with
  decay :math:`\beta` (``smoothing``):

  .. math::

    \bar T_{n} = \beta \bar T_{n-1} + (1 - \beta) \frac{1}{\mathrm{Size}}
      \sum_i \Delta x_{i,n+1}^2.

  Hot start: for :math:`n < K` (``hot_steps``), :math:`\rho_n = \rho_0` and
  :math:`T_0 = \bar T_{K-1}`. Target path: :math:`T^*(n) = T_0 f(n/S)` with
  :math:`f(t) = r(\rho_0) / r(\rho^{c}(t))`, where :math:`r(\rho) = (1-\rho)/(1+\rho)`
  is the friction (paper Eq. 15) and :math:`\rho^{c}` is the clock schedule named
  by ``target_path``: it is the path the clock schedule would give if the gradient
  noise stayed as in the hot start (the temperature of Langevin dynamics driven
  by white noise is proportional to :math:`1/r`). :math:`f` falls from 1 to
  :math:`r(\rho_0)` at :math:`t = 1`. Controller, for :math:`n \geq K`:

  .. math::

    \log r_{n+1} = \mathrm{clip}\left(\log r_n
      + \log\frac{r^{c}_{n+1}}{r^{c}_n}
      + k (1 - \rho_n^2) \log\frac{\bar T_n}{T^*(n)},\; \log r(\rho_0),\; 0\right),

  a feed-forward of the clock's own friction increments plus a multiplicative
  correction with gain :math:`k` (``gain``), scaled by :math:`1 - \rho_n^2`, the
  rate per step at which the temperature relaxes, so that it corrects as fast near
  :math:`\rho_0` as in the overdamped end without overshooting; :math:`\rho_n = (1 - r_n)/(1 + r_n)`
  lies in :math:`[0, \rho_0]`, and :math:`\rho_n = 0` from step :math:`S` on. With
  :math:`k = 0` this is the clock schedule itself.

  Data parallelism: under `jax.pmap` or `shard_map`, give the ``axis_name`` over
  which replicas hold the same parameters; the measured temperature is averaged
  over it, so every replica computes the same :math:`\rho` even if the gradients
  it receives are not averaged. Under a sharded `jax.jit`, the arrays are global
  and nothing is needed.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import coolopt
    >>> opt = coolopt.coolmomentum(0.01, 0.99, 1000, cooling='thermostat')
    >>> update = jax.jit(opt.update)
    >>> x = jnp.ones(256)
    >>> state = opt.init(x)
    >>> for n in range(600):  # A quadratic with noisy gradients.
    ...   noise = jax.random.normal(jax.random.key(n), x.shape)
    ...   updates, state = update(x + noise, state, x)
    ...   x = optax.apply_updates(x, updates)
    >>> thermostat = coolopt.thermostat_state(state)
    >>> ratio = thermostat.kinetic_temperature / thermostat.target_temperature
    >>> print(bool(0.5 < ratio < 2.0), bool(0.0 < thermostat.rho < 0.99))
    True True

  Args:
    learning_rate: :math:`\eta`, a number or a schedule of the step count.
    rho_0: initial momentum coefficient and upper bound of :math:`\rho`, in [0, 1).
    total_steps: :math:`S`; ``None`` holds the target at :math:`T_0` (a
      constant-temperature thermostat, never overdamped).
    target_path: shape of the target path: that of the ``'exponential'``, ``'linear'``
      or ``'friction'`` clock schedule.
    hot_steps: :math:`K`, steps at :math:`\rho_0` over which :math:`T_0` is
      measured; ``None`` for :math:`\lceil 0.05 S \rceil`, or :math:`1/(1-\rho_0)`
      without ``total_steps``.
    gain: :math:`k \geq 0`, the correction of :math:`\log r` per step per unit of
      :math:`(1 - \rho^2) \log(\bar T / T^*)`.
    smoothing: :math:`\beta \in [0, 1)`, decay of the moving average of the
      measured temperature.
    axis_name: the `pmap`/`shard_map` axis over which the measured temperature is
      averaged, or ``None``.
    accumulator_dtype: dtype of the displacement; ``None`` keeps the parameters'.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its extra arguments are passed on to
    :func:`coolopt.scale_by_coolmomentum`.

  References:
    Borysenko & Byshkin, `CoolMomentum: a method for stochastic optimization by
    Langevin dynamics with simulated annealing
    <https://doi.org/10.1038/s41598-021-90144-3>`_, Sci. Rep. 11, 10705 (2021),
    Eqs. 15 and 22.

    Berendsen et al., `Molecular dynamics with coupling to an external bath
    <https://doi.org/10.1063/1.448118>`_, J. Chem. Phys. 81, 3684 (1984): a
    thermostat that steers the temperature by a multiplicative weak coupling.
  """
  _checks.check_schedule_or_positive('learning_rate', learning_rate)
  _checks.check_range('rho_0', rho_0, lower=0.0, upper=1.0)
  if total_steps is not None:
    _checks.check_range('total_steps', total_steps, lower=0.0, lower_inclusive=False, upper=None)
  _checks.check_choice('target_path', target_path, tuple(TARGET_PATHS))
  if hot_steps is not None:
    _checks.check_range('hot_steps', hot_steps, lower=1.0, upper=None)
  _checks.check_range('gain', gain, lower=0.0, upper=None)
  _checks.check_range('smoothing', smoothing, lower=0.0, upper=1.0)
  clock = TARGET_PATHS[target_path](rho_0, total_steps)

  def hot_length() -> chex.Array:
    if hot_steps is not None:
      return _as_float(hot_steps)
    if total_steps is None:
      return jnp.ceil(1.0 / (1.0 - _as_float(rho_0)))
    return jnp.ceil(DEFAULT_HOT_FRACTION * _as_float(total_steps))

  def init_fn(params: optax.Params) -> ThermostatState:
    zero = jnp.zeros([], jnp.float32)
    rho0 = _as_float(rho_0)
    return ThermostatState(
      count=jnp.zeros([], jnp.int32),
      log_friction=_log_friction(rho0),
      rho=rho0,
      kinetic_temperature=zero,
      hot_temperature=zero,
      target_temperature=zero,
      coolmomentum=scale_by_coolmomentum(learning_rate, rho0, accumulator_dtype).init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    n = _as_float(state.count)
    rho0 = _as_float(rho_0)
    hot = n < hot_length()
    cooled = jnp.zeros([], bool) if total_steps is None else n >= _as_float(total_steps)
    friction_rho = (1.0 - jnp.exp(state.log_friction)) / (1.0 + jnp.exp(state.log_friction))
    # At the lower clip of the friction rho is rho_0 exactly, not its rounded image.
    at_rho0 = hot | (state.log_friction <= _log_friction(rho0))
    rho = jnp.where(at_rho0, rho0, jnp.clip(friction_rho, 0.0, rho0))
    rho = jnp.where(cooled, 0.0, rho)

    inner = scale_by_coolmomentum(learning_rate, rho, accumulator_dtype)
    updates, inner_state = inner.update(updates, state.coolmomentum, params, **extra_args)

    measured = mean_squared_update(updates)
    if axis_name is not None:
      measured = jax.lax.pmean(measured, axis_name)
    # Behind a barrier, a concrete and a traced `smoothing` (`inject_hyperparams`)
    # compile to the same arithmetic: XLA would otherwise fold the concrete one.
    beta = jax.lax.optimization_barrier(_as_float(smoothing))
    # The average starts at the first non-zero measurement rather than at 0.
    smoothed = jnp.where(
      state.kinetic_temperature > 0.0,
      beta * state.kinetic_temperature + (1.0 - beta) * measured,
      measured,
    )
    hot_temperature = jnp.where(hot, smoothed, state.hot_temperature)
    # f(t) = r(rho_0) / r(clock(t)): the temperature the clock would give in steady noise.
    log_f = _log_friction(rho0) - _log_friction(clock(state.count))
    target_temperature = jnp.where(hot, smoothed, hot_temperature * jnp.exp(log_f))

    tiny = jnp.finfo(jnp.float32).tiny
    error = jnp.log(jnp.maximum(smoothed, tiny)) - jnp.log(jnp.maximum(target_temperature, tiny))
    feed_forward = _log_friction(clock(state.count + 1)) - _log_friction(clock(state.count))
    # The temperature relaxes at a rate of about 1 - rho**2 per step: a gain scaled by
    # it corrects as fast at every rho, without overshoot when rho is near 1.
    correction = _as_float(gain) * (1.0 - jnp.square(rho)) * error
    log_friction = state.log_friction + feed_forward + jnp.where(hot, 0.0, correction)
    log_friction = jnp.clip(log_friction, _log_friction(rho0), 0.0)
    new_state = ThermostatState(
      count=optax.safe_increment(state.count),
      log_friction=log_friction,
      rho=rho,
      kinetic_temperature=smoothed,
      hot_temperature=hot_temperature,
      target_temperature=target_temperature,
      coolmomentum=inner_state,
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def thermostat_state(opt_state: Any) -> ThermostatState:
  """The :class:`ThermostatState` in any nested optimizer state, for metrics and plots.

  Its fields ``kinetic_temperature`` (smoothed, measured), ``target_temperature``,
  ``hot_temperature`` and ``rho`` describe the last update (with a leading axis per
  replica under `pmap`).

  Raises:
    ValueError: if the state holds no, or more than one, :class:`ThermostatState`.
  """
  hint = "build the optimizer with coolopt.coolmomentum(..., cooling='thermostat')."
  return _checks.find_state(opt_state, ThermostatState, hint)
