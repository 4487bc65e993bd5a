"""CoolMomentum with the temperature tracker under jit, vmap, pmap, shard_map and sharded jit.

Data-parallel runs use the 8 CPU devices that tests/conftest.py asks XLA for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import coolopt
from tests.library_helpers import as_varying

NUM_DEVICES = 8
NUM_STEPS = 50
PER_DEVICE_BATCH = 4


@pytest.fixture(scope='module', autouse=True)
def eight_devices():
  assert jax.device_count() == NUM_DEVICES, 'tests/conftest.py asks XLA for 8 CPU devices'


def make_optimizer():
  # Cooling ends at step 40 of 50, so the runs cross into plain SGD.
  return optax.chain(coolopt.coolmomentum(0.1, 0.95, 40), coolopt.track_kinetic_temperature())


def initial_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'hidden': {'kernel': jnp.asarray(rng.normal(size=(3, 8)), jnp.float32), 'bias': jnp.zeros(8)},
    'output': {'kernel': jnp.asarray(rng.normal(size=(8, 1)) / 3.0, jnp.float32)},
  }


def loss(params, batch):
  inputs, targets = batch
  hidden = jnp.tanh(inputs @ params['hidden']['kernel'] + params['hidden']['bias'])
  return jnp.mean((hidden @ params['output']['kernel'] - targets) ** 2)


def make_batches(seed=1):
  """Per step, per device: inputs (steps, devices, per_device, 3) and their targets."""
  rng = np.random.default_rng(seed)
  inputs = rng.normal(size=(NUM_STEPS, NUM_DEVICES, PER_DEVICE_BATCH, 3)).astype(np.float32)
  targets = np.sin(inputs.sum(axis=-1, keepdims=True)).astype(np.float32)
  return jnp.asarray(inputs), jnp.asarray(targets)


def full_batch(batches, step):
  """All devices' data of one step as one batch, devices first."""
  inputs, targets = batches
  return inputs[step].reshape(-1, 3), targets[step].reshape(-1, 1)


def apply_gradients(opt, params, state, gradients):
  updates, state = opt.update(gradients, state, params)
  return optax.apply_updates(params, updates), state


def single_device_run(opt, params, batches, gradient_fn):
  """NUM_STEPS jitted steps; `gradient_fn(params, batches, step)` gives the gradient."""

  @jax.jit
  def step(params, state, n):
    return apply_gradients(opt, params, state, gradient_fn(params, batches, n))

  state = opt.init(params)
  temperatures = []
  for n in range(NUM_STEPS):
    params, state = step(params, state, n)
    temperatures.append(coolopt.kinetic_temperature(state))
  return params, state, np.asarray(temperatures)


def mean_of_device_gradients(params, batches, step):
  """The mean of the per-device gradients, summed in device order as the all-reduce does."""
  inputs, targets = batches
  total = None
  for device in range(NUM_DEVICES):
    gradient = jax.grad(loss)(params, (inputs[step, device], targets[step, device]))
    total = gradient if total is None else jax.tree.map(jnp.add, total, gradient)
  return jax.tree.map(lambda g: g / NUM_DEVICES, total)


def full_batch_gradient(params, batches, step):
  return jax.grad(loss)(params, full_batch(batches, step))


def assert_trees_equal(actual, expected):
  jax.tree.map(np.testing.assert_array_equal, actual, expected)


def assert_trees_close(actual, expected, rtol):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-7), actual, expected
  )


def test_coolmomentum_under_jit_matches_op_by_op():
  opt, batches = make_optimizer(), make_batches()
  params, state, temperatures = single_device_run(
    opt, initial_params(), batches, full_batch_gradient
  )
  eager_params, eager_state = initial_params(), opt.init(initial_params())
  for n in range(NUM_STEPS):
    eager_params, eager_state = apply_gradients(
      opt, eager_params, eager_state, full_batch_gradient(eager_params, batches, n)
    )
  # Not bitwise: under jit XLA fuses multiply-adds, with one rounding fewer.
  assert_trees_close(params, eager_params, rtol=1e-5)
  assert state[0][1].count == eager_state[0][1].count == NUM_STEPS
  np.testing.assert_allclose(temperatures[-1], coolopt.kinetic_temperature(eager_state), rtol=1e-3)
  assert loss(params, full_batch(batches, 0)) < loss(initial_params(), full_batch(batches, 0))


def test_coolmomentum_under_vmap_runs_independent_problems():
  opt, num_problems = make_optimizer(), 4
  batches = [make_batches(seed=10 + i) for i in range(num_problems)]
  params = [initial_params(seed=i) for i in range(num_problems)]

  @jax.jit
  def run(params, inputs, targets):
    def step(carry, batch):
      params, state = carry
      gradients = jax.grad(loss)(params, (batch[0].reshape(-1, 3), batch[1].reshape(-1, 1)))
      params, state = apply_gradients(opt, params, state, gradients)
      return (params, state), coolopt.kinetic_temperature(state)

    (params, _), temperatures = jax.lax.scan(step, (params, opt.init(params)), (inputs, targets))
    return params, temperatures

  stack = lambda trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)  # noqa: E731
  batched_params, batched_temperatures = jax.vmap(run)(
    stack(params), *stack([tuple(b) for b in batches])
  )
  assert batched_temperatures.shape == (num_problems, NUM_STEPS)
  for i in range(num_problems):
    alone_params, alone_temperatures = run(params[i], *batches[i])
    # Not bitwise: vmap batches the matrix products into one of another shape.
    assert_trees_close(jax.tree.map(lambda x, i=i: x[i], batched_params), alone_params, 1e-5)
    np.testing.assert_allclose(batched_temperatures[i], alone_temperatures, rtol=1e-4)
  assert len({float(t) for t in batched_temperatures[:, -1]}) == num_problems


def data_parallel_step(opt, axis_name):
  """One step on a device's shard, with gradients averaged over `axis_name`."""

  def step(params, state, batch):
    # Under shard_map the gradient of a replicated (invariant) input is already
    # summed over the axis; a varying copy keeps it local, so the pmean means the
    # same under pmap and shard_map.
    local_params = as_varying(params, axis_name)
    gradients = jax.lax.pmean(jax.grad(loss)(local_params, batch), axis_name)
    return apply_gradients(opt, params, state, gradients)

  return step


def test_coolmomentum_data_parallel_pmap_keeps_replicas_equal():
  opt, batches = make_optimizer(), make_batches()
  step = jax.pmap(data_parallel_step(opt, 'devices'), axis_name='devices')
  replicate = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * NUM_DEVICES), tree)  # noqa: E731
  params = replicate(initial_params())
  state = jax.pmap(opt.init)(params)
  inputs, targets = batches
  for n in range(NUM_STEPS):
    params, state = step(params, state, (inputs[n], targets[n]))
    # Every replica saw other data, and still holds the same parameters, bit for bit.
    for leaf in jax.tree.leaves((params, state)):
      np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))
  assert np.all(state[0][1].count == NUM_STEPS)
  assert coolopt.kinetic_temperature(state).shape == (NUM_DEVICES,)

  expected_params, _, expected_temperatures = single_device_run(
    opt, initial_params(), batches, mean_of_device_gradients
  )
  # Bitwise: the per-device gradients are the same products, and the all-reduce
  # adds them in device order before the division by 8, as the reference does.
  assert_trees_equal(jax.tree.map(lambda x: x[0], params), expected_params)
  np.testing.assert_array_equal(coolopt.kinetic_temperature(state), expected_temperatures[-1])
  # And to float tolerance, the gradient of the loss over the whole batch.
  full_params, _, _ = single_device_run(opt, initial_params(), batches, full_batch_gradient)
  assert_trees_close(expected_params, full_params, rtol=1e-5)


def test_coolmomentum_data_parallel_shard_map_keeps_replicas_equal():
  opt, batches = make_optimizer(), make_batches()
  mesh = Mesh(np.array(jax.devices()), ('devices',))
  step = jax.jit(
    jax.shard_map(
      data_parallel_step(opt, 'devices'),
      mesh=mesh,
      in_specs=(P(), P(), P('devices')),
      out_specs=(P(), P()),
    )
  )
  params = initial_params()
  state = opt.init(params)
  for n in range(NUM_STEPS):
    params, state = step(params, state, full_batch(batches, n))
  # out_specs=P() with check_vma on: JAX has proved the outputs equal on all devices.
  for leaf in jax.tree.leaves(params):
    assert leaf.sharding.is_fully_replicated
    shards = [np.asarray(shard.data) for shard in leaf.addressable_shards]
    for shard in shards[1:]:
      np.testing.assert_array_equal(shard, shards[0])
  assert state[0][1].count == NUM_STEPS

  expected_params, _, expected_temperatures = single_device_run(
    opt, initial_params(), batches, mean_of_device_gradients
  )
  assert_trees_equal(params, expected_params)
  np.testing.assert_array_equal(coolopt.kinetic_temperature(state), expected_temperatures[-1])


def test_coolmomentum_sharded_jit_matches_single_device():
  opt, batches = make_optimizer(), make_batches()
  mesh = Mesh(np.array(jax.devices()), ('devices',))
  replicated, by_example = NamedSharding(mesh, P()), NamedSharding(mesh, P('devices'))

  @jax.jit
  def step(params, state, batch):
    return apply_gradients(opt, params, state, jax.grad(loss)(params, batch))

  params = jax.device_put(initial_params(), replicated)
  state = jax.device_put(opt.init(initial_params()), replicated)
  for n in range(NUM_STEPS):
    batch = jax.device_put(full_batch(batches, n), by_example)
    params, state = step(params, state, batch)
  for leaf in jax.tree.leaves((params, state)):
    assert leaf.sharding.is_fully_replicated
  assert state[0][1].count == NUM_STEPS

  expected_params, _, expected_temperatures = single_device_run(
    opt, initial_params(), batches, full_batch_gradient
  )
  # Not bitwise: XLA splits the batch mean into per-device partial sums.
  assert_trees_close(params, expected_params, rtol=1e-5)
  np.testing.assert_allclose(
    coolopt.kinetic_temperature(state), expected_temperatures[-1], rtol=1e-3
  )
