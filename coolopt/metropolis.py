r"""Metropolis acceptance around any optimizer, and SGD-SA."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coolopt import _checks
from coolopt.coolmomentum import CoolMomentumState
from coolopt.diagnostics import KineticTemperatureState

__all__ = ['SGD_SA_LEARNING_RATES', 'MetropolisState', 'acceptance_rate', 'metropolis']

#: SGD-SA's learning-rate set H (Fischetti & Stringher): the rates from which
#: :func:`sgd_sa` draws one at every step, its default.
SGD_SA_LEARNING_RATES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.09, 0.08, 0.07, 0.06, 0.05)


class MetropolisState(NamedTuple):
  """State for :func:`metropolis`.

  Attributes:
    count: number of proposals made so far (int32); the step at which the
      temperature schedule is evaluated.
    key: the PRNG key (raw uint32 key data), split at every step.
    inner_state: the state of the wrapped optimizer: its trajectory (floating-point
      leaves) as of the last accepted move, its clock (integer leaves and injected
      hyperparameters) as of the last proposal.
    accepted: whether the last proposal was accepted (bool).
    num_accepted: number of accepted proposals (int32).
    delta: the loss change of the last proposal, candidate minus current (float32).
    temperature: the value of the temperature schedule at the last proposal
      (float32), as given: a non-positive or non-finite value acted as zero
      temperature.
  """

  count: chex.Array
  key: chex.PRNGKey
  inner_state: optax.OptState
  accepted: chex.Array
  num_accepted: chex.Array
  delta: chex.Array
  temperature: chex.Array


def _follows_clock(path: tuple[Any, ...], leaf: chex.Array) -> bool:
  """Whether a leaf of the inner state advances with every proposal.

  Step counters (optax's `count` fields and every other integer leaf) and PRNG keys
  (raw integer key data, or typed keys) are the clock; so are the hyperparameters
  that `optax.inject_hyperparams` stores. Floating-point (and boolean) leaves, the
  displacement, moments and accumulators, describe the trajectory.
  """
  dtype = jnp.result_type(leaf)
  if jnp.issubdtype(dtype, jnp.integer) or jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return True
  return any(getattr(entry, 'name', getattr(entry, 'key', None)) == 'hyperparams' for entry in path)


def _roll_back(accepted: chex.Array, new: optax.OptState, old: optax.OptState) -> optax.OptState:
  """`new` where accepted; otherwise the trajectory of `old` on the clock of `new`."""

  def select(path, new_leaf, old_leaf):
    if _follows_clock(path, new_leaf):
      return new_leaf
    return jnp.where(accepted, new_leaf, old_leaf)

  return jax.tree_util.tree_map_with_path(select, new, old)


def _as_scalar_loss(name: str, value: Any) -> chex.Array:
  """`value` as a scalar of at least float32 precision; a ValueError if not a scalar."""
  value = jnp.asarray(value)
  if jnp.iscomplexobj(value):
    raise ValueError(
      f'metropolis needs {name} to be a real scalar loss, got a complex one ({value.dtype}): '
      'the test compares the loss change with the temperature, which needs an order. Take '
      'the objective to minimise (e.g. jnp.abs(...) ** 2, or its real part).'
    )
  if value.ndim != 0:
    raise ValueError(
      f'metropolis needs {name} to be a scalar loss, got an array of shape {value.shape}: '
      'reduce it (e.g. with jnp.mean) before the Metropolis test, which takes one '
      'decision for the whole step.'
    )
  return value.astype(jnp.promote_types(value.dtype, jnp.float32))


def _check_schedule_at_zero(name: str, schedule: Any) -> None:
  """Refuses a schedule whose value at step 0 is known and is not a positive number.

  A schedule whose value depends on traced hyperparameters (inside
  `optax.inject_hyperparams` under `jit`) cannot be checked and is taken as it is.
  """
  if not callable(schedule):
    return
  value = schedule(jnp.zeros([], jnp.int32))
  if isinstance(value, jax.core.Tracer):
    return
  if np.ndim(value) != 0:
    raise ValueError(
      f'{name} must be a schedule of scalar values, got {np.ndim(value)}-d values '
      f'(shape {np.shape(value)}) at step 0.'
    )
  if not (np.isfinite(float(value)) and float(value) > 0):
    raise ValueError(
      f'{name} must be > 0: the schedule {schedule!r} gives {float(value)!r} at step 0.'
    )


def _check_multipliers(multipliers: Any) -> None:
  """Refuses multipliers that are not a non-empty sequence of positive finite numbers."""
  message = (
    f'multipliers must be a non-empty sequence of positive numbers, got '
    f'multipliers={multipliers!r}.'
  )
  if isinstance(multipliers, jax.core.Tracer):
    if not jnp.issubdtype(multipliers.dtype, jnp.number):
      raise ValueError(message)
    return
  if isinstance(multipliers, (int, float, str, bytes)) or np.ndim(multipliers) == 0:
    raise ValueError(message)
  try:
    values = np.asarray(multipliers, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise ValueError(message) from None
  if values.size == 0 or not np.all(values > 0) or not np.all(np.isfinite(values)):
    raise ValueError(message)


def metropolis(
  inner: optax.GradientTransformation,
  temperature: optax.ScalarOrSchedule,
  *,
  multipliers: Sequence[float] | None = None,
  key: int | chex.PRNGKey = 0,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Accepts or rolls back each step of ``inner`` by the Metropolis criterion.

  At step :math:`n` the inner optimizer proposes an update :math:`u` with a step
  multiplier :math:`m` drawn uniformly from ``multipliers``, and the candidate
  :math:`x' = x + u` is evaluated on the same minibatch. With
  :math:`\delta = L(x') - L(x)` it is accepted with probability

  .. math::

    p = \min\left(1, e^{-\delta / T_n}\right),

  so improving moves are always accepted and a non-finite :math:`L(x')` never is.

  **Zero temperature.** Where :math:`T_n \leq 0` or :math:`T_n` is not finite
  (a schedule that overshoots below zero, or overflows), the step is taken at zero
  temperature, the limit :math:`T \to 0^+` of the formula: a move with
  :math:`\delta \leq 0` is accepted (a move that leaves the loss unchanged
  included, as at every :math:`T > 0`) and a move with :math:`\delta > 0` is
  rejected. The state records the schedule's value as given. A concrete number
  :math:`T \leq 0` is refused when the transformation is built, and so is a
  schedule whose value at step 0 is known then and is not a positive number.

  **One clock.** A rejected move is rolled back: the update is zero and the inner
  optimizer's *trajectory* stays as it was (its floating-point state: CoolMomentum's
  displacement, momentum traces, Adam's moments, accumulators). Its *clock* advances
  with every proposal, accepted or not: integer leaves (the ``count`` of every optax
  state and of :func:`coolopt.coolmomentum`, other step counters, raw PRNG key data)
  and the hyperparameters stored by `optax.inject_hyperparams`. After :math:`N`
  proposals every schedule inside ``inner`` (cooling, learning-rate decay and
  warm-up, Adam's bias correction) reads step :math:`N`, as does the temperature
  :math:`T_n`: ``metropolis(coolmomentum(..., total_steps=S), T)`` reaches
  :math:`\rho = 0` at proposal :math:`S` whatever the acceptance rate.

  **The multiplier is the step's learning-rate factor.** The inner state after an
  accepted move is the one the inner optimizer would hold had it proposed the move
  itself with its learning rate multiplied by :math:`m`. For
  :func:`coolopt.coolmomentum` the multiplier reaches its update as the extra
  argument ``learning_rate_multiplier`` (the displacement stored is the one made);
  for other optimizers the proposal is :math:`m v` for the inner update :math:`v`,
  which is the same for every optax optimizer whose state does not depend on its
  learning rate (`optax.sgd` with or without momentum, Adam, RMSProp, ...). An inner
  chain that records its own output (:func:`coolopt.track_kinetic_temperature`) is
  refused with multipliers; place such a transformation after ``metropolis``.

  The update is called as ``update(updates, state, params, value=L(x), value_fn=L)``,
  where ``value`` is the loss already computed with the gradient, so a step costs
  exactly one extra forward pass, ``value_fn(params + u)``. Both must be scalars;
  :math:`\delta` is computed in float32 at least. Compute the loss in float32 when
  the model runs in bfloat16: a bfloat16 loss near 2 rounds a true :math:`\delta`
  of 0.002 to 0, and every such move is accepted. Extra keyword arguments that
  ``value_fn`` takes by name are passed on to it (for example ``batch=...``); all
  of them are passed to ``inner``.

  ``value_fn`` must compute the loss exactly as ``value`` was computed: the same
  minibatch, the same BatchNorm mode and the same dropout key, only discarding its
  batch-statistics update. Otherwise :math:`\delta` compares two different
  functions (say batch statistics against running averages) and the test is
  biased. It may also be another objective than the training loss, such as the
  minibatch error rate, and it must include every term the optimizer descends
  (an L2 penalty, say) for the test to judge that objective.

  **Composition.** The test judges the update it returns: transformations placed
  after ``metropolis`` in a chain must not change the update (a tracker such as
  :func:`coolopt.track_kinetic_temperature` may follow; `optax.scale`,
  `optax.contrib.reduce_on_plateau` or a clipping step belong inside ``inner``).
  Weight decay added after the test would move the parameters by a step that was
  never tested.

  **Not inside** `optax.MultiSteps`. MultiSteps calls its inner update at every
  micro-step: the test would evaluate ``value_fn`` and take a decision once per
  micro-batch, on that micro-batch alone, and keep only the last one. ``metropolis``
  cannot see that it is wrapped (nothing public in optax says so), so this rule is
  the user's to keep: accumulate the gradient and the loss over the micro-batches in
  the train step, and call the optimizer once per step with a ``value_fn`` that
  evaluates the candidate on all of them::

    def mean_loss(p):  # the loss over the k micro-batches, one at a time
      return jnp.mean(jax.lax.map(lambda batch: loss_fn(p, *batch), micro_batches))

    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss, value_fn=mean_loss)

  ``metropolis(coolopt.coolmomentum(...), T)`` is annealed Langevin dynamics with a
  Metropolis correction: each CoolMomentum step is a proposal, accepted by the
  Boltzmann criterion at the temperature ``T``.

  With ``axis_name`` (under `pmap` or `shard_map`), ``value`` and the candidate
  loss are averaged over that axis before the test; the key, identical on every
  replica, makes every replica take the same decision, so parameters stay in
  lock-step. Under `jit` with sharded global arrays no axis name is needed.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import coolopt
    >>> loss = lambda x: jnp.sum((x - 1.0) ** 2)
    >>> opt = coolopt.metropolis(optax.sgd(0.1), temperature=1e-3, key=0)
    >>> params = jnp.zeros(3)
    >>> state = opt.init(params)
    >>> for _ in range(50):
    ...   value, grad = jax.value_and_grad(loss)(params)
    ...   updates, state = opt.update(grad, state, params, value=value, value_fn=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{loss(params):.4f}, acceptance rate {coolopt.acceptance_rate(state):.2f}')
    0.0000, acceptance rate 1.00

  Args:
    inner: the optimizer whose steps are proposed.
    temperature: :math:`T_n > 0`, a number or a schedule of the step count; a
      step at which the schedule is not positive and finite runs at zero
      temperature.
    multipliers: the set :math:`H` of step multipliers, drawn uniformly; default
      ``(1.0,)``.
    key: an int seed, or a `jax.random` key of any implementation (``threefry2x32``,
      ``rbg``, ``unsafe_rbg``); the state keeps its raw data, so orbax saves it.
    axis_name: the mapped axis over which losses are averaged, if any.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose update requires the keyword
    arguments ``value`` and ``value_fn``.

  Raises:
    ValueError: when built, if ``temperature``, a schedule's value at step 0,
      ``multipliers`` or ``key`` is invalid; in ``init``, for a parameter that is not
      floating-point or complex (named by its path); at trace time, if ``params`` is
      None, ``value`` or the result of ``value_fn`` is not a real scalar, or multipliers meet an
      inner optimizer that records its own output.

  References:
    Fischetti & Stringher, `Embedded hyper-parameter tuning by Simulated Annealing
    <https://arxiv.org/abs/1906.01504>`_, 2019.

    Metropolis et al., Equation of state calculations by fast computing machines,
    J. Chem. Phys. 21, 1087 (1953).
  """
  _checks.check_schedule_or_positive('temperature', temperature)
  _check_schedule_at_zero('temperature', temperature)
  multipliers = (1.0,) if multipliers is None else multipliers
  _check_multipliers(multipliers)
  inner = optax.with_extra_args_support(inner)
  key_data, key_impl = _checks.key_data_and_impl(key)
  # The default (1.0,) needs no draw and leaves the update untouched.
  multiplied = isinstance(multipliers, jax.core.Tracer) or tuple(multipliers) != (1.0,)

  def temperature_at(count):
    value = temperature(count) if callable(temperature) else temperature
    return jnp.asarray(value, jnp.float32)

  def init_fn(params: optax.Params) -> MetropolisState:
    # Integer leaves of the inner state are its clock, never rolled back: the state
    # of integer parameters would keep a rejected move.
    _checks.check_inexact_params('metropolis', params)
    return MetropolisState(
      count=jnp.zeros([], jnp.int32),
      key=key_data,
      inner_state=inner.init(params),
      accepted=jnp.ones([], jnp.bool_),
      num_accepted=jnp.zeros([], jnp.int32),
      delta=jnp.zeros([], jnp.float32),
      temperature=temperature_at(jnp.zeros([], jnp.int32)),
    )

  def update_fn(
    updates: optax.Updates,
    state: MetropolisState,
    params: optax.Params | None = None,
    *,
    value: chex.Numeric,
    value_fn: Callable[..., chex.Numeric],
    **extra_args: Any,
  ) -> tuple[optax.Updates, MetropolisState]:
    if params is None:
      raise ValueError('metropolis needs params to evaluate the candidate; got params=None.')
    current = _as_scalar_loss('value', value)
    typed_key = jax.random.wrap_key_data(state.key, impl=key_impl)
    key, multiplier_key, accept_key = jax.random.split(typed_key, 3)

    inner_args = dict(extra_args, value=value, value_fn=value_fn)
    lr_factor = bool(_checks.find_states(state.inner_state, CoolMomentumState))
    if multiplied:
      if not lr_factor and _checks.find_states(state.inner_state, KineticTemperatureState):
        raise ValueError(
          'metropolis with multipliers would scale the update after the inner '
          'optimizer has recorded it: place coolopt.track_kinetic_temperature() after '
          'coolopt.metropolis(...) in the chain, not inside it.'
        )
      choices = jnp.asarray(multipliers, jnp.float32)
      index = jax.random.randint(multiplier_key, [], 0, choices.shape[0])
      # choices[index] as a sum over a one-hot mask (exact: the other terms are 0).
      # XLA fuses a cheap scalar computation such as the indexing and the draw's
      # arithmetic into every consumer, here every parameter leaf's update, but
      # never a reduction: the sum computes the multiplier once.
      multiplier = jnp.sum(jnp.where(jnp.arange(choices.shape[0]) == index, choices, 0.0))
      if lr_factor:
        inner_args['learning_rate_multiplier'] = multiplier
    proposal, inner_state = inner.update(updates, state.inner_state, params, **inner_args)
    if multiplied and not lr_factor:
      proposal = jax.tree.map(lambda u: (multiplier * u).astype(u.dtype), proposal)

    fn_kwargs = _checks.split_kwargs_for(value_fn, extra_args)
    candidate = value_fn(optax.apply_updates(params, proposal), **fn_kwargs)
    candidate = _as_scalar_loss('the result of value_fn', candidate)
    if axis_name is not None:
      current, candidate = jax.lax.pmean((current, candidate), axis_name)
    delta = candidate - current
    temp = temperature_at(state.count)
    # A move with delta <= 0 passes at every temperature, zero included; at T > 0
    # a worse one passes if u < exp(-delta / T), u in [0, 1). A T that is not
    # positive and finite is zero temperature: only delta <= 0 passes. A NaN delta
    # fails both comparisons, and a non-finite candidate is refused outright.
    hot = (temp > 0) & jnp.isfinite(temp)
    uniform = jax.random.uniform(accept_key, dtype=jnp.float32)
    accepted = jnp.isfinite(candidate) & (
      (delta <= 0) | (hot & (uniform < jnp.exp(-delta / jnp.where(hot, temp, 1.0))))
    )
    updates = jax.tree.map(lambda u: jnp.where(accepted, u, jnp.zeros_like(u)), proposal)
    return updates, MetropolisState(
      count=optax.safe_increment(state.count),
      key=jax.random.key_data(key),
      inner_state=_roll_back(accepted, inner_state, state.inner_state),
      accepted=accepted,
      num_accepted=jnp.where(
        accepted, optax.safe_increment(state.num_accepted), state.num_accepted
      ),
      delta=delta.astype(jnp.float32),
      temperature=temp,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def acceptance_rate(opt_state: Any) -> chex.Array:
  """The fraction of proposals accepted so far, found in any nested optimizer state.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import coolopt
    >>> opt = optax.chain(optax.clip(1.0), coolopt.metropolis(optax.sgd(0.1), 1e-3))
    >>> params = jnp.array([1.0])
    >>> state = opt.init(params)
    >>> loss = lambda x: jnp.sum(x**2)
    >>> updates, state = opt.update(2 * params, state, params, value=loss(params), value_fn=loss)
    >>> print(coolopt.acceptance_rate(state))  # an improving move is always accepted
    1.0

  Args:
    opt_state: the state of an optimizer that contains :func:`metropolis`.

  Returns:
    Accepted proposals / proposals (1 before the first step); with a leading axis
    per replica under `pmap`.

  Raises:
    ValueError: if the state holds no, or more than one, :class:`MetropolisState`.
  """
  hint = (
    'acceptance_rate reads the state of an optimizer built with coolopt.metropolis '
    'or coolopt.sgd_sa.'
  )
  state = _checks.find_state(opt_state, MetropolisState, hint)
  return jnp.where(state.count > 0, state.num_accepted / jnp.maximum(state.count, 1), 1.0)
