"""Inputs that used to give silently wrong results or errors that did not name their cause."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coolopt


def _steps(opt, params, num_steps, loss, step_jit=True):
  """Parameters and the state after `num_steps` full-batch steps on `loss`."""

  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params, value=value, value_fn=loss)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step) if step_jit else step
  state = opt.init(params)
  states = []
  for _ in range(num_steps):
    params, state = step(params, state)
    states.append(state)
  return params, jax.tree.map(lambda *x: jnp.stack(x), *states)


def _decisions(temperature, delta, num_steps=40):
  """Accept decisions for proposals whose loss change is exactly `delta`."""
  opt = coolopt.metropolis(optax.identity(), temperature, key=3)
  value = jnp.float32(1.0)

  def step(state, _):
    _, state = opt.update(
      jnp.ones(1), state, jnp.zeros(1), value=value, value_fn=lambda _: value + delta
    )
    return state, state

  _, states = jax.jit(lambda s: jax.lax.scan(step, s, length=num_steps))(opt.init(jnp.zeros(1)))
  return np.asarray(states.accepted), np.asarray(states.temperature)


# 6. Temperature schedules that leave (0, inf).


@pytest.mark.parametrize('bad', [-1.0, 0.0, jnp.nan, jnp.inf, -jnp.inf])
def test_temperature_not_positive_and_finite_is_zero_temperature(bad):
  # Positive at step 0 (so the schedule is accepted when built), then `bad`.
  schedule = lambda n: jnp.where(n < 1, 1.0, bad)  # noqa: E731
  improving, temperature = _decisions(schedule, -2.0)
  # Before: at T = -1 an improving move passed with probability exp(-2) only, and
  # at T = NaN never.
  assert improving.all()
  np.testing.assert_array_equal(temperature[1:], np.float32(bad))
  unchanged, _ = _decisions(schedule, 0.0)
  assert unchanged.all()
  worsening, _ = _decisions(schedule, 1e-6)
  assert worsening[0] and not worsening[1:].any()


def test_temperature_schedule_turning_negative_still_descends():
  loss = lambda x: jnp.sum((x - 1.0) ** 2)  # noqa: E731
  # The schedule crosses zero at step 10 and is -1 from step 20 on.
  opt = coolopt.metropolis(optax.sgd(0.1), optax.linear_schedule(1.0, -1.0, 20), key=0)
  params, state = _steps(opt, jnp.zeros(3), 60, loss)
  assert float(loss(params)) < 1e-9
  assert state.accepted[20:].all()


@pytest.mark.parametrize('at_zero', [-1.0, 0.0, np.nan])
def test_temperature_schedule_checked_at_step_zero(at_zero):
  with pytest.raises(ValueError, match=r'temperature must be > 0: the schedule .* gives'):
    coolopt.metropolis(optax.sgd(0.1), lambda n: jnp.full([], at_zero))


# 7. Warm-up longer than the cooling.


@pytest.mark.parametrize('warmup_steps', [10, 11])
def test_warmup_not_shorter_than_cooling_is_refused(warmup_steps):
  message = f'warmup_steps={warmup_steps} and total_steps=10'
  with pytest.raises(ValueError, match=message):
    coolopt.coolmomentum(0.1, 0.9, 10, warmup_steps=warmup_steps)
  with pytest.raises(ValueError, match=message):
    coolopt.exponential_cooling(0.9, 10, warmup_steps)


def test_warmup_shorter_than_cooling_or_without_cooling_is_accepted():
  assert float(coolopt.exponential_cooling(0.9, 10, 9)(9)) > 0
  assert float(coolopt.linear_cooling(0.9, None, 100)(100)) == np.float32(0.9)


# 8. sgd_sa inside inject_hyperparams, under jit.


def test_injected_sgd_sa_under_jit_equals_eager():
  loss = lambda x: jnp.sum((x - 1.0) ** 2)  # noqa: E731
  opt = optax.inject_hyperparams(coolopt.sgd_sa)(steps_per_epoch=3, initial_temperature=0.5)
  eager = _steps(opt, jnp.array([3.0, -2.0]), 8, loss, step_jit=False)
  jitted = _steps(opt, jnp.array([3.0, -2.0]), 8, loss)
  np.testing.assert_allclose(jitted[0], eager[0], rtol=1e-6)
  metropolis_state = jitted[1].inner_state
  np.testing.assert_array_equal(metropolis_state.accepted, eager[1].inner_state.accepted)
  np.testing.assert_allclose(
    metropolis_state.temperature, 0.5 * 0.8 ** (np.arange(8) // 3), rtol=1e-6
  )
  # And it is the plain sgd_sa.
  plain = _steps(
    coolopt.sgd_sa(steps_per_epoch=3, initial_temperature=0.5), jnp.array([3.0, -2.0]), 8, loss
  )
  np.testing.assert_allclose(jitted[0], plain[0], rtol=1e-6)


# 11. Errors that name the argument, its value and what was expected.


@pytest.mark.parametrize(
  ('build', 'message'),
  [
    (lambda: coolopt.coolmomentum(None, 0.9, 10), 'learning_rate=None'),
    (lambda: coolopt.scale_by_coolmomentum(None, 0.9), 'learning_rate=None'),
    (lambda: coolopt.coolmomentum(0.1, None, 10), 'rho_0=None'),
    (
      lambda: coolopt.coolmomentum(0.1, 0.9, 10, cooling='linear', warmup_steps=None),
      'warmup_steps=None',
    ),
    (lambda: coolopt.metropolis(optax.sgd(0.1), None), 'temperature=None'),
    (lambda: coolopt.random_walk(None), 'scale=None'),
    (
      lambda: coolopt.coolmomentum(jnp.array([0.1, 0.2]), 0.9, 10),
      r'learning_rate=an array of shape \(2,\)',
    ),
    (lambda: coolopt.coolmomentum('0.1', 0.9, 10), "learning_rate='0.1'"),
    (lambda: coolopt.coolmomentum(0.1, lambda n: 0.9, 10), 'rho_0 must be a real number'),
    (lambda: coolopt.metropolis(optax.sgd(0.1), 1.0, multipliers=['a']), r"multipliers=\['a'\]"),
    (lambda: coolopt.metropolis(optax.sgd(0.1), 1.0, multipliers='ab'), "multipliers='ab'"),
    (
      lambda: coolopt.metropolis(optax.sgd(0.1), 1.0, multipliers=[0.5, None]),
      r'multipliers=\[0.5, None\]',
    ),
    (lambda: coolopt.track_kinetic_temperature(every='x'), "every='x'"),
    (lambda: coolopt.track_kinetic_temperature(every=lambda n: 2), 'every must be .* not a'),
  ],
)
def test_invalid_hyperparameter_is_named(build, message):
  with pytest.raises(ValueError, match=message):
    build()


@pytest.mark.parametrize(
  ('key', 'message'),
  [
    (None, 'key=None'),
    (1.5, 'key=1.5'),
    ('a', "key='a'"),
    (True, 'key=True'),
    (2**32, r'key must be an int seed in \[0, 4294967296\).*key=4294967296'),
    (2**70, 'key=1180591620717411303424'),
    (-1, 'key=-1'),
    (np.zeros(3, np.uint32), r'shape \(2,\).*shape \(3,\)'),
    (np.zeros(2, np.float32), 'dtype float32'),
  ],
)
@pytest.mark.parametrize('factory', ['metropolis', 'random_walk', 'sgd_sa'])
def test_invalid_key_is_named(factory, key, message):
  build = {
    'metropolis': lambda: coolopt.metropolis(optax.sgd(0.1), 1.0, key=key),
    'random_walk': lambda: coolopt.random_walk(0.1, key=key),
    'sgd_sa': lambda: coolopt.sgd_sa(steps_per_epoch=3, key=key),
  }[factory]
  with pytest.raises(ValueError, match=message):
    build()


@pytest.mark.parametrize('key', [0, 2**32 - 1, np.uint32(7), np.array([0, 5], np.uint32)])
def test_valid_keys_are_accepted(key):
  state = coolopt.random_walk(0.1, key=key).init(jnp.zeros(2))
  assert state.key.dtype == jnp.uint32


def test_mask_of_the_wrong_structure_is_named_at_init():
  params = {'w': jnp.ones(2), 'b': jnp.zeros(1)}
  opt = coolopt.coolmomentum(0.1, 0.9, 10, weight_decay=1e-4, mask={'a': True})
  with pytest.raises(ValueError, match=r"mask must be .*PyTreeDef\(\{'a': \*\}\).*'b': \*"):
    opt.init(params)
  opt = coolopt.coolmomentum(0.1, 0.9, 10, weight_decay=1e-4, mask={'w': True, 'b': 'no'})
  with pytest.raises(ValueError, match=r"mask must hold booleans .* 'no'"):
    opt.init(params)
  # A prefix, a function and a full tree of booleans are accepted.
  for mask in [{'w': True, 'b': False}, lambda p: jax.tree.map(lambda x: x.ndim > 0, p)]:
    opt = coolopt.coolmomentum(0.1, 0.9, 10, weight_decay=1e-4, mask=mask)
    opt.update(params, opt.init(params), params)


def test_bfloat16_hyperparameters_point_to_hyperparam_dtype():
  params = jnp.zeros(3, jnp.bfloat16)
  opt = optax.inject_hyperparams(coolopt.coolmomentum)(
    learning_rate=0.1, rho_0=0.999, total_steps=10
  )
  with pytest.raises(ValueError, match=re.escape('rho_0 must be in [0, 1)') + '.*hyperparam_dtype'):
    opt.init(params)
  opt = optax.inject_hyperparams(coolopt.coolmomentum, hyperparam_dtype=jnp.float32)(
    learning_rate=0.1, rho_0=0.999, total_steps=10
  )
  updates, _ = opt.update(jnp.ones(3, jnp.bfloat16), opt.init(params), params)
  assert updates.dtype == jnp.bfloat16


# 10. Compile cost linear in the number of parameter leaves.


def _compiled_size(opt, num_leaves):
  """Equations of the step's jaxpr and lines of its compiled HLO, for `num_leaves` leaves."""
  params = {f'p{i:03d}': jnp.full((3,), 0.1 * i) for i in range(num_leaves)}
  loss = lambda p: sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(p))  # noqa: E731

  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params, value=value, value_fn=loss)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  equations = len(jax.make_jaxpr(step)(params, state).jaxpr.eqns)
  hlo_lines = jax.jit(step).lower(params, state).compile().as_text().count('\n')
  return np.array([equations, hlo_lines])


@pytest.mark.parametrize('variant', ['multipliers', 'tracker'])
def test_compiled_step_grows_linearly_with_the_leaves(variant):
  # Each leaf must add the same work: a quadratic cost (the decision recomputed
  # inside every leaf's fusion, a tree walk per leaf) makes the growth from 16 to 32
  # leaves more than twice that from 8 to 16.
  if variant == 'multipliers':
    opt = coolopt.metropolis(
      coolopt.coolmomentum(0.1, 0.9, 100), 1e-2, multipliers=coolopt.SGD_SA_LEARNING_RATES
    )
  else:
    opt = optax.chain(
      coolopt.metropolis(optax.sgd(0.1, momentum=0.9), 1e-2), coolopt.track_kinetic_temperature()
    )
  sizes = [_compiled_size(opt, n) for n in (8, 16, 32)]
  growth = (sizes[2] - sizes[1]) / (sizes[1] - sizes[0])
  assert np.all(growth <= 2.1), (sizes, growth)
