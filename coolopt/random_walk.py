r"""Gaussian random-walk proposals; inside :func:`coolopt.metropolis`, simulated annealing."""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from coolopt import _checks

__all__ = ['RandomWalkState', 'random_walk']


class RandomWalkState(NamedTuple):
  """State for :func:`random_walk`.

  Attributes:
    count: number of proposals made so far (int32); the step at which the scale
      schedule is evaluated.
    key: the PRNG key as raw uint32 key data, split at every step.
  """

  count: chex.Array
  key: chex.Array


def random_walk(
  scale: optax.ScalarOrSchedule, *, key: int | chex.PRNGKey = 0
) -> optax.GradientTransformationExtraArgs:
  r"""Proposes a Gaussian move of every parameter, ignoring the gradient.

  At step :math:`n`, with :math:`s_n` = ``scale`` (a number or a schedule of the
  step count) and fresh standard normal draws :math:`\xi_n`, independent for every
  parameter and every step:

  .. math::

    u_n = s_n \, \xi_n, \qquad \xi_n \sim \mathcal{N}(0, I).

  The incoming updates (gradients) are not read, only their structure and dtypes:
  they may be zeros. On its own this is a random walk. Wrapped in
  :func:`coolopt.metropolis`, each move is a proposal accepted with probability
  :math:`\min(1, e^{-\delta/T_n})`: the classical simulated annealing of Kirkpatrick
  et al., for any objective ``value_fn``, differentiable or not (a step function, an
  error rate). A rejected proposal is not proposed again: the step count and the key
  are integer leaves of this state, which the Metropolis test advances on every
  proposal. The draws are made in float32 (float64 for float64 parameters) and cast
  to each parameter's dtype. A complex parameter is two real ones: its real and
  imaginary parts move independently, each with standard deviation :math:`s_n`.
  Integer parameters are refused.

  The key is split at every step, as in `optax.add_noise`; it is kept as raw key
  data, whatever the `jax.random` implementation of a typed key given. Give
  :func:`coolopt.metropolis` a different key when it draws ``multipliers``: with
  the same key, the draw of the multiplier and the proposal come from related keys.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import coolopt
    >>> # A step function: no gradient anywhere, a minimum at x = (2, -1).
    >>> loss = lambda x: jnp.sum(jnp.floor(jnp.abs(x - jnp.array([2.0, -1.0])) * 4))
    >>> opt = coolopt.metropolis(
    ...   coolopt.random_walk(0.3, key=1),
    ...   temperature=optax.exponential_decay(1.0, 100, 0.5),
    ...   key=0,
    ... )
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> for _ in range(1000):
    ...   zeros = jnp.zeros_like(params)
    ...   updates, state = opt.update(zeros, state, params, value=loss(params), value_fn=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> print(loss(jnp.zeros(2)), loss(params))
    12.0 0.0

  Args:
    scale: :math:`s_n \geq 0`, the standard deviation of the move of each parameter:
      a number or an optax schedule of the step count.
    key: an int seed or a `jax.random` key (typed, of any implementation, or raw key
      data of the default one).

  Returns:
    An `optax.GradientTransformationExtraArgs`; extra arguments are ignored.

  Raises:
    ValueError: for an invalid ``scale`` or ``key``; in ``init``, for a parameter that
      is not floating-point or complex (named by its path).

  References:
    Kirkpatrick, Gelatt & Vecchi, Optimization by simulated annealing, Science 220,
    671 (1983).

    Metropolis et al., Equation of state calculations by fast computing machines,
    J. Chem. Phys. 21, 1087 (1953).
  """
  _checks.check_range('scale', scale, lower=0.0, upper=None)
  key_data, impl = _checks.key_data_and_impl(key)

  def init_fn(params: optax.Params) -> RandomWalkState:
    _checks.check_inexact_params('random_walk', params)
    return RandomWalkState(count=jnp.zeros([], jnp.int32), key=key_data)

  def update_fn(updates, state, params=None):
    del params
    key, noise_key = jax.random.split(jax.random.wrap_key_data(state.key, impl=impl))
    leaves, treedef = jax.tree.flatten(updates)
    leaf_keys = jax.random.split(noise_key, len(leaves)) if leaves else []
    step_scale = scale(state.count) if callable(scale) else scale

    def move(leaf: chex.Array, leaf_key: chex.PRNGKey) -> chex.Array:
      if jnp.iscomplexobj(leaf):
        # Two real parameters: jax.random.normal's complex draws have variance 1/2 in
        # each part, so the parts are drawn as two real moves of scale s_n each.
        real_part, imaginary_part = jax.random.split(leaf_key)
        real_leaf = jnp.real(leaf)
        return jax.lax.complex(move(real_leaf, real_part), move(real_leaf, imaginary_part))
      dtype = jnp.promote_types(leaf.dtype, jnp.float32)
      noise = jax.random.normal(leaf_key, leaf.shape, dtype, **_sharded_like(leaf))
      return (jnp.asarray(step_scale, dtype) * noise).astype(leaf.dtype)

    moves = [move(leaf, leaf_key) for leaf, leaf_key in zip(leaves, leaf_keys, strict=True)]
    return jax.tree.unflatten(treedef, moves), RandomWalkState(
      count=optax.safe_increment(state.count), key=jax.random.key_data(key)
    )

  return optax.with_extra_args_support(optax.GradientTransformation(init_fn, update_fn))


def _sharded_like(leaf: chex.Array) -> dict:
  """`out_sharding` for a draw shaped like `leaf`, under explicit mesh axes.

  With explicit axes (`jax.sharding.AxisType.Explicit`) a draw without
  `out_sharding` is replicated: every device would draw the whole array. Elsewhere
  (no mesh, automatic axes, JAX before explicit axes) the compiler places it.
  """
  axis_types = getattr(jax.sharding, 'AxisType', None)
  if axis_types is None or not hasattr(jax, 'typeof'):
    return {}
  sharding = getattr(jax.typeof(leaf), 'sharding', None)
  mesh_axis_types = getattr(getattr(sharding, 'mesh', None), 'axis_types', ())
  if axis_types.Explicit not in mesh_axis_types:
    return {}
  return {'out_sharding': sharding}
