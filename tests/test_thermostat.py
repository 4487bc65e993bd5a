"""CoolMomentum with a thermostat: rho follows the measured temperature along a target path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import scipy.linalg

import coolopt
from tests.library_helpers import once_per_session

TARGET_PATHS = ('exponential', 'linear', 'friction')
NUM_DEVICES = 8

# A quadratic 0.5 * sum(h (x - OPTIMUM)^2) in DIMENSION coordinates, started at its
# minimum, with white gradient noise of standard deviation SIGMA, and twice SIGMA (4x the
# variance) from NOISY_FROM on. Away from 0, the parameters' scale bounds no target.
DIMENSION = 512
OPTIMUM = 10.0
CURVATURES = np.linspace(0.2, 1.0, DIMENSION)
SIGMA = 1.0
LEARNING_RATE = 0.01
RHO_0 = 0.99
TOTAL_STEPS = 1000
NOISY_FROM = TOTAL_STEPS // 2


def stationary_temperature(rho, learning_rate, sigma):
  """Mean over the coordinates of the stationary variance of dx at a fixed rho.

  With a = lr (1 + rho) / 2, the state z = (x, dx) of coordinate i evolves as
  z' = A z + b xi with A = [[1 - a h, rho], [-a h, rho]] and b = -a sigma (1, 1):
  its stationary covariance P solves the discrete Lyapunov equation P = A P A' + b b'.
  """
  a = learning_rate * (1.0 + rho) / 2.0
  variances = []
  for h in CURVATURES[:: DIMENSION // 32]:
    transition = np.array([[1.0 - a * h, rho], [-a * h, rho]])
    noise = np.array([[-a * sigma], [-a * sigma]])
    covariance = scipy.linalg.solve_discrete_lyapunov(transition, noise @ noise.T)
    variances.append(covariance[1, 1])
  return float(np.mean(variances))


def run_noisy_quadratic(
  opt, steps=TOTAL_STEPS, noise_factor=2.0, noisy_from=NOISY_FROM, optimum=OPTIMUM
):
  """The thermostat's state after every step, stacked."""
  curvatures = jnp.asarray(CURVATURES, jnp.float32)

  def step(carry, inputs):
    x, state = carry
    n, key = inputs
    sigma = SIGMA * jnp.where(n >= noisy_from, noise_factor, 1.0)
    gradient = curvatures * (x - optimum) + sigma * jax.random.normal(key, x.shape)
    updates, state = opt.update(gradient, state, x)
    return (x + updates, state), coolopt.thermostat_state(state)

  x = jnp.full(DIMENSION, optimum, jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), steps)
  _, trace = jax.jit(lambda: jax.lax.scan(step, (x, opt.init(x)), (jnp.arange(steps), keys)))()
  return jax.tree.map(np.asarray, trace)


def friction(rho):
  return (1.0 - rho) / (1.0 + rho)


def test_follows_the_target_when_the_gradient_noise_changes():
  thermostat = coolopt.coolmomentum(LEARNING_RATE, RHO_0, TOTAL_STEPS, cooling='thermostat')
  trace = run_noisy_quadratic(thermostat)
  window = int(np.ceil(0.05 * TOTAL_STEPS))
  # Cold start, then feedback from the first step on: no step runs rho open-loop.
  assert trace.rho[0] == 0.0 and trace.rho[1] > 0.0
  # Before the noise variance grows 4x and after the controller has had 100 steps to
  # catch up with it, to 3/4 of the run (later even rho = 0 cannot absorb it).
  steps = np.r_[2 * window : NOISY_FROM, NOISY_FROM + 100 : 3 * TOTAL_STEPS // 4]
  measured = trace.kinetic_temperature[steps] / trace.target_temperature[steps]
  assert measured.min() > 0.7 and measured.max() < 1.4, (measured.min(), measured.max())
  # Once the heating from the cold start has settled (about 3 / (1 - rho_0) steps),
  # the temperature of its rho, computed from the dynamics, is the target: the rho
  # follows from the physics, not from a fit to its own noisy measurement.
  for n in (350, 450, 700):
    sigma = SIGMA * (2.0 if n >= NOISY_FROM else 1.0)
    analytic = stationary_temperature(trace.rho[n], LEARNING_RATE, sigma)
    assert 0.7 < analytic / trace.target_temperature[n] < 1.4, (n, trace.rho[n])
  # T_0 by the Langevin relation T = Theta / r from the overdamped temperature
  # Theta = (lr/2)^2 <g^2>, measured over the first 5% of the run; here (lr/2)^2
  # sigma^2, plus the (lr/2)^2 <h^2 (x - x*)^2> of the parameters' thermal spread.
  np.testing.assert_allclose(
    trace.hot_temperature[-1],
    trace.overdamped_temperature[window - 1] / friction(np.float32(RHO_0)),
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    trace.overdamped_temperature[window - 1], (LEARNING_RATE / 2 * SIGMA) ** 2, rtol=0.15
  )
  # The target falls as the exponential clock would make it fall in steady noise.
  rho_clock = coolopt.exponential_cooling(RHO_0, TOTAL_STEPS)(600)
  np.testing.assert_allclose(
    trace.target_temperature[600] / trace.hot_temperature[-1],
    friction(RHO_0) / friction(rho_clock),
    rtol=1e-4,
  )


def test_the_target_is_bounded_by_the_scale_of_the_parameters():
  # Around a minimum at 0 the parameters shrink to their thermal spread: the bound
  # max_step^2 <x^2> is the target, below the Langevin path.
  opt = coolopt.scale_by_thermostat(LEARNING_RATE, RHO_0, 300, max_step=0.02)
  trace = run_noisy_quadratic(opt, steps=300, optimum=0.0)
  assert np.all(trace.target_temperature[1:] <= trace.hot_temperature[1:] * (1 + 1e-6))
  bounded = trace.target_temperature[200] < trace.hot_temperature[200] * 0.1
  assert bounded, (trace.target_temperature[200], trace.hot_temperature[200])


def test_a_temperature_far_above_the_target_raises_the_friction_at_once():
  # At rho near rho_0 the slow correction moves log r by about 2 (1 - rho^2) log(T/T*)
  # per step: a 1000x jump of the gradient noise would take hundreds of steps. The
  # excess over 2x the target goes to log r directly, so rho falls to 0 within steps.
  opt = coolopt.coolmomentum(LEARNING_RATE, RHO_0, TOTAL_STEPS, cooling='thermostat')
  trace = run_noisy_quadratic(opt, steps=300, noise_factor=1e3, noisy_from=250)
  assert trace.rho[249] > 0.9
  assert trace.rho[253] == 0.0, trace.rho[249:254]


@pytest.mark.parametrize('target_path', TARGET_PATHS)
def test_each_target_path_has_the_shape_of_its_clock(target_path):
  opt = coolopt.scale_by_thermostat(0.01, 0.95, 200, target_path=target_path)
  trace = run_noisy_quadratic(opt, steps=210)
  clock = coolopt.thermostat.TARGET_PATHS[target_path](0.95, 200)
  n = np.arange(10, 200, 10)
  expected = friction(np.float32(0.95)) / friction(np.asarray(clock(n)))
  ratio = trace.target_temperature[n] / trace.hot_temperature[-1]
  np.testing.assert_allclose(ratio, expected, rtol=1e-4)
  np.testing.assert_array_equal(trace.rho[200:], 0.0)


@pytest.mark.parametrize('noise_factor', [1e-3, 1e3])
def test_rho_stays_in_range_and_is_zero_from_total_steps(noise_factor):
  # Noise that jumps 1000x up or down drives the controller into both clips.
  total_steps = 300
  opt = coolopt.coolmomentum(0.01, 0.9, total_steps, cooling='thermostat', gain=0.5)
  trace = run_noisy_quadratic(opt, total_steps + 40, noise_factor, noisy_from=100)
  assert np.all((trace.rho >= 0.0) & (trace.rho <= np.float32(0.9)))
  np.testing.assert_array_equal(trace.rho[total_steps:], 0.0)
  clip = np.float32(0.9) if noise_factor < 1 else 0.0
  assert np.sum(trace.rho[:total_steps] == clip) > 20

  # From S on the update is plain SGD at rate lr / 2.
  state = jax.tree.map(lambda x: x[total_steps], trace)
  gradient = jnp.linspace(-1.0, 1.0, DIMENSION)
  updates, _ = opt.update(gradient, (optax.EmptyState(), state), jnp.ones(DIMENSION))
  np.testing.assert_array_equal(updates, -0.005 * gradient)


# The promise: wherever plain SGD at lr/2 converges, the thermostat converges, at every
# rho_0. A one-hidden-layer MLP on scikit-learn's 8x8 digits, at rates where the
# exponential clock kills the network at high rho_0 (final loss ln 10: every ReLU dead).
PROMISE_RHO_0 = (0.0, 0.9, 0.99, 0.999)
PROMISE_RATES = (0.1, 0.3, 1.0)
PROMISE_EPOCHS = 6
PROMISE_BATCH = 32
# From this step on, the measured temperature stays below HOT_FACTOR times the target
# whenever rho > 0 (at rho = 0 it is plain SGD's, which no friction can cool).
SETTLED_FROM = 50
HOT_FACTOR = 4.0


def digits_runs(method):
  """Final training loss, and the thermostat's trace, per (rate, rho_0), rate-major."""
  from sklearn.datasets import load_digits

  data = load_digits()
  images = jnp.asarray(data.data / 16.0, jnp.float32)
  labels = jnp.asarray(data.target)
  steps_per_epoch = len(labels) // PROMISE_BATCH
  total_steps = PROMISE_EPOCHS * steps_per_epoch
  rng = np.random.default_rng(0)
  order = [
    rng.permutation(len(labels))[: steps_per_epoch * PROMISE_BATCH] for _ in range(PROMISE_EPOCHS)
  ]
  order = jnp.asarray(np.concatenate(order).reshape(total_steps, PROMISE_BATCH))

  def loss_fn(params, x, y):
    logits = jax.nn.relu(x @ params['w1'] + params['b1']) @ params['w2'] + params['b2']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def run(learning_rate, rho_0):
    if method == 'thermostat':
      opt = coolopt.coolmomentum(learning_rate, rho_0, total_steps, cooling='thermostat')
    else:  # The exponential clock, or SGD at lr/2: rho_0 = 0.
      rho_0 = rho_0 if method == 'exponential' else 0.0
      opt = coolopt.coolmomentum(learning_rate, rho_0, total_steps)
    key_1, key_2 = jax.random.split(jax.random.PRNGKey(0))
    params = {
      'w1': 0.18 * jax.random.normal(key_1, (64, 32)),
      'b1': jnp.zeros(32),
      'w2': 0.18 * jax.random.normal(key_2, (32, 10)),
      'b2': jnp.zeros(10),
    }

    def step(carry, batch):
      params, state = carry
      gradients = jax.grad(loss_fn)(params, images[batch], labels[batch])
      updates, state = opt.update(gradients, state, params)
      trace = coolopt.thermostat_state(state) if method == 'thermostat' else None
      return (optax.apply_updates(params, updates), state), trace

    (params, _), trace = jax.lax.scan(step, (params, opt.init(params)), order)
    return loss_fn(params, images, labels), trace

  rates, rhos = np.meshgrid(PROMISE_RATES, PROMISE_RHO_0, indexing='ij')
  rates, rhos = rates.ravel().astype(np.float32), rhos.ravel().astype(np.float32)
  return jax.tree.map(np.asarray, jax.jit(jax.vmap(run))(rates, rhos))


@pytest.fixture(scope='module')
def promise_runs():
  # Once per test session, whichever test process asks first.
  return once_per_session(
    'promise_runs',
    lambda _: {method: digits_runs(method) for method in ('exponential', 'thermostat', 'sgd')},
  )


def converged(loss):
  return np.isfinite(loss) & (loss < 0.5 * np.log(10.0))


@pytest.mark.parametrize('rho_0', PROMISE_RHO_0)
@pytest.mark.parametrize('learning_rate', PROMISE_RATES)
def test_converges_wherever_sgd_at_half_the_rate_converges(promise_runs, learning_rate, rho_0):
  run = PROMISE_RATES.index(learning_rate) * len(PROMISE_RHO_0) + PROMISE_RHO_0.index(rho_0)
  sgd_loss, _ = promise_runs['sgd']
  loss, trace = promise_runs['thermostat']
  assert converged(sgd_loss[run])
  assert converged(loss[run]), (loss[run], sgd_loss[run])
  ratio = trace.kinetic_temperature[run] / trace.target_temperature[run]
  hot = ratio[SETTLED_FROM:][trace.rho[run, SETTLED_FROM:] > 0]
  assert np.all(hot < HOT_FACTOR), hot.max()


def test_the_promise_is_tested_where_the_clock_diverges(promise_runs):
  clock_loss, _ = promise_runs['exponential']
  sgd_loss, _ = promise_runs['sgd']
  thermostat_loss, _ = promise_runs['thermostat']
  diverged = ~converged(clock_loss) & converged(sgd_loss)
  # At least at rate 1 with rho_0 0.99 and 0.999, and at 0.3 with 0.999.
  assert diverged.sum() >= 3, clock_loss
  assert np.all(converged(thermostat_loss[diverged]))
  # With rho_0 = 0 the thermostat is SGD at lr/2.
  every_rate = slice(None, None, len(PROMISE_RHO_0))
  np.testing.assert_array_equal(thermostat_loss[every_rate], sgd_loss[every_rate])


def test_state_is_a_checkpointable_pytree_with_an_int32_count():
  opt = coolopt.scale_by_thermostat(0.1, 0.9, 10)
  state = opt.init({'w': jnp.zeros(3)})
  assert state.count.dtype == jnp.int32
  assert state.coolmomentum.count.dtype == jnp.int32
  controller = (state.log_friction, state.rho, state.kinetic_temperature, state.hot_temperature)
  controller += (state.overdamped_temperature,)
  assert all(leaf.dtype == jnp.float32 for leaf in (*controller, state.target_temperature))


def noisy_steps(opt, params, state, steps, seed=0):
  @jax.jit
  def step(params, state, n):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), n)
    gradients = jax.tree.map(lambda p: jnp.sin(3.0 * p) + jax.random.normal(key, p.shape), params)
    updates, state = opt.update(gradients, state, params)
    return optax.apply_updates(params, updates), state, updates

  history = []
  for n in steps:
    params, state, updates = step(params, state, n)
    history.append(updates)
  return params, state, history


def initial_params():
  return {'w': jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4), 'b': jnp.ones(3)}


def test_inject_hyperparams_is_bitwise_equal_to_the_alias():
  hyperparams = {
    'learning_rate': 0.002,
    'rho_0': 0.95,
    'total_steps': 40,
    'hot_steps': 6,
    'gain': 0.1,
    'smoothing': 0.8,
  }
  plain = coolopt.coolmomentum(**hyperparams, cooling='thermostat')
  injected = optax.inject_hyperparams(coolopt.coolmomentum, static_args=('cooling',))(
    **hyperparams, cooling='thermostat'
  )
  _, plain_state, plain_updates = noisy_steps(
    plain, initial_params(), plain.init(initial_params()), range(50)
  )
  _, injected_state, injected_updates = noisy_steps(
    injected, initial_params(), injected.init(initial_params()), range(50)
  )
  assert set(hyperparams) <= set(injected_state.hyperparams)
  jax.tree.map(np.testing.assert_array_equal, injected_updates, plain_updates)
  jax.tree.map(np.testing.assert_array_equal, injected_state.inner_state, plain_state)

  # A changed gain takes effect: the controller corrects harder.
  _, unchanged, _ = noisy_steps(
    injected, initial_params(), injected.init(initial_params()), range(20)
  )
  state = injected.init(initial_params())
  state.hyperparams['gain'] = jnp.asarray(0.5, jnp.float32)
  _, changed, _ = noisy_steps(injected, initial_params(), state, range(20))
  friction = lambda state: coolopt.thermostat_state(state).log_friction  # noqa: E731
  assert friction(unchanged) < 0.0  # rho > 0: the controller acts.
  assert friction(changed) != friction(unchanged)


def test_orbax_checkpoint_resumes_bitwise(tmp_path):
  opt = coolopt.coolmomentum(0.05, 0.95, 40, cooling='thermostat', hot_steps=5)
  final_params, final_state, _ = noisy_steps(
    opt, initial_params(), opt.init(initial_params()), range(50)
  )
  params, state, _ = noisy_steps(opt, initial_params(), opt.init(initial_params()), range(17))
  path = tmp_path / 'checkpoint'
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, {'params': params, 'opt_state': state})
  checkpointer.wait_until_finished()

  fresh = coolopt.coolmomentum(0.05, 0.95, 40, cooling='thermostat', hot_steps=5)
  abstract = jax.eval_shape(initial_params)
  target = {'params': abstract, 'opt_state': jax.eval_shape(fresh.init, abstract)}
  restored = ocp.StandardCheckpointer().restore(path, target)
  assert coolopt.thermostat_state(restored['opt_state']).count == 17
  params, state, _ = noisy_steps(fresh, restored['params'], restored['opt_state'], range(17, 50))
  jax.tree.map(np.testing.assert_array_equal, params, final_params)
  jax.tree.map(np.testing.assert_array_equal, state, final_state)


def pmap_run(opt, average_gradients):
  """20 steps under pmap, each device with its own gradient noise."""

  def step(params, state, n):
    device = jax.lax.axis_index('devices')
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), n), device)
    gradients = jax.tree.map(lambda p: p + jax.random.normal(key, p.shape), params)
    if average_gradients:
      gradients = jax.lax.pmean(gradients, 'devices')
    updates, state = opt.update(gradients, state, params)
    return optax.apply_updates(params, updates), state

  step = jax.pmap(step, axis_name='devices', in_axes=(0, 0, None))
  params = jax.tree.map(lambda x: jnp.stack([x] * NUM_DEVICES), initial_params())
  state = jax.pmap(opt.init)(params)
  for n in range(20):
    params, state = step(params, state, n)
  return params, state


def assert_replicas_equal(tree):
  for leaf in jax.tree.leaves(tree):
    np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))


def test_pmap_keeps_replicas_equal():
  assert jax.device_count() == NUM_DEVICES, 'tests/conftest.py asks XLA for 8 CPU devices'
  opt = coolopt.coolmomentum(0.05, 0.9, 15, cooling='thermostat', hot_steps=3, axis_name='devices')
  params, state = pmap_run(opt, average_gradients=True)
  assert_replicas_equal((params, state))
  assert np.all(coolopt.thermostat_state(state).count == 20)

  # With gradients that differ between devices, the controller still agrees: its
  # measurement is averaged over the axis. Without the axis it would not.
  _, state = pmap_run(opt, average_gradients=False)
  thermostat = coolopt.thermostat_state(state)
  controller = (thermostat.log_friction, thermostat.kinetic_temperature, thermostat.rho)
  assert_replicas_equal(controller)
  opt = coolopt.coolmomentum(0.05, 0.9, 15, cooling='thermostat', hot_steps=3)
  _, state = pmap_run(opt, average_gradients=False)
  assert len(set(np.asarray(coolopt.thermostat_state(state).kinetic_temperature))) > 1


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'target_path': 'cosine'}, 'target_path must be one of'),
    ({'gain': -0.1}, r'gain must be in \[0, inf\), got gain=-0.1'),
    ({'smoothing': 1.0}, r'smoothing must be in \[0, 1\), got smoothing=1.0'),
    ({'hot_steps': 0}, r'hot_steps must be in \[1, inf\), got hot_steps=0'),
    ({'warmup_steps': 5}, r"warmup_steps must be 0 with cooling='thermostat', got warmup_steps=5"),
  ],
)
def test_invalid_thermostat_arguments_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    coolopt.coolmomentum(0.1, 0.9, 100, cooling='thermostat', **kwargs)


def test_max_step_and_params_are_checked():
  with pytest.raises(ValueError, match=r'max_step must be in \(0, inf\), got max_step=0.0'):
    coolopt.scale_by_thermostat(0.1, 0.9, 100, max_step=0.0)
  opt = coolopt.scale_by_thermostat(0.1, 0.9, 100)
  with pytest.raises(ValueError, match='params must be given to the thermostat, got params=None'):
    opt.update(jnp.ones(2), opt.init(jnp.ones(2)))


def test_thermostat_arguments_need_the_thermostat():
  with pytest.raises(ValueError, match="gain apply only with cooling='thermostat'"):
    coolopt.coolmomentum(0.1, 0.9, 100, gain=0.1)
  with pytest.raises(ValueError, match='found 0'):
    coolopt.thermostat_state(coolopt.coolmomentum(0.1, 0.9, 100).init(jnp.zeros(2)))


@pytest.mark.parametrize('accept', [False, True])
def test_inside_metropolis_the_target_follows_every_proposal(accept):
  # A candidate loss always below (accepted) or always infinite (rejected).
  opt = coolopt.coolmomentum(0.05, 0.95, 40, cooling='thermostat', hot_steps=5)
  wrapped = coolopt.metropolis(opt, 1.0, key=0)
  value_fn = (lambda p: -1.0) if accept else (lambda p: jnp.inf)
  params, state = initial_params(), wrapped.init(initial_params())
  for n in range(12):
    gradients = jax.tree.map(lambda p, n=n: jnp.sin(3.0 * p + n), params)
    updates, state = wrapped.update(gradients, state, params, value=0.0, value_fn=value_fn)
    params = optax.apply_updates(params, updates)
  thermostat = coolopt.thermostat_state(state)
  # The clock of the target path advances with every proposal, accepted or not.
  assert thermostat.count == thermostat.coolmomentum.count == 12
  fresh = coolopt.thermostat_state(opt.init(initial_params()))
  if accept:
    assert thermostat.kinetic_temperature > 0.0
  else:
    # The measurement and the controller only see moves that were made.
    names = ('log_friction', 'rho', 'kinetic_temperature', 'overdamped_temperature')
    for name in (*names, 'hot_temperature'):
      np.testing.assert_array_equal(getattr(thermostat, name), getattr(fresh, name))
    jax.tree.map(np.testing.assert_array_equal, params, initial_params())
