"""`coolopt.metropolis` on one clock: schedules inside follow the proposal count.

A rejected proposal rolls back the inner optimizer's trajectory (floating-point
state) but not its clock (step counters, keys, injected hyperparameters). The
trajectories here are checked against NumPy replays written from the update rules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import coolopt

NUM_STEPS = 60
TEMPERATURE = 0.1
# A candidate loss worse by T ln 2 is accepted with probability exactly 1/2.
HALF = float(TEMPERATURE * np.log(2.0))


def _gradients(num_steps, size=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(num_steps, size)).astype(np.float32)


def _run_half_accepted(opt, gradients, params=None):
  """Proposals whose candidate loss is worse by T ln 2: about half are accepted.

  Returns the applied updates, the acceptance flags and the final state.
  """
  params = jnp.zeros(gradients.shape[1]) if params is None else params

  def step(state, g):
    updates, state = opt.update(g, state, params, value=0.0, value_fn=lambda _: HALF)
    return state, (updates, state.accepted)

  state, (updates, accepted) = jax.jit(lambda gs: jax.lax.scan(step, opt.init(params), gs))(
    jnp.asarray(gradients)
  )
  accepted = np.asarray(accepted)
  assert 0.3 < accepted.mean() < 0.7, accepted.mean()
  return np.asarray(updates, np.float64), accepted, state


def _counts(tree):
  """The step counters (`count` fields) of a nested optimizer state."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return [int(x) for path, x in leaves if getattr(path[-1], 'name', None) == 'count']


@pytest.mark.parametrize('cooling', ['exponential', 'linear', 'friction'])
def test_coolmomentum_cools_on_the_proposal_clock(cooling):
  lr, rho_0, total = 0.1, 0.9, NUM_STEPS - 10
  gradients = _gradients(NUM_STEPS)
  opt = coolopt.metropolis(coolopt.coolmomentum(lr, rho_0, total, cooling=cooling), TEMPERATURE)
  updates, accepted, state = _run_half_accepted(opt, gradients)

  # NumPy replay: the schedule is read at the proposal index n, the displacement is
  # the last accepted one.
  rho_fn = {
    'exponential': coolopt.exponential_cooling,
    'linear': coolopt.linear_cooling,
    'friction': coolopt.friction_cooling,
  }[cooling](rho_0, total)
  displacement = np.zeros(3)
  for n, g in enumerate(gradients.astype(np.float64)):
    rho = float(rho_fn(n))
    proposal = rho * displacement - lr * (1 + rho) / 2 * g
    if accepted[n]:
      displacement = proposal
      np.testing.assert_allclose(updates[n], proposal, rtol=1e-5, atol=1e-7)
    else:
      assert not updates[n].any()
  assert _counts(state.inner_state) == [NUM_STEPS]
  assert float(rho_fn(_counts(state.inner_state)[0])) == 0.0
  np.testing.assert_allclose(state.inner_state[1].displacement, displacement, rtol=1e-5, atol=1e-7)


def test_sgd_learning_rate_schedule_on_the_proposal_clock():
  schedule = optax.linear_schedule(0.5, 0.05, NUM_STEPS)
  gradients = _gradients(NUM_STEPS)
  opt = coolopt.metropolis(optax.sgd(schedule), TEMPERATURE)
  updates, accepted, state = _run_half_accepted(opt, gradients)
  for n in np.flatnonzero(accepted):
    np.testing.assert_allclose(updates[n], -float(schedule(n)) * gradients[n], rtol=1e-6)
  assert not updates[~accepted].any()
  assert _counts(state.inner_state) == [NUM_STEPS]


def test_adam_bias_correction_on_the_proposal_clock():
  b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.01
  gradients = _gradients(NUM_STEPS)
  opt = coolopt.metropolis(optax.adam(lr, b1, b2, eps), TEMPERATURE)
  updates, accepted, state = _run_half_accepted(opt, gradients)
  mu = nu = np.zeros(3)
  for n, g in enumerate(gradients.astype(np.float64)):
    new_mu, new_nu = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g**2
    t = n + 1  # Adam's bias correction counts every proposal.
    proposal = -lr * (new_mu / (1 - b1**t)) / (np.sqrt(new_nu / (1 - b2**t)) + eps)
    if accepted[n]:
      mu, nu = new_mu, new_nu
      np.testing.assert_allclose(updates[n], proposal, rtol=1e-4)
  assert _counts(state.inner_state) == [NUM_STEPS]
  np.testing.assert_allclose(state.inner_state[0].mu, mu, rtol=1e-5)


def test_inject_hyperparams_and_chains_on_the_proposal_clock():
  schedule = optax.exponential_decay(0.3, 10, 0.5)
  inner = optax.chain(
    optax.clip_by_global_norm(10.0),
    optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.9),
    optax.scale_by_schedule(lambda n: 1.0 / (1.0 + n)),
  )
  gradients = _gradients(NUM_STEPS)
  opt = coolopt.metropolis(inner, TEMPERATURE)
  updates, accepted, state = _run_half_accepted(opt, gradients)
  assert _counts(state.inner_state) == [NUM_STEPS] * 3
  injected = state.inner_state[1]
  # The stored hyperparameter is the one of the last proposal, accepted or not.
  np.testing.assert_allclose(injected.hyperparams['learning_rate'], schedule(NUM_STEPS - 1))
  trace = np.zeros(3)
  for n, g in enumerate(gradients.astype(np.float64)):
    new_trace = g + 0.9 * trace
    proposal = -float(schedule(n)) * new_trace / (1.0 + n)
    if accepted[n]:
      trace = new_trace
      np.testing.assert_allclose(updates[n], proposal, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(injected.inner_state[0].trace, trace, rtol=1e-5)


def test_injected_coolmomentum_with_multipliers():
  inner = optax.inject_hyperparams(coolopt.coolmomentum, static_args=('cooling',))(
    learning_rate=0.1, rho_0=0.9, total_steps=NUM_STEPS
  )
  opt = coolopt.metropolis(inner, TEMPERATURE, multipliers=(0.25, 1.0))
  updates, accepted, state = _run_half_accepted(opt, _gradients(NUM_STEPS))
  assert _counts(state.inner_state) == [NUM_STEPS, NUM_STEPS]
  # The stored displacement is the last move made, multiplier included.
  last_move = updates[np.flatnonzero(accepted)[-1]]
  np.testing.assert_array_equal(state.inner_state.inner_state[1].displacement, last_move)


# The state after an accepted move describes the move that was made.


def _accept_all_run(opt, gradients):
  """Updates and states of steps that are all accepted, one jitted step at a time
  (as the reference steps are compiled, so that XLA fuses both alike)."""
  params = jnp.zeros(gradients.shape[1])
  step = jax.jit(lambda g, state: opt.update(g, state, params, value=0.0, value_fn=lambda _: -1.0))
  state, history = opt.init(params), []
  for g in gradients:
    updates, state = step(jnp.asarray(g), state)
    history.append((updates, state))
  return jax.tree.map(lambda *xs: np.stack(xs), *history)


@pytest.mark.parametrize(
  'make_inner',
  [
    lambda lr: coolopt.coolmomentum(lr, 0.95, 30),
    lambda lr: optax.sgd(lr, momentum=0.9),
    lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
  ],
  ids=['coolmomentum', 'sgd_momentum', 'nesterov'],
)
def test_multiplier_is_the_steps_learning_rate_factor(make_inner):
  # Multipliers and base rate are powers of two, so every product is exact and the
  # comparison is bitwise.
  multipliers = (0.25, 0.5, 1.0, 2.0)
  base = 0.125
  gradients = _gradients(30)
  opt = coolopt.metropolis(make_inner(base), 1.0, multipliers=multipliers, key=4)
  updates, states = _accept_all_run(opt, gradients)
  params = jnp.zeros(3)
  inner_state = make_inner(base).init(params)
  drawn = set()
  for n, g in enumerate(gradients):
    step_state = jax.tree.map(lambda x, n=n: x[n], states.inner_state)
    found = []
    for m in multipliers:
      reference = jax.jit(make_inner(base * m).update)
      expected, expected_state = reference(jnp.asarray(g), inner_state, params)
      if np.asarray(expected).tobytes() == np.asarray(updates[n]).tobytes() and all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for a, b in zip(jax.tree.leaves(expected_state), jax.tree.leaves(step_state), strict=True)
      ):
        found.append(m)
    assert found, n
    drawn.add(found[0])
    inner_state = step_state
  assert len(drawn) >= 3


def test_multipliers_refused_with_a_tracker_inside():
  inner = optax.chain(optax.sgd(0.1), coolopt.track_kinetic_temperature())
  opt = coolopt.metropolis(inner, 1.0, multipliers=(0.5, 1.0))
  params = jnp.zeros(2)
  with pytest.raises(ValueError, match=r'track_kinetic_temperature\(\) after'):
    opt.update(params, opt.init(params), params, value=0.0, value_fn=jnp.sum)
  # Without multipliers the tracker inside sees the update that is proposed.
  plain = coolopt.metropolis(inner, 1.0)
  plain.update(params, plain.init(params), params, value=0.0, value_fn=jnp.sum)


# Inputs checked at trace time.


def test_non_scalar_losses_are_refused():
  opt = coolopt.metropolis(optax.sgd(0.1), 1.0)
  params = jnp.zeros(3)
  state = opt.init(params)
  with pytest.raises(ValueError, match=r'value to be a scalar loss.*shape \(3,\)'):
    jax.jit(lambda p: opt.update(p, state, p, value=p**2, value_fn=jnp.sum))(params)
  with pytest.raises(ValueError, match=r'result of value_fn to be a scalar.*shape \(3,\)'):
    jax.jit(lambda p: opt.update(p, state, p, value=0.0, value_fn=lambda q: q**2))(params)
  with pytest.raises(ValueError, match='params=None'):
    opt.update(params, state, None, value=0.0, value_fn=jnp.sum)


def test_delta_is_computed_in_float32_at_least():
  opt = coolopt.metropolis(optax.sgd(0.1), 1e-6)
  params = jnp.zeros(2, jnp.bfloat16)
  state = opt.init(params)
  value = jnp.asarray(2.0, jnp.bfloat16)
  # bfloat16 cannot tell 2.0 from 2.0078125 - 2**-8; float32 arithmetic on the
  # bfloat16 inputs keeps the one-ulp worsening.
  worse = jnp.asarray(2.015625, jnp.bfloat16)
  _, state = opt.update(params, state, params, value=value, value_fn=lambda _: worse)
  assert state.delta.dtype == jnp.float32
  assert float(state.delta) == 0.015625
  assert not bool(state.accepted)


# Keys of every PRNG implementation, through an orbax checkpoint.


@pytest.mark.parametrize('impl', ['threefry2x32', 'rbg', 'unsafe_rbg'])
def test_typed_keys_survive_a_checkpoint(tmp_path, impl):
  key = jax.random.key(7, impl=impl)
  opt = coolopt.metropolis(
    coolopt.coolmomentum(0.1, 0.9, 20), 0.05, multipliers=(0.5, 1.0), key=key
  )
  loss = lambda p: jnp.sum((p - 1.0) ** 2) + 0.1 * jnp.sum(jnp.sin(7 * p))  # noqa: E731

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params, value=value, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def run(params, state, num_steps):
    for _ in range(num_steps):
      params, state = step(params, state)
    return params, state

  params = jnp.array([3.0, -2.0, 0.5])
  expected_params, expected_state = run(params, opt.init(params), 20)
  assert 0 < int(expected_state.num_accepted) < 20

  params, state = run(params, opt.init(params), 8)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'ckpt', {'params': params, 'state': state})
  checkpointer.wait_until_finished()
  target = jax.eval_shape(lambda: {'params': params, 'state': opt.init(params)})
  restored = checkpointer.restore(tmp_path / 'ckpt', target)
  params, state = run(restored['params'], restored['state'], 12)
  for a, b in zip(
    jax.tree.leaves((params, state)),
    jax.tree.leaves((expected_params, expected_state)),
    strict=True,
  ):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  # Another implementation draws other decisions from the same seed.
  assert state.key.shape == jax.random.key_data(key).shape
