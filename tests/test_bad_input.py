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


# 11. Integer and complex parameters.

_LOSS = lambda p: sum(jnp.sum(jnp.abs(x - 1.0) ** 2) for x in jax.tree.leaves(p))  # noqa: E731

# Each transformation, and the name its refusal gives.
_TRAINERS = {
  'coolmomentum': (lambda: coolopt.coolmomentum(0.5, 0.9, 100), 'CoolMomentum'),
  'scale_by_coolmomentum': (lambda: coolopt.scale_by_coolmomentum(0.5, 0.9), 'CoolMomentum'),
  'metropolis': (lambda: coolopt.metropolis(optax.sgd(0.5, momentum=0.9), 1e-9), 'metropolis'),
  'metropolis_coolmomentum': (
    lambda: coolopt.metropolis(coolopt.coolmomentum(2.0, 0.9, 100), 1e-9),
    'metropolis',
  ),
  'sgd_sa': (lambda: coolopt.sgd_sa(steps_per_epoch=10), 'metropolis'),
  'random_walk': (lambda: coolopt.random_walk(0.5), 'random_walk'),
}


@pytest.mark.parametrize('name', list(_TRAINERS))
@pytest.mark.parametrize(
  ('leaf', 'dtype'), [(jnp.array([3, 3]), 'int32'), (jnp.ones(2, bool), 'bool')]
)
def test_integer_parameters_are_refused_naming_the_leaf(name, leaf, dtype):
  # Before: CoolMomentum truncated every update to 0 and never moved; metropolis
  # took the integer displacement for the clock and kept a rejected move ([-4, -4]).
  build, owner = _TRAINERS[name]
  params = {'w': jnp.zeros(2), 'layer': {'count': leaf}}
  message = (
    f'{owner} needs floating-point (or complex) parameters, got '
    f"params['layer']['count'] of dtype {dtype} and shape (2,)"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    build().init(params)


def test_integer_accumulator_and_real_accumulator_of_complex_parameters_are_refused():
  with pytest.raises(ValueError, match=r'accumulator_dtype must be None .* got accumulator_dtype='):
    coolopt.coolmomentum(0.1, 0.9, 10, accumulator_dtype=jnp.int32)
  opt = coolopt.coolmomentum(0.1, 0.9, 10, accumulator_dtype=jnp.float32)
  message = "params['z'] is complex (complex64): its displacement would lose its imaginary part"
  with pytest.raises(ValueError, match=re.escape(message)):
    opt.init({'w': jnp.zeros(2), 'z': jnp.zeros(2, jnp.complex64)})


def _complex_params():
  return {'w': jnp.array([0.5, -1.0]), 'z': jnp.array([0.2 - 1.0j, 2.0 + 0.5j], jnp.complex64)}


def test_kinetic_temperature_of_complex_updates_counts_two_real_parameters():
  # Before: the imaginary part was dropped, and an update of 1j had temperature 0.
  tracker = coolopt.track_kinetic_temperature()
  params = jnp.zeros(1, jnp.complex64)
  _, state = tracker.update(jnp.array([1j], jnp.complex64), tracker.init(params), params)
  assert float(coolopt.kinetic_temperature(state)) == 0.5  # |1j|^2 over 2 real parameters
  # The temperature of the same updates split into real pairs, as optax splits them.
  params, updates = _complex_params(), jax.tree.map(lambda x: 3.0 * x + 1j, _complex_params())
  _, state = tracker.update(updates, tracker.init(params), params)
  split = optax.contrib.split_real_and_imaginary(tracker)
  _, split_state = split.update(updates, split.init(params), params)
  np.testing.assert_allclose(
    coolopt.kinetic_temperature(state), coolopt.kinetic_temperature(split_state), rtol=1e-6
  )


@pytest.mark.parametrize(
  'build',
  [
    lambda wrap: optax.with_extra_args_support(wrap(coolopt.coolmomentum(0.1, 0.9, 20))),
    lambda wrap: coolopt.metropolis(wrap(coolopt.coolmomentum(0.1, 0.9, 20)), 1e-3, key=2),
  ],
  ids=['coolmomentum', 'metropolis'],
)
def test_complex_parameters_move_as_pairs_of_real_ones(build):
  # The same run as on the parameters split into real pairs (optax's convention for
  # complex parameters); the gradient of a real loss is conjugated for descent.
  def run(opt):
    params, state = _complex_params(), opt.init(_complex_params())
    for _ in range(20):
      value, grads = jax.value_and_grad(_LOSS)(params)
      grads = jax.tree.map(jnp.conj, grads)
      updates, state = opt.update(grads, state, params, value=value, value_fn=_LOSS)
      params = optax.apply_updates(params, updates)
    return params

  params = run(build(lambda tx: tx))
  split_params = run(build(optax.contrib.split_real_and_imaginary))
  assert params['z'].dtype == jnp.complex64
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), params, split_params)
  assert float(_LOSS(params)) < 0.5 * float(_LOSS(_complex_params()))


def test_metropolis_rolls_back_a_rejected_complex_move():
  opt = coolopt.metropolis(coolopt.coolmomentum(0.1, 0.9, 20), 1e-9)
  params = _complex_params()
  state = opt.init(params)
  grads = jax.tree.map(jnp.conj, jax.grad(_LOSS)(params))
  # Uphill: the conjugated gradient's step raises the loss, and is rejected.
  updates, new_state = opt.update(
    jax.tree.map(jnp.negative, grads), state, params, value=_LOSS(params), value_fn=_LOSS
  )
  assert not bool(new_state.accepted)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0), updates)
  jax.tree.map(
    np.testing.assert_array_equal,
    new_state.inner_state[1].displacement,
    state.inner_state[1].displacement,
  )


def test_a_complex_loss_is_refused():
  opt = coolopt.metropolis(optax.sgd(0.1), 1e-3)
  params = _complex_params()
  with pytest.raises(ValueError, match=r'value to be a real scalar loss, got a complex one'):
    opt.update(params, opt.init(params), params, value=1j, value_fn=_LOSS)


def test_random_walk_moves_real_and_imaginary_parts_by_the_scale():
  opt = coolopt.random_walk(0.25, key=3)
  params = jnp.zeros(20000, jnp.complex64)
  moves, _ = opt.update(jnp.zeros_like(params), opt.init(params), params)
  assert moves.dtype == jnp.complex64
  parts = np.stack([np.real(moves), np.imag(moves)])
  np.testing.assert_allclose(parts.std(axis=1), 0.25, rtol=0.05)
  assert abs(np.corrcoef(parts)[0, 1]) < 0.05
