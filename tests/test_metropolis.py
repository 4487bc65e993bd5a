"""Tests for `coolopt.metropolis`, `coolopt.sgd_sa` and `coolopt.acceptance_rate`."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import coolopt

NUM_DRAWS = 4000


def _quadratic(params):
  return sum(jnp.sum((p - 1.0) ** 2) for p in jax.tree.leaves(params))


def _assert_bitwise_equal(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert (x.dtype, x.shape) == (y.dtype, y.shape)
    assert x.tobytes() == y.tobytes(), (x, y)


def _trajectory(opt, params, num_steps, loss=_quadratic):
  """Parameters and states after each of `num_steps` full-batch steps on `loss`."""

  def step(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params, value=value, value_fn=loss)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, state)

  _, history = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), length=num_steps))(params)
  return history


# Acceptance probability.


@jax.jit
def _constant_delta_decisions(deltas, temperatures):
  """Decisions on `NUM_DRAWS` proposals whose loss change is exactly `delta`, per (delta, T)."""

  def run(delta, temperature):
    # identity moves every parameter by +1 on acceptance; the loss change is
    # exact because 1 + delta is exact in float32 for the deltas used here.
    opt = coolopt.metropolis(optax.identity(), temperature, key=3)
    value = jnp.float32(1.0)

    def step(carry, _):
      params, state = carry
      updates, state = opt.update(
        jnp.ones_like(params), state, params, value=value, value_fn=lambda _: value + delta
      )
      return (optax.apply_updates(params, updates), state), state

    (params, state), history = jax.lax.scan(
      step, (jnp.zeros(2), opt.init(jnp.zeros(2))), length=NUM_DRAWS
    )
    return params, state, history

  return jax.vmap(run)(deltas, temperatures)


WORSENING = [
  (0.125, 1.0),
  (0.5, 1.0),
  (1.0, 1.0),
  (2.0, 1.0),
  (3.0, 2.0),
  (1.0, 4.0),
  (1.0, 0.25),
  (8.0, 1.0),
  (1.0, 1e30),  # p = 1 in float32.
  (2.0**-20, 1e-30),  # p = 0 in float32.
]
NOT_WORSENING = [(d, t) for d in (0.0, -(2.0**-20), -0.5, -1000.0) for t in (1e-30, 1.0, 1e30)]
NON_FINITE = [(d, t) for d in (np.nan, np.inf, -np.inf) for t in (1e-30, 1.0, 1e30)]


@functools.cache
def _all_decisions():
  """Decisions for every (delta, T) case of this section, in one compiled run."""
  cases = WORSENING + NOT_WORSENING + NON_FINITE
  deltas, temperatures = (np.asarray(column, np.float32) for column in zip(*cases, strict=True))
  params, state, history = _constant_delta_decisions(deltas, temperatures)
  accepted = np.asarray(history.accepted)
  # Every accepted move and no rejected one reached the parameters.
  np.testing.assert_array_equal(np.asarray(params)[:, 0], accepted.sum(axis=1))
  np.testing.assert_array_equal(np.asarray(state.num_accepted), accepted.sum(axis=1))
  np.testing.assert_array_equal(
    history.temperature, np.broadcast_to(temperatures[:, None], accepted.shape)
  )
  np.testing.assert_array_equal(
    history.delta[: len(WORSENING)],
    np.broadcast_to(deltas[: len(WORSENING), None], (len(WORSENING), NUM_DRAWS)),
  )
  return dict(zip(cases, accepted, strict=True))


def _decisions(cases):
  return np.stack([_all_decisions()[case] for case in cases])


def test_worsening_accepted_with_metropolis_probability():
  for (delta, temperature), row in zip(WORSENING, _decisions(WORSENING), strict=True):
    expected = np.exp(-np.float64(delta) / np.float64(temperature))
    sigma = np.sqrt(expected * (1.0 - expected) / NUM_DRAWS)
    frequency = row.mean()
    print(f'delta={delta:g} T={temperature:g}: {frequency:.4f} vs exp(-delta/T)={expected:.4f}')
    assert abs(frequency - expected) <= 5 * sigma, (delta, temperature, frequency, expected)


def test_improving_and_equal_moves_always_accepted():
  assert _decisions(NOT_WORSENING).all()


def test_non_finite_candidates_never_accepted():
  assert not _decisions(NON_FINITE).any()


# Rollback.


@pytest.mark.parametrize(
  'make_inner',
  [
    lambda lr: optax.sgd(lr, momentum=0.9),
    lambda lr: coolopt.coolmomentum(lr, rho_0=0.9, total_steps=100),
  ],
  ids=['sgd_momentum', 'coolmomentum'],
)
def test_rejection_rolls_back_trajectory_and_acceptance_applies_inner_step(make_inner):
  inner = make_inner(0.1)
  multipliers = (0.5, 2.0)  # Powers of two: the multiplied learning rates are exact.
  opt = coolopt.metropolis(inner, 1.0, multipliers=multipliers, key=1)
  params = {'w': jnp.array([1.0, -2.0, 3.0]), 'b': jnp.array(0.5)}
  grads = [jax.tree.map(lambda p, i=i: (i + 1.0) * p - 0.25, params) for i in range(4)]
  improve = lambda _: jnp.float32(-1.0)  # noqa: E731

  state = opt.init(params)
  for g in grads[:2]:  # Fill the momentum buffer.
    _, state = opt.update(g, state, params, value=0.0, value_fn=improve)
  assert bool(state.accepted)

  # A finite worsening with exp(-1000) == 0, then a non-finite candidate.
  for candidate in (1000.0, np.inf):
    before = state
    updates, state = opt.update(
      grads[2], state, params, value=0.0, value_fn=lambda _, c=candidate: jnp.float32(c)
    )
    assert not bool(state.accepted)
    _assert_bitwise_equal(updates, jax.tree.map(jnp.zeros_like, params))
    assert not any(np.signbit(u).any() for u in jax.tree.leaves(updates))
    # The trajectory is rolled back, the clock is not.
    for new, old in zip(
      jax.tree.leaves(state.inner_state), jax.tree.leaves(before.inner_state), strict=True
    ):
      if jnp.issubdtype(new.dtype, jnp.integer):
        assert int(new) == int(old) + 1
      else:
        assert np.asarray(new).tobytes() == np.asarray(old).tobytes()
    assert int(state.count) == int(before.count) + 1
    assert int(state.num_accepted) == int(before.num_accepted)
  assert all(int(c) == 4 for c in _counts(state.inner_state))

  # An accepted move: bitwise the inner optimizer's own step at the multiplied rate.
  updates, after = opt.update(grads[3], state, params, value=0.0, value_fn=improve)
  assert bool(after.accepted)
  matches = []
  for m in multipliers:
    expected_updates, expected_state = make_inner(np.float32(0.1) * np.float32(m)).update(
      grads[3], state.inner_state, params
    )
    same = jax.tree.map(
      lambda a, b: np.asarray(a).tobytes() == np.asarray(b).tobytes(),
      (updates, after.inner_state),
      (expected_updates, expected_state),
    )
    matches.append(all(jax.tree.leaves(same)))
  assert sum(matches) == 1, matches
  assert all(int(c) == 5 for c in _counts(after.inner_state))


def _counts(tree):
  """The integer leaves of a state: its step counters."""
  return [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.integer)]


# One forward pass per step.


def test_value_fn_evaluated_once_per_update():
  traced, evaluated = [], []

  def value_fn(params):
    traced.append(1)
    loss = _quadratic(params)
    jax.debug.callback(lambda x: evaluated.append(float(x)), loss)
    return loss

  opt = coolopt.metropolis(optax.sgd(0.3), 1.0, multipliers=(0.5, 1.0))

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(_quadratic)(params)
    updates, state = opt.update(grads, state, params, value=value, value_fn=value_fn)
    return optax.apply_updates(params, updates), state

  params = jnp.array([0.0, 3.0])
  state = opt.init(params)
  candidates = []
  for _ in range(6):
    value = _quadratic(params)
    params, state = step(params, state)
    candidates.append(float(value + state.delta))
  jax.effects_barrier()
  assert len(traced) == 1
  np.testing.assert_allclose(evaluated, candidates, rtol=1e-6)


# Composition with optax.


def test_inside_chain_after_clipping():
  opt = optax.chain(
    optax.clip_by_global_norm(1.0),
    coolopt.metropolis(optax.sgd(0.1), 1.0, multipliers=(0.5,)),
  )
  params = jnp.array([0.0, 0.0])
  state = opt.init(params)
  updates, state = opt.update(
    jnp.array([30.0, 40.0]), state, params, value=0.0, value_fn=lambda _: -1.0
  )
  np.testing.assert_allclose(updates, -0.5 * 0.1 * np.array([0.6, 0.8]), rtol=1e-6)
  assert float(coolopt.acceptance_rate(state)) == 1.0

  params, state = _trajectory(opt, jnp.array([4.0, -3.0]), 300)
  assert _quadratic(params[-1]) < 1e-6
  assert 0.0 < float(coolopt.acceptance_rate(jax.tree.map(lambda x: x[-1], state))) <= 1.0


INJECT_KWARGS = dict(inner=optax.sgd(0.1, momentum=0.5), temperature=0.01, multipliers=(0.5, 4.0))


@functools.cache
def _plain_trajectory():
  return _trajectory(coolopt.metropolis(key=0, **INJECT_KWARGS), jnp.array([4.0, -3.0]), 20)


@pytest.mark.parametrize(
  ('static_args', 'key'),
  [
    ((), 0),
    ((), jax.random.key(0)),
    ((), jax.random.PRNGKey(0)),
    (('inner', 'multipliers', 'key'), 0),
  ],
  ids=['int', 'typed_key', 'raw_key', 'static'],
)
def test_inject_hyperparams(static_args, key):
  # Neither the inner transformation (a NamedTuple, not callable) nor a tuple of
  # multipliers is taken for a schedule, so none needs to be static; an injected
  # key only seeds init.
  injected = optax.inject_hyperparams(coolopt.metropolis, static_args=static_args)(
    key=key, **INJECT_KWARGS
  )
  expected, expected_state = _plain_trajectory()
  got, state = _trajectory(injected, jnp.array([4.0, -3.0]), 20)
  _assert_bitwise_equal(got, expected)
  _assert_bitwise_equal(state.inner_state, expected_state)
  assert 0 < int(expected_state.num_accepted[-1]) < 20
  assert 'temperature' in state.hyperparams
  assert ('key' in state.hyperparams) == ('key' not in static_args)
  np.testing.assert_array_equal(
    coolopt.acceptance_rate(state), coolopt.acceptance_rate(expected_state)
  )


def test_injected_temperature_can_be_changed():
  opt = optax.inject_hyperparams(coolopt.metropolis)(optax.identity(), temperature=1e30)
  params = jnp.zeros(2)
  state = opt.init(params)
  worsen = lambda p: jnp.sum(p)  # noqa: E731
  _, state = opt.update(jnp.ones(2), state, params, value=0.0, value_fn=worsen)
  assert bool(state.inner_state.accepted)
  state.hyperparams['temperature'] = jnp.float32(1e-30)
  for _ in range(20):
    _, state = opt.update(jnp.ones(2), state, params, value=0.0, value_fn=worsen)
    assert not bool(state.inner_state.accepted)
    assert float(state.inner_state.temperature) == np.float32(1e-30)


def test_temperature_schedule_evaluated_at_proposal_count():
  opt = coolopt.metropolis(optax.sgd(0.1), lambda n: 1.0 / (n + 1.0))
  _, state = _trajectory(opt, jnp.array([4.0, -3.0]), 5)
  np.testing.assert_allclose(state.temperature, 1.0 / np.arange(1, 6), rtol=1e-6)
  np.testing.assert_array_equal(state.count, np.arange(1, 6))


def test_extra_args_passed_to_value_fn_by_name():
  received = {}

  def loss(params, batch):
    received['batch'] = batch
    return jnp.sum((params - batch) ** 2)

  def loss_with_kwargs(params, **kwargs):
    received['kwargs'] = sorted(kwargs)
    return jnp.sum(params**2)

  opt = coolopt.metropolis(optax.sgd(0.1), 1.0)
  params, batch = jnp.zeros(2), jnp.array([1.0, 2.0])
  state = opt.init(params)
  value, grads = jax.value_and_grad(loss)(params, batch)
  updates, state = opt.update(
    grads, state, params, value=value, value_fn=loss, batch=batch, unused_extra=3
  )
  assert received['batch'] is batch
  np.testing.assert_allclose(state.delta, loss(params + updates, batch) - value, rtol=1e-6)
  opt.update(grads, state, params, value=0.0, value_fn=loss_with_kwargs, batch=batch, epoch=1)
  assert received['kwargs'] == ['batch', 'epoch']


def test_missing_value_or_value_fn_is_a_type_error():
  opt = coolopt.metropolis(optax.sgd(0.1), 1.0)
  chained = optax.chain(optax.clip(1.0), opt)
  params = jnp.zeros(2)
  for tx in (opt, chained):
    state = tx.init(params)
    with pytest.raises(TypeError, match="'value_fn'"):
      tx.update(params, state, params, value=0.0)
    with pytest.raises(TypeError, match="'value'"):
      tx.update(params, state, params, value_fn=_quadratic)
  with pytest.raises(ValueError, match='params'):
    opt.update(params, opt.init(params), None, value=0.0, value_fn=_quadratic)


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'temperature': 0.0}, 'temperature=0.0'),
    ({'temperature': -1.0}, 'temperature=-1.0'),
    ({'temperature': float('nan')}, 'temperature=nan'),
    ({'multipliers': ()}, r'multipliers=\(\)'),
    ({'multipliers': []}, r'multipliers=\[\]'),
    ({'multipliers': (0.5, -0.1)}, r'multipliers=\(0.5, -0.1\)'),
    ({'multipliers': (1.0, 0.0)}, r'multipliers=\(1.0, 0.0\)'),
    ({'multipliers': 0.5}, 'multipliers=0.5'),
  ],
)
def test_invalid_hyperparameters(kwargs, message):
  kwargs = {'temperature': 1.0, **kwargs}
  with pytest.raises(ValueError, match=message):
    coolopt.metropolis(optax.sgd(0.1), **kwargs)


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'steps_per_epoch': None}, 'steps_per_epoch'),
    ({'steps_per_epoch': 0}, 'steps_per_epoch=0'),
    ({'initial_temperature': 0.0}, 'initial_temperature=0.0'),
    ({'cooling_factor': 0.0}, 'cooling_factor=0.0'),
    ({'cooling_factor': 1.5}, 'cooling_factor=1.5'),
    ({'learning_rates': ()}, r'multipliers=\(\)'),
  ],
)
def test_invalid_sgd_sa_hyperparameters(kwargs, message):
  kwargs = {'steps_per_epoch': 10, **kwargs}
  with pytest.raises(ValueError, match=message):
    coolopt.sgd_sa(**kwargs)


@jax.jit
def _seeded_trajectory(key):
  # The key is traced: int seeds, typed keys and raw keys each compile once.
  opt = coolopt.metropolis(optax.sgd(0.2), 0.05, multipliers=(0.5, 2.0, 8.0), key=key)
  params, state = _trajectory(opt, jnp.array([4.0, -3.0]), 40)
  return params, state


def test_int_seed_and_keys_give_the_same_trajectory():
  expected = _seeded_trajectory(0)
  for key in (0, jax.random.key(0), jax.random.PRNGKey(0)):
    _assert_bitwise_equal(_seeded_trajectory(key), expected)
  assert 0 < int(expected[1].num_accepted[-1]) < 40
  assert not np.array_equal(_seeded_trajectory(1)[0], expected[0])


def test_acceptance_rate_reads_nested_states():
  params = jnp.array([4.0, -3.0])
  final = jax.tree.map(lambda x: x[-1], _seeded_trajectory(0)[1])
  expected = float(final.num_accepted) / 40
  assert 0 < expected < 1
  assert float(coolopt.acceptance_rate(final)) == pytest.approx(expected)
  metropolis = coolopt.metropolis(optax.sgd(0.2), 0.05)
  assert float(coolopt.acceptance_rate(metropolis.init(params))) == 1.0

  chained = optax.chain(optax.clip_by_global_norm(1.0), metropolis).init(params)
  injected = optax.inject_hyperparams(coolopt.metropolis)(optax.sgd(0.2), 0.05).init(params)
  for nested in (
    (chained[0], final),
    injected._replace(inner_state=final),
    (optax.EmptyState(), (injected._replace(inner_state=final),)),
  ):
    assert float(coolopt.acceptance_rate(nested)) == pytest.approx(expected)

  with pytest.raises(ValueError, match='found 0'):
    coolopt.acceptance_rate(optax.sgd(0.1).init(params))
  with pytest.raises(ValueError, match='found 2'):
    coolopt.acceptance_rate((final, chained))


# SGD-SA against a NumPy transcription of Algorithm 2.

FEATURES = 3
BATCH = 8
# H of the paper's experiments, the default of sgd_sa.
PAPER_LEARNING_RATES = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.09, 0.08, 0.07, 0.06, 0.05)


def _regression_data(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(num_steps, BATCH, FEATURES)).astype(np.float32)
  w_true = np.array([1.5, -2.0, 0.5], np.float32)
  y = (x @ w_true + 0.3 * rng.normal(size=(num_steps, BATCH))).astype(np.float32)
  return x, y


def _minibatch_loss(w, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def _run_sgd_sa(opt, x, y):
  def step(carry, batch):
    w, state = carry
    value, grads = jax.value_and_grad(_minibatch_loss)(w, *batch)
    updates, state = opt.update(
      grads, state, w, value=value, value_fn=lambda v: _minibatch_loss(v, *batch)
    )
    w = optax.apply_updates(w, updates)
    return (w, state), (w, state)

  w0 = jnp.zeros(FEATURES)
  return jax.jit(lambda x, y: jax.lax.scan(step, (w0, opt.init(w0)), (x, y))[1])(x, y)


def _numpy_sgd_sa(x, y, learning_rate, accept):
  """Algorithm 2 with H = {learning_rate}, in float64; `accept(worsening)` is the test."""
  w = np.zeros(FEATURES)
  trajectory, decisions = [], []
  for xb, yb in zip(x.astype(np.float64), y.astype(np.float64), strict=True):
    loss = lambda v, xb=xb, yb=yb: 0.5 * np.mean((xb @ v - yb) ** 2)  # noqa: E731
    gradient = xb.T @ (xb @ w - yb) / len(yb)
    w_new = w - learning_rate * gradient
    decisions.append(accept(loss(w_new) - loss(w)))
    if decisions[-1]:
      w = w_new
    trajectory.append(w)
  return np.array(trajectory), np.array(decisions)


def test_sgd_sa_at_high_temperature_is_sgd():
  x, y = _regression_data(60)
  opt = coolopt.sgd_sa(learning_rates=(0.1,), initial_temperature=1e30, steps_per_epoch=10)
  w, state = _run_sgd_sa(opt, x, y)
  assert np.all(state.accepted)

  # One step is bitwise plain optax.sgd: lr * (-1 * g) == -lr * g in IEEE arithmetic.
  sgd = optax.sgd(0.1)
  w0 = jnp.zeros(FEATURES)
  grads = jax.grad(_minibatch_loss)(w0, x[0], y[0])
  updates, _ = opt.update(grads, opt.init(w0), w0, value=0.0, value_fn=lambda _: 0.0)
  _assert_bitwise_equal(updates, sgd.update(grads, sgd.init(w0))[0])

  # A whole trajectory only to float32 rounding: XLA compiles the two loops
  # differently (even eager and jitted SGD differ in the last bit).
  def sgd_step(carry, batch):
    w, s = carry
    updates, s = sgd.update(jax.grad(_minibatch_loss)(w, *batch), s)
    w = optax.apply_updates(w, updates)
    return (w, s), w

  expected = jax.jit(lambda x, y: jax.lax.scan(sgd_step, (w0, sgd.init(w0)), (x, y))[1])(x, y)
  np.testing.assert_allclose(w, expected, rtol=1e-6, atol=1e-7)

  # And to float32 rounding the float64 transcription.
  reference, _ = _numpy_sgd_sa(x, y, 0.1, accept=lambda worsening: True)
  np.testing.assert_allclose(w, reference, rtol=1e-5, atol=1e-6)


def test_sgd_sa_at_tiny_temperature_accepts_only_improvements():
  x, y = _regression_data(60, seed=1)
  # A learning rate that overshoots on some minibatches and not on others.
  learning_rate = 0.7
  opt = coolopt.sgd_sa(
    learning_rates=(learning_rate,), initial_temperature=1e-30, steps_per_epoch=10
  )
  w, state = _run_sgd_sa(opt, x, y)
  reference, decisions = _numpy_sgd_sa(x, y, learning_rate, accept=lambda worsening: worsening <= 0)
  assert 0 < decisions.sum() < len(decisions)
  np.testing.assert_array_equal(state.accepted, decisions)
  np.testing.assert_allclose(w, reference, rtol=1e-5, atol=1e-6)

  # With the whole of H the same rule holds on the losses that were compared.
  opt = coolopt.sgd_sa(initial_temperature=1e-30, steps_per_epoch=10)
  x, y = _regression_data(300, seed=2)
  _, state = _run_sgd_sa(opt, x, y)
  delta = np.asarray(state.delta)
  assert 0 < np.sum(delta > 0) < len(delta)
  np.testing.assert_array_equal(state.accepted, delta <= 0)


def test_sgd_sa_cools_once_per_epoch():
  x, y = _regression_data(23)
  _, state = _run_sgd_sa(coolopt.sgd_sa(initial_temperature=2.0, steps_per_epoch=5), x, y)
  steps = np.arange(23)
  np.testing.assert_allclose(state.temperature, 2.0 * 0.8 ** (steps // 5), rtol=1e-6)
  assert np.all(state.temperature[:5] == np.float32(2.0))
  assert len(set(np.asarray(state.temperature[5:10]).tolist())) == 1


def test_sgd_sa_draws_learning_rates_uniformly():
  num_draws = 7000
  opt = coolopt.sgd_sa(steps_per_epoch=100, key=5)
  params = jnp.zeros(2)

  def step(state, _):
    # Every move is accepted (equal loss), and sgd(1.0) on unit gradients
    # proposes -1: the update is minus the learning rate drawn.
    updates, state = opt.update(jnp.ones(2), state, params, value=0.0, value_fn=lambda _: 0.0)
    return state, updates

  _, updates = jax.jit(lambda: jax.lax.scan(step, opt.init(params), length=num_draws))()
  drawn = -np.asarray(updates)
  assert np.all(drawn[:, 0] == drawn[:, 1])
  rates = np.asarray(PAPER_LEARNING_RATES, np.float32)
  index = np.argmax(drawn[:, :1] == rates[None, :], axis=1)
  np.testing.assert_array_equal(rates[index], drawn[:, 0])
  counts = np.bincount(index, minlength=len(rates))
  expected = num_draws / len(rates)
  sigma = np.sqrt(num_draws * (1 / len(rates)) * (1 - 1 / len(rates)))
  print('learning-rate counts', dict(zip(rates.tolist(), counts.tolist(), strict=True)))
  assert np.all(np.abs(counts - expected) <= 5 * sigma)
  chi2 = np.sum((counts - expected) ** 2 / expected)
  assert scipy.stats.chi2.sf(chi2, df=len(rates) - 1) > 1e-4
