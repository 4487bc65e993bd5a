"""Sharded parameters (FSDP-style): every transformation's state follows the parameters.

On the eight CPU devices of tests/conftest.py, the parameters are sharded over a 2-D
mesh with `NamedSharding`; with explicit mesh axes too where the installed JAX has them
(`jax.sharding.AxisType`, `jax.set_mesh`), in the manner of optax's
contrib/_sharding_test.py. Every entry of the battery (tests/library_helpers.py) runs.
"""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests.library_helpers import CASES, loss, map_params, update

EXPLICIT_AXES = hasattr(jax.sharding, 'AxisType') and hasattr(jax, 'set_mesh')
# Explicit mesh axes where this JAX has them; sharding by NamedSharding alone always.
MODES = ['named', 'explicit'] if EXPLICIT_AXES else ['named']
SPECS = {'w': P('data', 'model'), 'b': P('data')}


def make_mesh(mode: str) -> jax.sharding.Mesh:
  devices = np.asarray(jax.devices()[:8]).reshape(4, 2)
  if mode == 'explicit':
    explicit = (jax.sharding.AxisType.Explicit,) * 2
    return jax.sharding.Mesh(devices, ('data', 'model'), axis_types=explicit)
  return jax.sharding.Mesh(devices, ('data', 'model'))


def in_mesh(mesh, mode):
  return jax.set_mesh(mesh) if mode == 'explicit' else contextlib.nullcontext()


def sharded_params(mesh) -> dict[str, jax.Array]:
  params = {
    'w': jnp.linspace(-1.0, 1.0, 16 * 8, dtype=jnp.float32).reshape(16, 8),
    'b': jnp.linspace(0.0, 1.0, 16, dtype=jnp.float32),
  }
  return {k: jax.device_put(v, NamedSharding(mesh, SPECS[k])) for k, v in params.items()}


def typeof(x):
  """`jax.typeof` (with the sharding in the type under explicit axes), or before JAX
  0.6 the abstract value and the sharding."""
  if hasattr(jax, 'typeof'):
    return jax.typeof(x), x.sharding
  return x.shape, x.dtype, x.weak_type, x.sharding


def jitted_step(name):
  case = CASES[name]
  opt = case.build()

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = update(case, opt, grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  return opt, step


def assert_same_sharding(leaf, param):
  assert leaf.shape == param.shape
  assert leaf.sharding.is_equivalent_to(param.sharding, param.ndim), (
    leaf.sharding,
    param.sharding,
  )


ALL_GATHER = re.compile(r'=\s*\(?(\w+)\[([\d,]*)\][^=]*?\ball-gather(?:-start)?\(')


def gathered_sizes(hlo: str) -> list[int]:
  """The number of elements of the result of every all-gather in compiled HLO text."""
  sizes = []
  for line in hlo.splitlines():
    if match := ALL_GATHER.search(line):
      dims = [int(d) for d in match.group(2).split(',') if d]
      sizes.append(int(np.prod(dims)) if dims else 1)
  return sizes


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', list(CASES))
def test_state_is_sharded_like_the_params_and_no_parameter_is_gathered(name, mode):
  mesh = make_mesh(mode)
  with in_mesh(mesh, mode):
    params = sharded_params(mesh)
    opt, step = jitted_step(name)
    states = [opt.init(params)]
    if mode == 'explicit':
      # With automatic axes, jit places what depends on no input (the zeros of a
      # fresh state) on one device: give such a jit out_shardings, or init eagerly.
      states.append(jax.jit(opt.init)(params))
    # Under jit an update gathers no parameter-sized array: every shard is updated
    # where it lies, and only scalars (losses, norms) are reduced across devices.
    hlo = step.lower(params, states[-1]).compile().as_text()
    smallest = min(p.size for p in jax.tree.leaves(params))
    assert all(size < smallest for size in gathered_sizes(hlo)), gathered_sizes(hlo)
    new_params, after, updates = step(params, states[-1])
    _, after_two, _ = step(new_params, after)
    states += [after, after_two]
    jax.tree.map(assert_same_sharding, updates, params)
    jax.tree.map(assert_same_sharding, new_params, params)
    for state in states:
      # The leaves that mirror a parameter (displacements) are sharded as it is.
      map_params(opt, assert_same_sharding, state, params)
    # From one update to the next the types are the same, and under explicit axes
    # from init on. (With automatic axes, jit places a scalar that depends on no
    # input, such as a fresh count, on one device, and an update's on the mesh.)
    assert jax.tree.map(typeof, after) == jax.tree.map(typeof, after_two)
    if mode == 'explicit':
      for state in states[:2]:
        assert jax.tree.map(typeof, state) == jax.tree.map(typeof, after)


def test_gathered_sizes_finds_a_gathered_parameter():
  mesh = make_mesh('named')
  params = sharded_params(mesh)
  replicated = NamedSharding(mesh, P())
  gather = jax.jit(lambda p: jax.lax.with_sharding_constraint(2.0 * p['w'], replicated))
  assert params['w'].size in gathered_sizes(gather.lower(params).compile().as_text())
  assert gathered_sizes('  %add = f32[16,8]{1,0} add(f32[16,8] %a, f32[16,8] %b)') == []


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', [n for n, case in CASES.items() if case.metropolis])
def test_metropolis_decision_is_one_scalar_for_all_shards(name, mode):
  mesh = make_mesh(mode)
  with in_mesh(mesh, mode):
    params = sharded_params(mesh)
    opt, step = jitted_step(name)
    state = jax.jit(opt.init)(params)
    decisions = []
    for _ in range(4):
      params, state, updates = step(params, state)
      metropolis_state = state
      assert metropolis_state.accepted.shape == ()
      assert metropolis_state.accepted.sharding.is_fully_replicated
      shard_values = {bool(s.data) for s in metropolis_state.accepted.addressable_shards}
      assert len(shard_values) == 1
      decision = shard_values.pop()
      decisions.append(decision)
      # Every shard of every parameter moved, or none did.
      for leaf in jax.tree.leaves(updates):
        for shard in leaf.addressable_shards:
          assert bool(np.any(np.asarray(shard.data) != 0)) == decision
