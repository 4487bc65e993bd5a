"""`coolopt.metropolis` on eight CPU devices: pmap, shard_map and sharded jit.

Every replica sees different data. With `axis_name` the wrapper averages the
current and the candidate loss over the replicas, and the key is the same on all
of them, so every replica takes the same decision and the parameters stay equal.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import coolopt
from tests.library_helpers import as_varying

NUM_DEVICES = 8
NUM_STEPS = 300
PER_DEVICE_BATCH = 16
FEATURES = 4
AXIS = 'batch'
# Large multipliers overshoot on some minibatches: some proposals are refused.
TEMPERATURE = 1e-3
MULTIPLIERS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

pytestmark = pytest.mark.skipif(
  jax.device_count() < NUM_DEVICES, reason=f'needs {NUM_DEVICES} devices'
)


@functools.cache
def _data():
  """Logistic-regression minibatches, (steps, global batch, ...); device i gets slice i."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(NUM_STEPS, NUM_DEVICES * PER_DEVICE_BATCH, FEATURES)).astype(np.float32)
  logits = x @ np.array([2.0, -1.0, 0.5, 1.5], np.float32)
  y = (logits + rng.normal(size=logits.shape) > 0).astype(np.float32)
  return x, y


def _per_device(array):
  """(steps, global batch, ...) -> (devices, steps, per-device batch, ...), as sharded."""
  steps, _, *rest = array.shape
  return array.reshape(steps, NUM_DEVICES, PER_DEVICE_BATCH, *rest).swapaxes(0, 1)


def _loss(params, batch):
  x, y = batch
  return jnp.mean(optax.sigmoid_binary_cross_entropy(x @ params['w'] + params['b'], y))


PARAMS = {'w': jnp.zeros(FEATURES), 'b': jnp.zeros([])}


def _optimizer(axis_name):
  return coolopt.metropolis(
    optax.sgd(1.0), TEMPERATURE, multipliers=MULTIPLIERS, key=0, axis_name=axis_name
  )


def _train(opt, grad_axis):
  """Scans a data-parallel train step over the minibatches; returns per-step history."""

  def step(carry, batch):
    params, state = carry
    local = params
    if grad_axis is not None:
      # Under shard_map the gradient of a replicated (invariant) input is summed
      # over the axis implicitly; differentiating a varying copy keeps it local,
      # and the explicit pmean then means the same under pmap and shard_map.
      local = as_varying(params, grad_axis)
    value, grads = jax.value_and_grad(_loss)(local, batch)
    if grad_axis is not None:
      grads = jax.lax.pmean(grads, grad_axis)
    updates, state = opt.update(grads, state, params, value=value, value_fn=_loss, batch=batch)
    params = optax.apply_updates(params, updates)
    return (params, state), (params, state.accepted, value)

  def train(params, state, batches):
    (_, state), history = jax.lax.scan(step, (params, state), batches)
    return state, history

  return train


def _replicate(tree):
  return jax.tree.map(lambda a: np.broadcast_to(a, (NUM_DEVICES, *np.shape(a))), tree)


@functools.cache
def _pmap_run(axis_name):
  opt = _optimizer(axis_name)
  x, y = _data()
  train = jax.pmap(_train(opt, AXIS), axis_name=AXIS)
  return jax.device_get(
    train(_replicate(PARAMS), _replicate(opt.init(PARAMS)), (_per_device(x), _per_device(y)))
  )


def _full_data_loss(params):
  x, y = _data()
  return float(_loss(params, (x.reshape(-1, FEATURES), y.reshape(-1))))


def _assert_same_on_every_replica(tree):
  for leaf in jax.tree.leaves(tree):
    leaf = np.asarray(leaf)
    for replica in leaf[1:]:
      assert replica.tobytes() == leaf[0].tobytes()


def test_pmap_replicas_take_the_same_decisions():
  state, (params, accepted, values) = _pmap_run(AXIS)
  # Different data per device: the local losses differ (all are log 2 at zero).
  assert len(set(values[:, 1].tolist())) == NUM_DEVICES
  _assert_same_on_every_replica((params, accepted, state))
  rate = coolopt.acceptance_rate(state)
  assert rate.shape == (NUM_DEVICES,)
  print(f'pmap acceptance rate {float(rate[0]):.3f}')
  assert 0.0 < float(rate[0]) < 1.0
  first, last = (jax.tree.map(lambda p, i=i: p[0, i], params) for i in (0, -1))
  assert _full_data_loss(last) < 0.75 * _full_data_loss(first)


def test_shard_map_matches_pmap():
  opt = _optimizer(AXIS)
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))

  def train(params, state, batches):
    # A leading axis per replica, to compare the replicas' copies.
    return jax.tree.map(lambda a: a[None], _train(opt, AXIS)(params, state, batches))

  train = jax.jit(
    jax.shard_map(train, mesh=mesh, in_specs=(P(), P(), P(None, AXIS)), out_specs=P(AXIS))
  )
  state, (params, accepted, values) = jax.device_get(train(PARAMS, opt.init(PARAMS), _data()))
  _assert_same_on_every_replica((params, accepted, state))
  assert 0.0 < float(coolopt.acceptance_rate(state)[0]) < 1.0
  # The same computation as under pmap, to the last bit.
  expected = _pmap_run(AXIS)
  for got, want in zip(
    jax.tree.leaves((state, params, accepted, values)), jax.tree.leaves(expected), strict=True
  ):
    assert got.tobytes() == want.tobytes()


def test_without_axis_name_replicas_diverge():
  # Each replica tests its own minibatch loss: the same proposal (the gradients
  # are still averaged) is accepted on some replicas and refused on others.
  state, (params, accepted, _) = _pmap_run(None)
  disagree = np.nonzero(np.any(accepted != accepted[:1], axis=0))[0]
  print(f'without axis_name the decisions first differ at step {disagree[0]}')
  assert disagree.size > 0
  assert not np.array_equal(params['w'][:, -1], np.broadcast_to(params['w'][0, -1], (8, 4)))
  assert len(set(np.asarray(state.num_accepted).tolist())) > 1


def test_sharded_jit_matches_single_device():
  # Global arrays: the losses are means over the whole batch, so no axis name.
  opt = _optimizer(None)
  train = jax.jit(_train(opt, None))
  mesh = jax.make_mesh((NUM_DEVICES,), (AXIS,), axis_types=(AxisType.Auto,))
  batches = jax.device_put(_data(), NamedSharding(mesh, P(None, AXIS)))
  assert len(batches[0].sharding.device_set) == NUM_DEVICES
  state, (params, accepted, _) = train(PARAMS, opt.init(PARAMS), batches)

  device = jax.devices()[0]
  single = jax.device_put((PARAMS, opt.init(PARAMS), _data()), device)
  expected_state, (expected_params, expected_accepted, _) = train(*single)
  assert len(expected_accepted.sharding.device_set) == 1

  np.testing.assert_array_equal(accepted, expected_accepted)
  assert 0.0 < float(coolopt.acceptance_rate(state)) < 1.0
  # The reductions may be ordered differently: equal to float rounding.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, expected_params
  )
  np.testing.assert_array_equal(state.num_accepted, expected_state.num_accepted)


def test_sgd_sa_with_axis_name_keeps_replicas_in_lock_step():
  opt = coolopt.sgd_sa(
    MULTIPLIERS, initial_temperature=TEMPERATURE, steps_per_epoch=50, key=0, axis_name=AXIS
  )
  x, y = _data()
  train = jax.pmap(_train(opt, AXIS), axis_name=AXIS)
  state, (params, accepted, _) = jax.device_get(
    train(_replicate(PARAMS), _replicate(opt.init(PARAMS)), (_per_device(x), _per_device(y)))
  )
  _assert_same_on_every_replica((params, accepted, state))
  assert 0.0 < float(coolopt.acceptance_rate(state)[0]) < 1.0
  # Six epochs of 50 steps: the temperature has been cooled five times.
  np.testing.assert_allclose(state.temperature, TEMPERATURE * 0.8**5, rtol=1e-6)
