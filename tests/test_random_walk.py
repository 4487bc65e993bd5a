"""Tests for `coolopt.random_walk`, alone and as the proposals of `coolopt.metropolis`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import coolopt

IMPLEMENTATIONS = ('threefry2x32', 'rbg', 'unsafe_rbg')
NUM_PARAMS = 20_000


def _moves(opt, params, num_steps, grads=None):
  """The moves of `num_steps` updates, stacked, and the final state."""
  grads = jax.tree.map(jnp.zeros_like, params) if grads is None else grads

  def step(state, _):
    updates, state = opt.update(grads, state, params)
    return state, updates

  state, moves = jax.jit(lambda s: jax.lax.scan(step, s, length=num_steps))(opt.init(params))
  return moves, state


# The proposals.


@pytest.mark.parametrize('impl', IMPLEMENTATIONS)
def test_moves_are_gaussian_with_the_requested_scale(impl):
  # 20,000 draws a step: the sample standard deviation has a relative standard error of
  # 1 / sqrt(2 * 20,000) = 0.5%; the tolerance is 2.5% (5 standard errors), the mean's
  # 5 standard errors, and the Kolmogorov-Smirnov test must not reject normality at 1e-3.
  params = {'w': jnp.zeros((100, 150)), 'b': jnp.zeros(5000)}
  scale = optax.exponential_decay(0.5, transition_steps=1, decay_rate=0.1)
  moves, state = _moves(coolopt.random_walk(scale, key=jax.random.key(7, impl=impl)), params, 3)
  assert int(state.count) == 3
  for n, expected in enumerate((0.5, 0.05, 0.005)):
    draws = np.concatenate([np.ravel(moves['w'][n]), np.ravel(moves['b'][n])]) / expected
    assert abs(np.std(draws) - 1.0) < 0.025, (n, np.std(draws))
    assert abs(np.mean(draws)) < 5 / np.sqrt(draws.size), (n, np.mean(draws))
    assert scipy.stats.kstest(draws, 'norm').pvalue > 1e-3


@pytest.mark.parametrize('impl', IMPLEMENTATIONS)
def test_moves_are_independent_across_steps_and_parameters(impl):
  params = {'a': jnp.zeros(NUM_PARAMS), 'b': jnp.zeros(NUM_PARAMS)}
  moves, _ = _moves(coolopt.random_walk(1.0, key=jax.random.key(3, impl=impl)), params, 2)
  tolerance = 5 / np.sqrt(NUM_PARAMS)  # 5 standard errors of a correlation of 0.
  pairs = [
    (moves['a'][0], moves['a'][1]),
    (moves['a'][0], moves['b'][0]),
    (moves['a'][1], moves['b'][1]),
  ]
  for x, y in pairs:
    assert abs(np.corrcoef(x, y)[0, 1]) < tolerance


@pytest.mark.parametrize('impl', IMPLEMENTATIONS)
def test_reproducible_from_the_key_and_ignores_the_gradient(impl):
  params = {'w': jnp.zeros((3, 4)), 'b': jnp.zeros(2)}
  key = jax.random.key(11, impl=impl)
  moves, state = _moves(coolopt.random_walk(0.1, key=key), params, 4)
  gradients = jax.tree.map(lambda p: jnp.full_like(p, 123.0), params)
  again, state_again = _moves(coolopt.random_walk(0.1, key=key), params, 4, gradients)
  chex.assert_trees_all_equal(moves, again)
  chex.assert_trees_all_equal(state, state_again)
  # The key is raw key data of the implementation, and changes at every step.
  assert state.key.dtype == jnp.uint32
  assert state.key.shape == jax.random.key_data(key).shape
  assert not np.array_equal(state.key, jax.random.key_data(key))
  other, _ = _moves(coolopt.random_walk(0.1, key=jax.random.key(12, impl=impl)), params, 4)
  assert not np.allclose(moves['w'], other['w'])
  # Every step moves differently.
  assert len({np.asarray(m).tobytes() for m in moves['w']}) == 4


def test_int_seed_typed_key_and_raw_key_data_agree():
  params = jnp.zeros(10)
  moves = [
    _moves(coolopt.random_walk(1.0, key=key), params, 3)[0]
    for key in (5, jax.random.key(5), jax.random.PRNGKey(5))
  ]
  chex.assert_trees_all_equal(moves[0], moves[1])
  chex.assert_trees_all_equal(moves[0], moves[2])
  # Each implementation draws its own numbers.
  rbg = _moves(coolopt.random_walk(1.0, key=jax.random.key(5, impl='rbg')), params, 3)[0]
  assert not np.allclose(moves[0], rbg)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16, jnp.float32])
def test_preserves_dtype(dtype):
  params = {'w': jnp.zeros(4000, dtype)}
  moves, _ = _moves(coolopt.random_walk(0.25, key=0), params, 1)
  assert moves['w'].dtype == dtype
  assert abs(np.std(np.asarray(moves['w'], np.float32)) / 0.25 - 1.0) < 0.1


def test_inject_hyperparams_scale():
  opt = optax.inject_hyperparams(coolopt.random_walk, static_args=('key',))(scale=1.0, key=0)
  params = jnp.zeros(NUM_PARAMS)
  state = opt.init(params)
  state.hyperparams['scale'] = jnp.asarray(0.01)
  updates, _ = jax.jit(opt.update)(params, state, params)
  assert abs(np.std(updates) / 0.01 - 1.0) < 0.05


@pytest.mark.parametrize(
  ('scale', 'message'),
  [(-0.1, r'scale must be in \[0, inf\), got scale=-0.1'), (np.inf, 'scale must be in')],
)
def test_invalid_scale(scale, message):
  with pytest.raises(ValueError, match=message):
    coolopt.random_walk(scale, key=0)


# Simulated annealing: metropolis(random_walk).


def _double_well(x):
  # Minima at x = -1.057 (global, f = -0.515) and x = 0.930 (f = 0.483), the barrier
  # at x = 0.127 (f = 1.032).
  return jnp.sum((x**2 - 1.0) ** 2 + 0.5 * x)


@jax.jit
def _anneal(keys, cooling_steps):
  """Final positions of chains started in the wrong well at x = 1, one per key."""

  def chain(key):
    walk_key, test_key = jax.random.split(key)

    def temperature(n):
      return 0.01 ** (jnp.minimum(n, cooling_steps) / cooling_steps)

    opt = coolopt.metropolis(coolopt.random_walk(0.2, key=walk_key), temperature, key=test_key)
    x = jnp.ones(1)

    def step(carry, _):
      x, state = carry
      # No gradient is used: zeros stand in for it.
      updates, state = opt.update(
        jnp.zeros_like(x), state, x, value=_double_well(x), value_fn=_double_well
      )
      return (optax.apply_updates(x, updates), state), None

    (x, _), _ = jax.lax.scan(step, (x, opt.init(x)), length=2000)
    return x[0]

  return jax.vmap(chain)(keys)


def test_annealing_a_double_well_from_the_wrong_well():
  # 256 chains from x = 1, cooled from T = 1 to 0.01 over 2000 steps, or over 20 steps
  # and then held at 0.01. The fractions that end in the global well, about 0.96 and
  # 0.03, are more than 5 binomial standard errors (at most 0.031) from the bounds.
  keys = jax.random.split(jax.random.key(0), 256)
  slow = np.asarray(_anneal(keys, 2000))
  fast = np.asarray(_anneal(keys, 20))
  assert np.mean(slow < 0.127) > 0.8
  assert np.mean(fast < 0.127) < 0.2
  # Cold, every chain sits near the bottom of its well: std sqrt(T / f'') < 0.05.
  for x in (slow, fast):
    bottoms = np.where(x < 0.127, -1.057, 0.930)
    assert np.all(np.abs(x - bottoms) < 0.25)


def test_a_rejected_move_is_not_proposed_again():
  # Nearly cold on f(x) = sum(x): a proposal is accepted iff it lowers the sum, which
  # a fresh Gaussian move does with probability 1/2. Were a rejected move proposed
  # again, it would be rejected again, and the walk would stop at its first rejection.
  loss = jnp.sum
  opt = coolopt.metropolis(coolopt.random_walk(1.0, key=1), temperature=1e-6, key=0)
  x = jnp.zeros(3)

  def step(carry, _):
    x, state = carry
    updates, state = opt.update(jnp.zeros_like(x), state, x, value=loss(x), value_fn=loss)
    return (optax.apply_updates(x, updates), state), None

  (x, state), _ = jax.jit(lambda c: jax.lax.scan(step, c, length=1000))((x, opt.init(x)))
  # 1000 Bernoulli(1/2) decisions: the standard error of the rate is 0.016.
  assert abs(float(coolopt.acceptance_rate(state)) - 0.5) < 0.08
  (walk_state,) = [
    node
    for node in jax.tree.leaves(state, is_leaf=lambda n: isinstance(n, coolopt.RandomWalkState))
    if isinstance(node, coolopt.RandomWalkState)
  ]
  assert int(walk_state.count) == 1000
  assert float(loss(x)) < -100.0
