"""The rescaled temperature of paper Eq. 22, for CoolMomentum and for optax's optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coolopt

OPTIMIZERS = {
  'coolmomentum': lambda: coolopt.coolmomentum(0.1, 0.9, 10),
  'adam': lambda: optax.adam(0.05),
  'sgd': lambda: optax.sgd(0.5),
}


def mixed_params():
  """Leaves of several shapes and dtypes; the bfloat16 one is large enough that a mean
  accumulated in bfloat16 would be visibly off."""
  return {
    'kernel': jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32).reshape(2, 3, 4),
    'embedding': jnp.linspace(-2.0, 2.0, 1024, dtype=jnp.bfloat16).reshape(64, 16),
    'bias': jnp.array([0.5, -0.25, 1.0], jnp.float16),
    'scale': jnp.asarray(1.5, jnp.float32),
  }


def gradients_at(params, step):
  return jax.tree.map(
    lambda p: jnp.sin((step + 1.0) * p.astype(jnp.float32) + step).astype(p.dtype), params
  )


def mean_square(updates):
  """The mean over all parameters of the squared update, in float64."""
  values = np.concatenate([np.asarray(u, np.float64).ravel() for u in jax.tree.leaves(updates)])
  return np.mean(values**2)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_temperature_is_the_mean_squared_update(name):
  opt = optax.chain(OPTIMIZERS[name](), coolopt.track_kinetic_temperature())
  params = mixed_params()
  state = opt.init(params)
  assert coolopt.kinetic_temperature(state) == 0.0
  step = jax.jit(opt.update)
  for n in range(4):
    updates, state = step(gradients_at(params, n), state, params)
    temperature = coolopt.kinetic_temperature(state)
    assert temperature.dtype == jnp.float32 and temperature.shape == ()
    # Summed in float32 from the updates in their own dtypes.
    np.testing.assert_allclose(temperature, mean_square(updates), rtol=1e-5)
    assert state[1].count == n + 1
    params = optax.apply_updates(params, updates)


def test_temperature_of_bfloat16_updates_is_computed_in_float32():
  # The square of 1 + 2**-7 needs more bits than bfloat16 has, and a bfloat16 sum
  # of 4096 such squares would stop growing at a few hundred.
  updates = {'w': jnp.full((4096,), 1.0 + 2.0**-7, jnp.bfloat16)}
  tracker = coolopt.track_kinetic_temperature()
  _, state = tracker.update(updates, tracker.init(updates))
  assert state.kinetic_temperature.dtype == jnp.float32
  np.testing.assert_allclose(state.kinetic_temperature, (1.0 + 2.0**-7) ** 2, rtol=1e-6)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_updates_pass_through_unchanged(name):
  tracked = optax.chain(OPTIMIZERS[name](), coolopt.track_kinetic_temperature())
  untracked = OPTIMIZERS[name]()
  params = mixed_params()
  tracked_state, untracked_state = tracked.init(params), untracked.init(params)
  for n in range(3):
    gradients = gradients_at(params, n)
    tracked_updates, tracked_state = jax.jit(tracked.update)(gradients, tracked_state, params)
    updates, untracked_state = jax.jit(untracked.update)(gradients, untracked_state, params)
    jax.tree.map(np.testing.assert_array_equal, tracked_updates, updates)
    jax.tree.map(np.testing.assert_array_equal, tracked_state[0], untracked_state)
    params = optax.apply_updates(params, updates)


def cooled(learning_rate):
  return optax.chain(
    coolopt.coolmomentum(learning_rate, 0.9, 10), coolopt.track_kinetic_temperature()
  )


NESTINGS = {
  'chain': lambda: cooled(0.1),
  'chain_of_chains': lambda: optax.chain(optax.clip_by_global_norm(10.0), cooled(0.1)),
  'inject_hyperparams': lambda: optax.inject_hyperparams(cooled, hyperparam_dtype=jnp.float32)(
    learning_rate=0.1
  ),
  'multi_steps': lambda: optax.MultiSteps(cooled(0.1), every_k_schedule=2),
}


@pytest.mark.parametrize('nesting', NESTINGS)
def test_found_in_nested_states(nesting):
  opt = NESTINGS[nesting]()
  params = mixed_params()
  state = opt.init(params)
  for n in range(2):  # Two micro-steps make one step of MultiSteps.
    updates, state = jax.jit(opt.update)(gradients_at(params, n), state, params)
  # The update of the last real step, which MultiSteps returns only on its second call.
  np.testing.assert_allclose(coolopt.kinetic_temperature(state), mean_square(updates), rtol=1e-5)
  assert coolopt.kinetic_temperature(state) > 0.0


@pytest.mark.parametrize(
  ('opt', 'found'),
  [
    (optax.sgd(0.1), 0),
    (coolopt.coolmomentum(0.1, 0.9, 10), 0),
    (
      optax.chain(
        coolopt.track_kinetic_temperature(), optax.sgd(0.1), coolopt.track_kinetic_temperature()
      ),
      2,
    ),
  ],
  ids=['sgd', 'coolmomentum', 'twice'],
)
def test_error_when_absent_or_duplicated(opt, found):
  state = opt.init(mixed_params())
  with pytest.raises(
    ValueError, match=f'exactly one KineticTemperatureState, found {found}'
  ) as error:
    coolopt.kinetic_temperature(state)
  assert 'coolopt.track_kinetic_temperature()' in str(error.value)


def test_temperature_per_replica_under_pmap():
  num_devices = jax.local_device_count()
  assert num_devices == 8, 'tests/conftest.py asks XLA for 8 CPU devices'
  opt = optax.chain(coolopt.coolmomentum(0.1, 0.9, 10), coolopt.track_kinetic_temperature())
  params = {'w': jnp.ones((num_devices, 5)), 'b': jnp.zeros((num_devices, 2))}
  # A different gradient on every replica, and no pmean: the temperatures differ.
  gradients = {
    'w': jnp.arange(num_devices * 5, dtype=jnp.float32).reshape(num_devices, 5) / 10.0,
    'b': -jnp.ones((num_devices, 2)),
  }
  state = jax.pmap(opt.init)(params)
  updates, state = jax.pmap(opt.update)(gradients, state, params)
  temperatures = coolopt.kinetic_temperature(state)
  assert temperatures.shape == (num_devices,)
  for replica in range(num_devices):
    replica_updates = jax.tree.map(lambda u, r=replica: u[r], updates)
    np.testing.assert_allclose(temperatures[replica], mean_square(replica_updates), rtol=1e-6)
  assert len(set(np.asarray(temperatures).tolist())) == num_devices


def test_temperature_under_jit_equals_eager():
  opt = optax.chain(optax.adam(0.05), coolopt.track_kinetic_temperature())
  params = mixed_params()
  state = opt.init(params)
  _, eager_state = opt.update(gradients_at(params, 0), state, params)
  _, jitted_state = jax.jit(opt.update)(gradients_at(params, 0), state, params)
  # The same sums in another order: float32 rounding apart, whatever the XLA version.
  np.testing.assert_allclose(
    coolopt.kinetic_temperature(jitted_state), coolopt.kinetic_temperature(eager_state), rtol=1e-5
  )


@pytest.mark.parametrize('every', [1, 3])
def test_every_k_steps_computes_at_steps_0_k_2k_and_keeps_the_last_value(every):
  opt = coolopt.track_kinetic_temperature(every=every)
  params = jnp.zeros(2)
  state = opt.init(params)
  update = jax.jit(opt.update)
  seen = []
  for n in range(7):
    _, state = update(jnp.full(2, float(n + 1)), state, params)
    seen.append(float(coolopt.kinetic_temperature(state)))
  # The update at step n is n + 1 everywhere: its mean square is (n + 1)**2.
  expected = [float((n - n % every + 1) ** 2) for n in range(7)]
  assert seen == expected


@pytest.mark.parametrize('every', [0, -2, 2.5])
def test_every_must_be_a_positive_integer(every):
  with pytest.raises(ValueError, match=f'every={every!r}'):
    coolopt.track_kinetic_temperature(every=every)
