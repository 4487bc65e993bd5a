"""A run checkpointed with orbax mid-way and resumed continues the cooling bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import coolopt

TOTAL_STEPS = 80
CHECKPOINT_STEP = 37


def make_optimizer(cooling):
  return optax.chain(
    coolopt.coolmomentum(0.05, 0.99, TOTAL_STEPS, cooling=cooling, weight_decay=1e-3),
    coolopt.track_kinetic_temperature(),
  )


def initial_params():
  return {
    'kernel': jnp.linspace(-1.5, 2.0, 12, dtype=jnp.float32).reshape(4, 3),
    'bias': jnp.array([0.5, -0.5, 0.25], jnp.bfloat16),
  }


def loss(params, step):
  # A different objective at every step, as minibatches are.
  phase = jnp.asarray(step, jnp.float32) / 7.0
  kernel, bias = params['kernel'], params['bias'].astype(jnp.float32)
  return jnp.sum(jnp.sin(3.0 * kernel + phase) + kernel**2 / 10.0) + jnp.sum((bias - phase) ** 2)


def train(opt, params, state, steps):
  """The params after each of `steps`, and the final state."""

  @jax.jit
  def step(params, state, n):
    updates, state = opt.update(jax.grad(loss)(params, n), state, params)
    return optax.apply_updates(params, updates), state

  trajectory = []
  for n in steps:
    params, state = step(params, state, n)
    trajectory.append(params)
  return trajectory, state


def coolmomentum_count(opt_state):
  return opt_state[0][1].count


@pytest.mark.parametrize('cooling', ['exponential', 'friction'])
def test_resumed_run_continues_bitwise(tmp_path, cooling):
  opt = make_optimizer(cooling)
  uninterrupted, final_state = train(
    opt, initial_params(), opt.init(initial_params()), range(TOTAL_STEPS)
  )

  trajectory, state = train(
    opt, initial_params(), opt.init(initial_params()), range(CHECKPOINT_STEP)
  )
  checkpointer = ocp.StandardCheckpointer()
  path = tmp_path / 'checkpoint'
  checkpointer.save(path, {'params': trajectory[-1], 'opt_state': state})
  checkpointer.wait_until_finished()
  del trajectory, state

  # As a fresh process would: a new optimizer, and only shapes and dtypes to
  # restore into.
  resumed_opt = make_optimizer(cooling)
  abstract_params = jax.eval_shape(initial_params)
  target = {
    'params': abstract_params,
    'opt_state': jax.eval_shape(resumed_opt.init, abstract_params),
  }
  restored = ocp.StandardCheckpointer().restore(path, target)
  params, state = restored['params'], restored['opt_state']
  assert jax.tree.structure(state) == jax.tree.structure(final_state)
  assert params['bias'].dtype == jnp.bfloat16
  # The step count is in the state, so the cooling resumes at step 37, not at 0.
  assert coolmomentum_count(state) == CHECKPOINT_STEP
  assert coolmomentum_count(state).dtype == jnp.int32

  resumed, state = train(resumed_opt, params, state, range(CHECKPOINT_STEP, TOTAL_STEPS))
  for actual, expected in zip(resumed, uninterrupted[CHECKPOINT_STEP:], strict=True):
    jax.tree.map(np.testing.assert_array_equal, actual, expected)
  jax.tree.map(np.testing.assert_array_equal, state, final_state)
  assert coolmomentum_count(state) == TOTAL_STEPS

  # Restarting the cooling from rho_0 (a fresh state with the restored params) does
  # not continue the run: what the checkpoint keeps matters.
  restarted, _ = train(
    resumed_opt,
    restored['params'],
    resumed_opt.init(restored['params']),
    range(CHECKPOINT_STEP, TOTAL_STEPS),
  )
  assert not np.array_equal(restarted[-1]['kernel'], uninterrupted[-1]['kernel'])
