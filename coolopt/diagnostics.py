r"""The kinetic temperature of paper Eq. 22 (mean squared displacement), for any optimizer."""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from coolopt import _checks

__all__ = ['KineticTemperatureState', 'kinetic_temperature', 'track_kinetic_temperature']


class KineticTemperatureState(NamedTuple):
  """State for :func:`track_kinetic_temperature`.

  Attributes:
    count: number of updates seen (int32).
    kinetic_temperature: the rescaled kinetic temperature :math:`T \\Delta t^2`
      of the last update at which it was computed (float32): the mean over all
      parameters of the squared update.
  """

  count: chex.Array
  kinetic_temperature: chex.Array


def track_kinetic_temperature(every: chex.Numeric = 1) -> optax.GradientTransformationExtraArgs:
  r"""Records the rescaled kinetic temperature of the updates; they pass unchanged.

  Place it last in a chain, so that it sees the final displacement
  :math:`\Delta x_{n+1}` that is added to the parameters (for CoolMomentum, the
  Langevin displacement; for Adam or SGD, their final update):

  .. math::

    T \Delta t^2 = \frac{1}{\mathrm{Size}} \sum_{i=1}^{\mathrm{Size}} \Delta x_{i,n+1}^2.

  Averaged over the steps of an epoch, this is paper Eq. 22, the quantity the
  paper plots to show that CoolMomentum anneals while Adam and momentum quench.
  Read it with :func:`coolopt.kinetic_temperature`. The mean is computed in float32.
  A complex parameter counts as two real ones, its real and imaginary parts (as
  `optax.contrib.split_real_and_imaginary` splits them, and as equipartition counts
  degrees of freedom): its :math:`\lvert \Delta x \rvert^2` is the sum of the two
  squares, and it counts twice in :math:`\mathrm{Size}`.

  It costs one more read of the updates per step: XLA's CPU backend does not fuse
  a reduction into the loop that produces its operand. A momentum SGD or
  CoolMomentum step makes six passes over parameter-sized arrays, so on CPU it
  takes a fifth to a third longer with the temperature (``docs/benchmarks.md``).
  With ``every=k`` the mean is computed at steps :math:`0, k, 2k, \\dots` only,
  under `jax.lax.cond`, and the last value is kept in between: the extra read is
  paid once in :math:`k` steps, and an average over an epoch becomes an average
  over the sampled steps.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import coolopt
    >>> opt = optax.chain(optax.sgd(0.5), coolopt.track_kinetic_temperature())
    >>> params = {'w': jnp.ones(3), 'b': jnp.zeros(1)}
    >>> state = opt.init(params)
    >>> grads = {'w': jnp.array([1.0, 2.0, 3.0]), 'b': jnp.array([4.0])}
    >>> updates, state = opt.update(grads, state, params)
    >>> print(coolopt.kinetic_temperature(state))  # (0.25 + 1 + 2.25 + 4) / 4
    1.875

  Args:
    every: compute the temperature at every ``every``-th update (an integer
      :math:`\\geq 1`), counting from the first; 1 computes it at every update.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Borysenko & Byshkin, Sci. Rep. 11, 10705 (2021), Eq. 22 and Fig. 1c.
  """
  _checks.check_scalar('every', every, allow_schedule=False)
  _checks.check_range('every', every, lower=1.0, upper=None)
  if _checks.is_concrete_number(every) and float(every) != int(every):
    raise ValueError(f'every must be an integer >= 1, got every={every!r}.')
  # A concrete 1 needs no branch; a traced `every` (inside `inject_hyperparams`)
  # cannot be tested in Python and goes through `lax.cond`.
  always = _checks.is_concrete_number(every) and int(every) == 1

  def init_fn(params: optax.Params) -> KineticTemperatureState:
    del params
    return KineticTemperatureState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32))

  def update_fn(updates, state, params=None):
    del params
    if always:
      temperature = mean_squared_update(updates)
    else:
      temperature = jax.lax.cond(
        state.count % every == 0, mean_squared_update, lambda _: state.kinetic_temperature, updates
      )
    return updates, KineticTemperatureState(optax.safe_increment(state.count), temperature)

  return optax.with_extra_args_support(optax.GradientTransformation(init_fn, update_fn))


def mean_squared_update(updates: optax.Updates) -> chex.Array:
  """Paper Eq. 22 for one step: the mean over all parameters of the squared update.

  In float32, each update read as the value of its own dtype (see
  :func:`_as_stored_float32`). :func:`track_kinetic_temperature` records it, and
  :func:`coolopt.scale_by_thermostat` steers on it: both measure the same temperature.
  """
  leaves = jax.tree.leaves(updates)
  # A complex update is two real ones: |u|^2 = Re(u)^2 + Im(u)^2 over two parameters.
  size = sum(leaf.size * (2 if jnp.iscomplexobj(leaf) else 1) for leaf in leaves)
  sum_of_squares = sum(jnp.sum(_squared_float32(leaf)) for leaf in leaves)
  return jnp.asarray(sum_of_squares, jnp.float32) / max(size, 1)


def _squared_float32(update: chex.Array) -> chex.Array:
  """The squared magnitude of `update` in float32, the sum of two squares if complex."""
  if jnp.iscomplexobj(update):
    return _squared_float32(jnp.real(update)) + _squared_float32(jnp.imag(update))
  return jnp.square(_as_stored_float32(update))


def _as_stored_float32(update: chex.Array) -> chex.Array:
  """`update` in float32, with the rounding to its own dtype kept.

  Under `jax.jit`, XLA may fuse a bfloat16 or float16 update with its producer and
  skip the rounding (excess precision), so the temperature would be that of the
  unrounded update rather than of the one returned and applied. (`reduce_precision`
  flushes float16 subnormals, below 6.1e-5, to zero: their squares do not count.)
  """
  value = update.astype(jnp.float32)
  if jnp.issubdtype(update.dtype, jnp.floating) and jnp.finfo(update.dtype).bits < 32:
    info = jnp.finfo(update.dtype)
    value = jax.lax.reduce_precision(value, exponent_bits=info.nexp, mantissa_bits=info.nmant)
  return value


def kinetic_temperature(opt_state: Any) -> chex.Array:
  """The rescaled kinetic temperature of the last update, found in any nested optimizer state.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import coolopt
    >>> opt = optax.chain(
    ...   coolopt.coolmomentum(learning_rate=0.5, rho_0=0.5, total_steps=10),
    ...   coolopt.track_kinetic_temperature(),
    ... )
    >>> params = jnp.zeros(2)
    >>> updates, state = opt.update(jnp.array([1.0, -1.0]), opt.init(params), params)
    >>> print(coolopt.kinetic_temperature(state))  # mean of (0.375 g)**2
    0.140625

  Args:
    opt_state: the state of an optimizer that contains :func:`track_kinetic_temperature`.

  Returns:
    The temperature (float32; with a leading axis per replica under `pmap`).

  Raises:
    ValueError: if the state holds no, or more than one, :class:`KineticTemperatureState`.
  """
  hint = (
    'add coolopt.track_kinetic_temperature() once, as the last transformation of the chain, e.g. '
    'optax.chain(coolopt.coolmomentum(...), coolopt.track_kinetic_temperature()).'
  )
  return _checks.find_state(opt_state, KineticTemperatureState, hint).kinetic_temperature
