r"""A thermostat for CoolMomentum: the momentum follows the measured temperature, not the clock.

CoolMomentum's clock schedules lower :math:`\rho_n` as a fixed function of the step.
The kinetic temperature that results (paper Eq. 22) depends on the learning rate,
the gradient noise and the batch size, so the same schedule anneals along
different temperature paths from one setting to the next. Here :math:`\rho_n` is
the output of a feedback controller, acting from the first step on, that makes the
measured temperature follow a target path :math:`T^*(n) = T_0 f(n/S)`, where
:math:`T_0` follows from the temperature of plain SGD by the Langevin relation
:math:`T \propto 1/r`, and that never lets the temperature run away where plain SGD
at :math:`\eta/2` would not.
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
# Share of the run over which T_0 is measured.
DEFAULT_HOT_FRACTION = 0.05
DEFAULT_GAIN = 2.0
DEFAULT_SMOOTHING = 0.8
# The bound on the rms step relative to the rms parameter, sqrt(T / <x^2>).
DEFAULT_MAX_STEP = 0.02


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
    log_friction: :math:`\\log r` of the controller for the next update;
      :math:`\\rho = (1 - r)/(1 + r)` (paper Eq. 15). 0 at the start: the first
      update is overdamped (:math:`\\rho = 0`).
    rho: :math:`\\rho` used by the last update (float32).
    kinetic_temperature: :math:`\\bar T`, the smoothed measured temperature, an
      exponential moving average of the mean over all parameters of
      :math:`\\Delta x^2` (float32).
    overdamped_temperature: :math:`\\bar\\Theta`, the smoothed temperature plain SGD
      at rate :math:`\\eta/2` would have with the same gradients, the mean of
      :math:`(\\eta g / 2)^2`.
    hot_temperature: :math:`T_0 = \\bar\\Theta / r(\\rho_0)`, followed step by step
      over the first ``hot_steps`` steps and fixed from then on.
    target_temperature: :math:`T^*(n)` of the last update.
    coolmomentum: the state of the Langevin update (displacement and its own count).
  """

  count: chex.Array
  log_friction: chex.Array
  rho: chex.Array
  kinetic_temperature: chex.Array
  overdamped_temperature: chex.Array
  hot_temperature: chex.Array
  target_temperature: chex.Array
  coolmomentum: CoolMomentumState


def _as_float32(x: chex.Numeric) -> chex.Array:
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
  max_step: chex.Numeric = DEFAULT_MAX_STEP,
  axis_name: str | None = None,
  accumulator_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The CoolMomentum update with :math:`\rho_n` set by a thermostat.

  The update is :func:`coolopt.scale_by_coolmomentum`'s,
  :math:`\Delta x_{n+1} = \rho_n \Delta x_n - \eta_n \frac{1 + \rho_n}{2} g_n`. On
  every step, the first included, the thermostat measures two temperatures (means
  over all parameters, smoothed with decay :math:`\beta`, ``smoothing``): the
  kinetic temperature of the update (paper Eq. 22) and the overdamped temperature,
  that of plain SGD at rate :math:`\eta_n/2` with the same gradients:

  .. math::

    \bar T_n = \beta \bar T_{n-1} + (1 - \beta)\, \langle \Delta x_{n+1}^2 \rangle,
    \qquad
    \bar\Theta_n = \beta \bar\Theta_{n-1} + (1 - \beta)\,
      \langle (\eta_n g_n / 2)^2 \rangle.

  Langevin dynamics with friction :math:`r(\rho) = (1-\rho)/(1+\rho)` (paper Eq. 15)
  driven by white noise has the temperature :math:`T = \Theta / r`, so the hot
  level is :math:`T_0 = \bar\Theta_n / r(\rho_0)`, followed over the first
  :math:`K` steps (``hot_steps``) and fixed from then on: no step runs at
  :math:`\rho_0` to measure it. Target path:

  .. math::

    T^*(n) = \min\left(T_0 f(n/S),\; \delta^2 \langle x_n^2 \rangle\right),
    \qquad f(t) = \frac{r(\rho_0)}{r(\rho^{c}(t))},

  where :math:`\rho^{c}` is the clock schedule named by ``target_path``: :math:`f` is
  the path the clock would give in steady white noise, falling from 1 to
  :math:`r(\rho_0)` at :math:`t = 1`. The bound :math:`\delta` (``max_step``) caps
  the rms step at a fraction :math:`\delta` of the rms parameter: the temperature
  at which momentum runs away (dead ReLUs, overflow) is set by the scale of the
  parameters, not by the learning rate, and the Langevin path alone would reach it
  at a large :math:`\eta`. Controller, on the friction, from :math:`\log r_0 = 0`
  (the first update is overdamped):

  .. math::

    e_n &= \log\frac{\bar T_n}{T^*(n)}, \\
    \log r_{n+1} &= \mathrm{clip}\left(\log r_n + \log\frac{r^{c}_{n+1}}{r^{c}_n}
      + k (1 - \rho_n^2)\, e_n + \max(0, e_n - \log 2),\;
      \log r(\rho_0),\; 0\right):

  a feed-forward of the clock's own friction increments; a correction with gain
  :math:`k` (``gain``) scaled by :math:`1 - \rho_n^2`, the rate per step at which
  the temperature relaxes, so that it corrects as fast near :math:`\rho_0` as in the
  overdamped end without overshooting; and, for a temperature more than twice the
  target, the excess added to :math:`\log r` at once, as :math:`T \propto 1/r`
  asks, whatever :math:`\rho`. :math:`\rho_n = (1 - r_n)/(1 + r_n)` lies in
  :math:`[0, \rho_0]`, and :math:`\rho_n = 0` from step :math:`S` on.

  The promise: a temperature more than twice the target raises the friction on the
  next step, at any :math:`\rho`, and at :math:`\rho = 0` the update is plain SGD
  at :math:`\eta/2`; the run is hotter than twice the target only while the
  temperature relaxes, or where plain SGD at :math:`\eta/2` is itself hotter. So
  where plain SGD at :math:`\eta/2` converges, the thermostat does too, at any
  :math:`\rho_0`, provided that steps below :math:`\delta` times the parameters'
  scale are safe. What it cannot do: heat (when the gradients fade, the temperature
  falls below the target even at :math:`\rho_0`), or cool below plain SGD at
  :math:`\eta/2`; and around parameters that shrink to 0 the bound holds it at
  :math:`\rho = 0`.

  Data parallelism: under `jax.pmap` or `shard_map`, give the ``axis_name`` over
  which replicas hold the same parameters; the measured temperatures are averaged
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
    >>> for n in range(600):  # A quadratic with its minimum at x = 1, noisy gradients.
    ...   noise = jax.random.normal(jax.random.key(n), x.shape)
    ...   updates, state = update(x - 1.0 + noise, state, x)
    ...   x = optax.apply_updates(x, updates)
    >>> thermostat = coolopt.thermostat_state(state)
    >>> ratio = thermostat.kinetic_temperature / thermostat.target_temperature
    >>> print(bool(0.5 < ratio < 2.0), bool(0.0 < thermostat.rho < 0.99))
    True True

  Args:
    learning_rate: :math:`\eta`, a number or a schedule of the step count.
    rho_0: the upper bound of :math:`\rho`, in [0, 1), and the :math:`\rho` whose
      white-noise temperature is :math:`T_0`.
    total_steps: :math:`S`; ``None`` holds the target at :math:`T_0` (a
      constant-temperature thermostat, never overdamped).
    target_path: shape of the target path: that of the ``'exponential'``, ``'linear'``
      or ``'friction'`` clock schedule.
    hot_steps: :math:`K`, the steps over which :math:`T_0` is measured; ``None`` for
      :math:`\lceil 0.05 S \rceil`, or :math:`1/(1-\rho_0)` without ``total_steps``.
    gain: :math:`k \geq 0`, the correction of :math:`\log r` per step per unit of
      :math:`(1 - \rho^2) \log(\bar T / T^*)`.
    smoothing: :math:`\beta \in [0, 1)`, decay of the moving averages of the
      measured temperatures.
    max_step: :math:`\delta > 0`, the bound on the rms step relative to the rms
      parameter, :math:`\sqrt{T^* / \langle x^2 \rangle} \leq \delta`.
    axis_name: the `pmap`/`shard_map` axis over which the measured temperatures are
      averaged, or ``None``.
    accumulator_dtype: dtype of the displacement; ``None`` keeps the parameters'.

  Returns:
    An `optax.GradientTransformationExtraArgs`; its extra arguments are passed on to
    :func:`coolopt.scale_by_coolmomentum`. Its update needs ``params``, for the bound.

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
  _checks.check_range('max_step', max_step, lower=0.0, lower_inclusive=False, upper=None)
  clock = TARGET_PATHS[target_path](rho_0, total_steps)

  def window_length() -> chex.Array:
    if hot_steps is not None:
      return _as_float32(hot_steps)
    if total_steps is None:
      return jnp.ceil(1.0 / (1.0 - _as_float32(rho_0)))
    return jnp.ceil(DEFAULT_HOT_FRACTION * _as_float32(total_steps))

  def init_fn(params: optax.Params) -> ThermostatState:
    zero = jnp.zeros([], jnp.float32)
    rho0 = _as_float32(rho_0)
    return ThermostatState(
      count=jnp.zeros([], jnp.int32),
      log_friction=zero,
      rho=zero,
      kinetic_temperature=zero,
      overdamped_temperature=zero,
      hot_temperature=zero,
      target_temperature=zero,
      coolmomentum=scale_by_coolmomentum(learning_rate, rho0, accumulator_dtype).init(params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
        'params must be given to the thermostat, got params=None: its safety bound is '
        'relative to the parameters.'
      )
    n = _as_float32(state.count)
    rho0 = _as_float32(rho_0)
    measuring = n < window_length()
    cooled = jnp.zeros([], bool) if total_steps is None else n >= _as_float32(total_steps)
    friction_rho = (1.0 - jnp.exp(state.log_friction)) / (1.0 + jnp.exp(state.log_friction))
    # At the lower clip of the friction rho is rho_0 exactly, not its rounded image.
    at_rho0 = state.log_friction <= _log_friction(rho0)
    rho = jnp.where(at_rho0, rho0, jnp.clip(friction_rho, 0.0, rho0))
    rho = jnp.where(cooled, 0.0, rho)

    eta = _as_float32(learning_rate(state.count) if callable(learning_rate) else learning_rate)
    multiplier = extra_args.get('learning_rate_multiplier', 1.0)
    gradients = updates  # g_n, before the update replaces them by the displacement
    inner = scale_by_coolmomentum(learning_rate, rho, accumulator_dtype)
    updates, inner_state = inner.update(updates, state.coolmomentum, params, **extra_args)

    # Behind a barrier, concrete and traced hyperparameters (`inject_hyperparams`)
    # compile to the same arithmetic: XLA would otherwise fold the concrete ones.
    eta, beta, max_step_, hot_factor = jax.lax.optimization_barrier(
      (
        eta * _as_float32(multiplier),
        _as_float32(smoothing),
        _as_float32(max_step),
        jnp.exp(-_log_friction(rho0)),
      )
    )
    measured = mean_squared_update(updates)
    # The overdamped temperature: that of plain SGD at rate eta/2 with these gradients.
    # Of the steps themselves, not (eta/2)^2 times <g^2>: a concrete and a traced eta
    # round alike that way.
    overdamped = mean_squared_update(jax.tree.map(lambda g: eta / 2.0 * g, gradients))
    bound = jnp.square(max_step_) * mean_squared_update(params)
    if axis_name is not None:
      measured, overdamped, bound = jax.lax.pmean((measured, overdamped, bound), axis_name)
    # The averages start at the first non-zero measurement rather than at 0.
    smoothed = jnp.where(
      state.kinetic_temperature > 0.0,
      beta * state.kinetic_temperature + (1.0 - beta) * measured,
      measured,
    )
    overdamped = jnp.where(
      state.overdamped_temperature > 0.0,
      beta * state.overdamped_temperature + (1.0 - beta) * overdamped,
      overdamped,
    )
    # T_0 by the Langevin relation T = Theta / r, measured over the first K steps.
    hot_temperature = jnp.where(measuring, overdamped * hot_factor, state.hot_temperature)
    # f(t) = r(rho_0) / r(clock(t)): the temperature the clock would give in steady noise.
    log_f = _log_friction(rho0) - _log_friction(clock(state.count))
    target_temperature = jnp.minimum(hot_temperature * jnp.exp(log_f), bound)

    tiny = jnp.finfo(jnp.float32).tiny
    error = jnp.log(jnp.maximum(smoothed, tiny)) - jnp.log(jnp.maximum(target_temperature, tiny))
    feed_forward = _log_friction(clock(state.count + 1)) - _log_friction(clock(state.count))
    # The temperature relaxes at a rate of about 1 - rho**2 per step: a gain scaled by
    # it corrects as fast at every rho, without overshoot when rho is near 1.
    correction = _as_float32(gain) * (1.0 - jnp.square(rho)) * error
    # More than twice the target: the excess raises the friction at once, by the
    # Langevin relation T ~ 1/r, whatever rho.
    emergency = jnp.maximum(error - jnp.log(2.0), 0.0)
    log_friction = state.log_friction + feed_forward + correction + emergency
    log_friction = jnp.clip(log_friction, _log_friction(rho0), 0.0)
    new_state = ThermostatState(
      count=optax.safe_increment(state.count),
      log_friction=log_friction,
      rho=rho,
      kinetic_temperature=smoothed,
      overdamped_temperature=overdamped,
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

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import coolopt
    >>> opt = optax.chain(
    ...   optax.clip_by_global_norm(1.0),
    ...   coolopt.coolmomentum(0.1, 0.9, 100, cooling='thermostat'),
    ... )
    >>> params = {'w': jnp.ones(3)}
    >>> state = opt.init(params)
    >>> gradients = {'w': jnp.array([0.1, -0.2, 0.3])}
    >>> updates, state = opt.update(gradients, state, params)
    >>> thermostat = coolopt.thermostat_state(state)
    >>> print(int(thermostat.count), float(thermostat.rho))  # The first step is overdamped.
    1 0.0
    >>> # At rho = 0 the update is SGD at rate lr/2: both temperatures are <(0.05 g)^2>.
    >>> print(f'{thermostat.kinetic_temperature:.3e} {thermostat.overdamped_temperature:.3e}')
    1.167e-04 1.167e-04

  Raises:
    ValueError: if the state holds no, or more than one, :class:`ThermostatState`.
  """
  hint = "build the optimizer with coolopt.coolmomentum(..., cooling='thermostat')."
  return _checks.find_state(opt_state, ThermostatState, hint)
