"""CoolMomentum against a float64 NumPy transcription of paper Table 1; the optax battery is in
test_battery.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coolopt
from tests.library_helpers import COOLINGS, reference_rho


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def find_coolmomentum_state(opt_state):
  """The one CoolMomentumState in a (nested) optimizer state."""
  found = [
    node
    for node in jax.tree.leaves(
      opt_state, is_leaf=lambda node: isinstance(node, coolopt.CoolMomentumState)
    )
    if isinstance(node, coolopt.CoolMomentumState)
  ]
  assert len(found) == 1, found
  return found[0]


# A non-convex objective with many local minima, and its gradient written by hand.
def sine_bowl(x):
  return jnp.sum(jnp.sin(3.0 * x) + x**2 / 10.0)


def sine_bowl_gradient(x):
  return 3.0 * np.cos(3.0 * x) + x / 5.0


def run_coolmomentum(opt, x0, num_steps):
  """The parameters after each of `num_steps` updates, from a jitted scan."""

  @jax.jit
  def run(x0):
    def step(carry, _):
      x, state = carry
      assert x.dtype == x0.dtype  # float64 under x64, all the way through.
      updates, state = opt.update(jax.grad(sine_bowl)(x), state, x)
      x = optax.apply_updates(x, updates)
      return (x, state), x

    (_, state), xs = jax.lax.scan(step, (x0, opt.init(x0)), length=num_steps)
    return xs, state

  return run(x0)


def reference_trajectory(x0, num_steps, learning_rate, rho, weight_decay=0.0):
  """Paper Table 1 in float64: `learning_rate(n)` and `rho(n)` at n = 0, 1, ..."""
  x = np.array(x0, dtype=np.float64)
  displacement = np.zeros_like(x)
  xs = []
  for n in range(num_steps):
    gradient = sine_bowl_gradient(x) + weight_decay * x
    displacement = rho(n) * displacement - learning_rate(n) * (1.0 + rho(n)) / 2.0 * gradient
    x = x + displacement
    xs.append(x)
  return np.stack(xs)


def max_relative_deviation(xs, expected):
  """Largest deviation over the trajectory, relative to the size of the parameters."""
  deviation = np.max(np.abs(xs - expected), axis=-1)
  return np.max(deviation / np.max(np.abs(expected), axis=-1))


X0 = np.linspace(-2.0, 2.5, 6)
COSINE_DECAY = {'init_value': 0.05, 'decay_steps': 250, 'alpha': 0.1}


def reference_cosine_decay(n):
  t = min(n, COSINE_DECAY['decay_steps']) / COSINE_DECAY['decay_steps']
  alpha = COSINE_DECAY['alpha']
  return COSINE_DECAY['init_value'] * ((1.0 - alpha) * 0.5 * (1.0 + np.cos(np.pi * t)) + alpha)


TRAJECTORY_CASES = [
  pytest.param(cooling, learning_rate, variant, id=f'{cooling}-{learning_rate}-{variant}')
  for cooling in COOLINGS
  for learning_rate in ('constant', 'cosine')
  for variant in ('plain', 'warmup', 'weight_decay')
] + [
  pytest.param('exponential', learning_rate, 'no_cooling', id=f'{learning_rate}-no_cooling')
  for learning_rate in ('constant', 'cosine')
]


@pytest.mark.parametrize(('cooling', 'learning_rate', 'variant'), TRAJECTORY_CASES)
def test_matches_float64_reference(x64, cooling, learning_rate, variant):
  # 300 steps: S = 200 steps of cooling, then 100 of plain SGD.
  num_steps, rho_0 = 300, 0.95
  total_steps = None if variant == 'no_cooling' else 200
  warmup_steps = 20 if variant == 'warmup' else 0
  weight_decay = 0.03 if variant == 'weight_decay' else 0.0
  if learning_rate == 'constant':
    lr, reference_lr = 0.02, lambda n: 0.02
  else:
    lr, reference_lr = optax.cosine_decay_schedule(**COSINE_DECAY), reference_cosine_decay
  opt = coolopt.coolmomentum(
    lr,
    rho_0,
    total_steps,
    cooling=cooling,
    warmup_steps=warmup_steps,
    weight_decay=weight_decay,
  )
  xs, state = run_coolmomentum(opt, jnp.asarray(X0), num_steps)
  assert xs.dtype == jnp.float64
  assert find_coolmomentum_state(state).count == num_steps

  expected = reference_trajectory(
    X0,
    num_steps,
    reference_lr,
    lambda n: reference_rho(cooling, n, rho_0, total_steps, warmup_steps),
    weight_decay,
  )
  # Some coordinates end in another well of the sine than they started in: the
  # test follows the non-convex dynamics, not a short drift near x0.
  assert np.max(np.abs(expected[-1] - X0)) > 0.5
  assert max_relative_deviation(np.asarray(xs), expected) < 1e-9


def test_updates_follow_table_1_step_by_step():
  # Dyadic values: every product and sum is exact in float32, so equality is exact,
  # and an off-by-one in the step of either schedule shows at once.
  learning_rates = jnp.array([1.0, 0.5, 2.0, 0.25, 4.0])
  rhos = jnp.array([0.5, 0.25, 0.75, 0.125, 0.0])
  gradients = np.array([[2.0, -4.0], [-4.0, 8.0], [8.0, 6.0], [6.0, -2.0], [1.0, 1.0]])
  opt = coolopt.scale_by_coolmomentum(lambda n: learning_rates[n], lambda n: rhos[n])
  state = opt.init(jnp.zeros(2))
  displacement = np.zeros(2)
  for n, gradient in enumerate(gradients):
    assert state.count == n
    lr, rho = float(learning_rates[n]), float(rhos[n])
    # dx_{n+1} = rho_n dx_n - lr_n (1 + rho_n) / 2 g_n, dx_0 = 0.
    displacement = rho * displacement - lr * (1.0 + rho) / 2.0 * gradient
    updates, state = jax.jit(opt.update)(jnp.asarray(gradient, jnp.float32), state)
    np.testing.assert_array_equal(updates, displacement)
    np.testing.assert_array_equal(state.displacement, displacement)
  assert state.count == len(gradients)


@pytest.mark.parametrize('cooling', COOLINGS)
def test_first_updates_use_rho_0_then_rho_1(x64, cooling):
  lr, rho_0, S = 0.1, 0.9, 4
  opt = coolopt.coolmomentum(lr, rho_0, S, cooling=cooling)
  rho = [reference_rho(cooling, n, rho_0, S) for n in range(3)]
  gradients = [np.array([1.0, -2.0]), np.array([0.5, 3.0]), np.array([-1.0, 1.0])]
  params = jnp.zeros(2)
  state = opt.init(params)
  updates = []
  for gradient in gradients:
    update, state = opt.update(jnp.asarray(gradient), state, params)
    updates.append(np.asarray(update))
  expected_0 = -lr * (1.0 + rho[0]) / 2.0 * gradients[0]
  expected_1 = rho[1] * expected_0 - lr * (1.0 + rho[1]) / 2.0 * gradients[1]
  expected_2 = rho[2] * expected_1 - lr * (1.0 + rho[2]) / 2.0 * gradients[2]
  np.testing.assert_allclose(updates, [expected_0, expected_1, expected_2], rtol=1e-13)


def test_equals_sgd_with_momentum_for_constant_hyperparameters(x64):
  # dx = -lr' * trace with trace = g + rho * trace: the same dynamics, other rounding.
  lr, rho = 0.02, 0.9
  xs, _ = run_coolmomentum(coolopt.coolmomentum(lr, rho, None), jnp.asarray(X0), 200)
  sgd = optax.sgd(lr * (1.0 + rho) / 2.0, momentum=rho)
  sgd_xs, _ = run_coolmomentum(sgd, jnp.asarray(X0), 200)
  assert max_relative_deviation(np.asarray(xs), np.asarray(sgd_xs)) < 1e-11


def test_differs_from_sgd_with_momentum_once_the_learning_rate_changes(x64):
  # SGD's trace sums raw gradients and the new learning rate rescales all of it;
  # CoolMomentum keeps the displacement, so only the new gradient sees the new rate.
  rho, drop_step = 0.9, 50
  lr = optax.piecewise_constant_schedule(0.04, {drop_step: 0.1})
  cool = coolopt.coolmomentum(lr, rho, None)
  sgd = optax.sgd(lambda n: lr(n) * (1.0 + rho) / 2.0, momentum=rho)

  def updates_and_gradients(opt):
    x, state, history = jnp.asarray(X0), opt.init(jnp.asarray(X0)), []
    step = jax.jit(lambda x, state: opt.update(jax.grad(sine_bowl)(x), state, x))
    for _ in range(drop_step + 20):
      updates, state = step(x, state)
      history.append((updates, jax.grad(sine_bowl)(x)))
      x = optax.apply_updates(x, updates)
    return [np.stack(column) for column in zip(*history, strict=True)], x

  (cool_updates, gradients), cool_x = updates_and_gradients(cool)
  (sgd_updates, _), sgd_x = updates_and_gradients(sgd)
  np.testing.assert_allclose(cool_updates[:drop_step], sgd_updates[:drop_step], rtol=1e-10)

  previous, gradient = cool_updates[drop_step - 1], gradients[drop_step]
  new_step_size = 0.004 * (1.0 + rho) / 2.0
  np.testing.assert_allclose(
    cool_updates[drop_step], rho * previous - new_step_size * gradient, rtol=1e-12
  )
  np.testing.assert_allclose(
    sgd_updates[drop_step], 0.1 * rho * previous - new_step_size * gradient, rtol=1e-9
  )
  assert np.max(np.abs(cool_x - sgd_x)) > 1e-2


# What the battery (test_battery.py) does not cover: bitwise equality under
# inject_hyperparams across the end of cooling, half-precision rounding, masks.


def params_and_gradients(dtype=jnp.float32):
  params = {'w': jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(3, 4), 'b': jnp.ones(4, dtype)}
  gradients = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.5, params)
  return params, gradients


def inject_coolmomentum(**kwargs):
  return optax.inject_hyperparams(coolopt.coolmomentum, hyperparam_dtype=jnp.float32)(**kwargs)


def inject_and_alias(cooling, weight_decay, total_steps):
  hyperparams = {
    'learning_rate': 0.05,
    'rho_0': 0.95,
    'total_steps': total_steps,
    'warmup_steps': 5,
    'weight_decay': weight_decay,
  }
  return (
    inject_coolmomentum(**hyperparams, cooling=cooling),
    coolopt.coolmomentum(**hyperparams, cooling=cooling),
  )


@pytest.mark.parametrize('cooling', COOLINGS)
@pytest.mark.parametrize('weight_decay', [0.0, 1e-2])
@pytest.mark.parametrize('jit_init', [False, True])
@pytest.mark.parametrize('total_steps', [32, 40])
def test_inject_hyperparams_is_bitwise_equal_to_the_alias(
  cooling, weight_decay, jit_init, total_steps
):
  # S = 40 is not a power of two: a concrete S must not round t = n/S differently
  # from a traced one. Initialising outside jit and updating inside it is the usual
  # loop (and once broke the state structure).
  injected, plain = inject_and_alias(cooling, weight_decay, total_steps=total_steps)

  def run(opt):
    params = params_and_gradients()[0]
    state = jax.jit(opt.init)(params) if jit_init else opt.init(params)

    @jax.jit
    def step(params, state):
      gradients = jax.tree.map(lambda p: jnp.cos(3.0 * p) + 0.5, params)
      updates, state = opt.update(gradients, state, params)
      return optax.apply_updates(params, updates), state, updates

    history = []
    for _ in range(50):  # Past total_steps.
      params, state, updates = step(params, state)
      history.append(updates)
    return history, state

  plain_updates, plain_state = run(plain)
  injected_updates, injected_state = run(injected)
  for name in ('learning_rate', 'rho_0', 'weight_decay'):
    assert injected_state.hyperparams[name].dtype == jnp.float32
  jax.tree.map(np.testing.assert_array_equal, injected_updates, plain_updates)
  jax.tree.map(np.testing.assert_array_equal, injected_state.inner_state, plain_state)


@pytest.mark.parametrize('cooling', COOLINGS)
def test_inject_hyperparams_changes_take_effect(cooling):
  opt = inject_coolmomentum(learning_rate=0.1, rho_0=0.9, total_steps=10, cooling=cooling)
  params, gradients = params_and_gradients()
  state = opt.init(params)
  state.hyperparams['learning_rate'] = jnp.asarray(0.2, jnp.float32)
  updates, _ = jax.jit(opt.update)(gradients, state, params)
  expected, _ = coolopt.coolmomentum(0.2, 0.9, 10, cooling=cooling).update(
    gradients, coolopt.coolmomentum(0.2, 0.9, 10).init(params), params
  )
  jax.tree.map(np.testing.assert_array_equal, updates, expected)


def float32_displacement(displacement, gradients, lr, rho):
  """The next displacement with rho and the step size in float32, as NumPy rounds it."""
  rho = np.float32(rho)
  step_size = np.float32(lr) * (np.float32(1.0) + rho) / np.float32(2.0)
  return jax.tree.map(
    lambda dx, g: rho * np.asarray(dx, np.float32) - step_size * np.asarray(g, np.float32),
    displacement,
    gradients,
  )


@pytest.mark.parametrize('cooling', COOLINGS)
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_preserves_dtype_with_float32_schedules(cooling, dtype):
  lr, rho_0, S = 0.1, 0.99, 6
  opt = coolopt.coolmomentum(lr, rho_0, S, cooling=cooling)
  rho = COOLINGS[cooling](rho_0, S)
  params, gradients = params_and_gradients(dtype)
  state = opt.init(params)
  expected = jax.tree.map(jnp.zeros_like, params)
  # Op by op: under jit, XLA on CPU fuses rho * dx - step_size * g into a fused
  # multiply-add, one rounding fewer than NumPy's.
  for n in range(S + 2):
    updates, state = opt.update(gradients, state, params)
    coolmomentum_state = find_coolmomentum_state(state)
    for leaf in jax.tree.leaves(updates) + jax.tree.leaves(coolmomentum_state.displacement):
      assert leaf.dtype == dtype
    assert coolmomentum_state.count.dtype == jnp.int32
    # rho and the step size in float32 (rho_0 = 0.99 is 0.98828125 in bfloat16),
    # the result rounded once to the parameters' dtype.
    expected = jax.tree.map(
      lambda dx: dx.astype(dtype), float32_displacement(expected, gradients, lr, rho(n))
    )
    jax.tree.map(np.testing.assert_array_equal, updates, expected)


def test_accumulator_dtype_float32_with_bfloat16_params():
  lr, rho = 0.1, 0.9
  opt = coolopt.coolmomentum(lr, rho, None, accumulator_dtype=jnp.float32)
  params, gradients = params_and_gradients(jnp.bfloat16)
  state = opt.init(params)
  displacement = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), params)
  for _ in range(5):
    updates, state = opt.update(gradients, state, params)  # Op by op, as above.
    displacement = float32_displacement(displacement, gradients, lr, rho)
    state_displacement = find_coolmomentum_state(state).displacement
    assert {leaf.dtype for leaf in jax.tree.leaves(state_displacement)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
    jax.tree.map(np.testing.assert_array_equal, state_displacement, displacement)
    jax.tree.map(
      lambda u, d: np.testing.assert_array_equal(u, d.astype(jnp.bfloat16)), updates, displacement
    )


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'rho_0': 1.0}, r'rho_0 must be in \[0, 1\), got rho_0=1.0'),
    ({'rho_0': -0.1}, r'rho_0 must be in \[0, 1\), got rho_0=-0.1'),
    ({'total_steps': 0}, r'total_steps must be in \(0, inf\), got total_steps=0'),
    ({'warmup_steps': -1}, r'warmup_steps must be in \[0, inf\), got warmup_steps=-1'),
    ({'weight_decay': -1e-4}, r'weight_decay must be in \[0, inf\), got weight_decay=-0.0001'),
    ({'learning_rate': 0}, r'learning_rate must be in \(0, inf\), got learning_rate=0'),
    ({'learning_rate': -0.1}, r'learning_rate=-0.1'),
    (
      {'cooling': 'cubic'},
      "'exponential', 'linear', 'friction', 'thermostat', got cooling='cubic'",
    ),
  ],
)
def test_invalid_hyperparameters_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    coolopt.coolmomentum(**({'learning_rate': 0.1, 'rho_0': 0.9, 'total_steps': 10} | kwargs))


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'learning_rate': 0.0}, 'learning_rate=0.0'),
    ({'momentum': 1.0}, r'momentum must be in \[0, 1\), got momentum=1.0'),
    ({'momentum': -0.5}, 'momentum=-0.5'),
  ],
)
def test_scale_by_coolmomentum_invalid_hyperparameters_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    coolopt.scale_by_coolmomentum(**({'learning_rate': 0.1, 'momentum': 0.9} | kwargs))


@pytest.mark.parametrize('cooling', COOLINGS)
def test_traced_hyperparameters(cooling):
  params, gradients = params_and_gradients()

  def first_updates(learning_rate, rho_0, total_steps, warmup_steps, weight_decay):
    opt = coolopt.coolmomentum(
      learning_rate,
      rho_0,
      total_steps,
      cooling=cooling,
      warmup_steps=warmup_steps,
      weight_decay=weight_decay,
    )
    state = opt.init(params)
    for _ in range(3):
      updates, state = opt.update(gradients, state, params)
    return updates

  hyperparams = (0.1, 0.9, 4, 1, 1e-2)
  # A few ulp: XLA folds the concrete hyperparameters with other rounding.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
    jax.jit(first_updates)(*hyperparams),
    first_updates(*hyperparams),
  )


@pytest.mark.parametrize('as_callable', [False, True])
def test_weight_decay_mask(as_callable):
  lr, rho, weight_decay = 0.1, 0.9, 0.5
  mask = {'w': True, 'b': False}
  opt = coolopt.coolmomentum(
    lr, rho, None, weight_decay=weight_decay, mask=(lambda _: mask) if as_callable else mask
  )
  params, gradients = params_and_gradients()
  updates, _ = opt.update(gradients, opt.init(params), params)
  step_size = lr * (1.0 + rho) / 2.0
  np.testing.assert_allclose(
    updates['w'], -step_size * (gradients['w'] + weight_decay * params['w']), rtol=1e-6
  )
  np.testing.assert_allclose(updates['b'], -step_size * gradients['b'], rtol=1e-6)


def test_total_steps_is_required():
  # CoolMomentum without a cooling length never cools: the length must be given.
  with pytest.raises(TypeError, match='total_steps'):
    coolopt.coolmomentum(0.01, 0.99)
  rho = coolopt.coolmomentum(0.01, 0.99, None)  # explicit: no cooling
  params = jnp.ones(2)
  updates, _ = rho.update(jnp.ones(2), rho.init(params), params)
  np.testing.assert_allclose(updates, -0.01 * (1 + 0.99) / 2, rtol=1e-6)
