r"""The aliases: CoolMomentum and SGD-SA, built from the primitives they chain.

As in optax, where `alias.py` stands apart from `transform.py`: the primitives
(:func:`coolopt.scale_by_coolmomentum`, :func:`coolopt.scale_by_thermostat`,
:func:`coolopt.metropolis`) import nothing from here, so no module of coolopt imports
another in a circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import chex
import optax

from coolopt import _checks, schedules
from coolopt.coolmomentum import scale_by_coolmomentum
from coolopt.metropolis import SGD_SA_LEARNING_RATES, metropolis
from coolopt.thermostat import scale_by_thermostat

__all__ = ['coolmomentum', 'sgd_sa']

COOLING_SCHEDULES = schedules.COOLING_SCHEDULES


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
  max_step: chex.Numeric | None = None,
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
      the thermostat, which sets :math:`\rho` itself from the first step.
    weight_decay: coupled L2 weight decay :math:`\lambda \geq 0`.
    mask: where to apply weight decay, as in `optax.add_decayed_weights`.
    accumulator_dtype: dtype of the displacement; ``None`` keeps the parameters'.
    target_path: the shape of the thermostat's target path. This and the next
      five apply with ``cooling='thermostat'`` only; ``None`` takes the default of
      :func:`coolopt.scale_by_thermostat`.
    hot_steps: the steps over which the thermostat measures :math:`T_0`.
    gain: the thermostat's gain.
    smoothing: the decay of the thermostat's moving averages of the temperatures.
    max_step: the thermostat's bound on the rms step relative to the rms parameter.
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
      ('max_step', max_step),
      ('axis_name', axis_name),
    )
    if value is not None
  }
  if cooling == 'thermostat':
    # A traced warm-up (inside `inject_hyperparams`) cannot be checked and is unused.
    if _checks.is_concrete_number(warmup_steps) and float(warmup_steps) != 0.0:
      raise ValueError(
        f"warmup_steps must be 0 with cooling='thermostat', got warmup_steps={warmup_steps!r}."
      )
    langevin = scale_by_thermostat(
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


def sgd_sa(
  learning_rates: Sequence[float] = SGD_SA_LEARNING_RATES,
  initial_temperature: float = 1.0,
  cooling_factor: float = 0.8,
  steps_per_epoch: int | None = None,
  key: int | chex.PRNGKey = 0,
  *,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""SGD-SA (Fischetti & Stringher, Algorithm 2): SGD with a random learning rate,
  accepted by the Metropolis criterion, cooled once per epoch.

  Each step draws a learning rate :math:`\eta` uniformly from ``learning_rates``,
  proposes :math:`w - \eta \nabla L(w)`, and accepts it with probability
  :math:`\min(1, e^{-\delta/T})` where :math:`\delta` is the loss change on the same
  minibatch; :math:`T` starts at ``initial_temperature`` and is multiplied by
  ``cooling_factor`` at the end of every epoch:
  :math:`T_n = T_0\,\alpha^{\lfloor n / N \rfloor}`.

  Examples:
    >>> import coolopt
    >>> opt = coolopt.sgd_sa(steps_per_epoch=390, key=0)

  Args:
    learning_rates: the set :math:`H` of learning rates.
    initial_temperature: :math:`T_0 > 0`.
    cooling_factor: :math:`\alpha \in (0, 1]`, applied once per epoch.
    steps_per_epoch: :math:`N`, the number of minibatches per epoch.
    key: an int seed or a `jax.random` key.
    axis_name: the mapped axis over which losses are averaged, if any (see
      :func:`metropolis`).

  Returns:
    A :func:`metropolis` around `optax.sgd` with learning rate 1.

  References:
    Fischetti & Stringher, `Embedded hyper-parameter tuning by Simulated Annealing
    <https://arxiv.org/abs/1906.01504>`_, 2019.
  """
  if steps_per_epoch is None:
    raise ValueError('sgd_sa needs steps_per_epoch, the number of minibatches in an epoch.')
  _checks.check_range(
    'steps_per_epoch', steps_per_epoch, lower=0.0, lower_inclusive=False, upper=None
  )
  _checks.check_range('initial_temperature', initial_temperature, lower=0.0, lower_inclusive=False)
  _checks.check_range(
    'cooling_factor',
    cooling_factor,
    lower=0.0,
    lower_inclusive=False,
    upper_inclusive=True,
    upper=1.0,
  )
  temperature = schedules.staircase_decay(initial_temperature, steps_per_epoch, cooling_factor)
  return metropolis(
    optax.sgd(1.0), temperature, multipliers=learning_rates, key=key, axis_name=axis_name
  )
