"""The battery every public transformation passes, in the manner of optax's contrib tests.

One entry per transformation in `CASES` (tests/library_helpers.py); each test runs over
every entry to which its property applies. Adding a transformation means adding one
entry there.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coolopt
from tests.library_helpers import (
  ALL,
  CASES,
  MULTI_STEPS_RULE,
  cases_where,
  map_params,
  parabola,
  reference_run,
  rosenbrock,
  run,
  small_params,
  step_fn,
  types,
)

# Convergence: the targets of optax's own tests.


@pytest.mark.parametrize('target', [parabola, rosenbrock])
@pytest.mark.parametrize('name', cases_where(lambda case: case.converges))
def test_converges(name, target):
  case = CASES[name]
  opt = case.build()
  x0, solution, objective = target()
  step = step_fn(case, opt, objective)

  @jax.jit
  def solve(x0):
    body = lambda _, carry: step(*carry)[:2]  # noqa: E731
    return jax.lax.fori_loop(0, case.converges, body, (x0, opt.init(x0)))

  x, _ = solve(x0)
  np.testing.assert_allclose(x, solution, atol=3e-2)


# Extra arguments, compilation.


@pytest.mark.parametrize('name', ALL)
def test_unknown_extra_args_accepted_and_no_recompile(name):
  case = CASES[name]
  opt = case.build()
  traces = []

  def counted(params, state):
    traces.append(None)
    return step_fn(case, opt, some_unknown_arg=jnp.ones(2))(params, state)

  reference = reference_run(name)  # Without the extra argument.
  params = small_params()
  state = opt.init(params)
  step = jax.jit(counted)
  for _ in range(3):
    params, state, _ = step(params, state)
  assert len(traces) == 1
  chex.assert_trees_all_equal((params, state), reference[:2])


# optax.tree.map_params and inject_hyperparams.


@pytest.mark.parametrize('name', ALL)
def test_map_params_reaches_exactly_the_leaves_that_mirror_the_params(name):
  case = CASES[name]
  opt = case.build()
  params, state, _ = reference_run(name)
  chex.assert_trees_all_equal(map_params(opt, lambda v: v, state), state)
  # Leaves shaped like the params are mapped (displacements); counters, keys and
  # scalars are left alone.
  mapped = map_params(opt, lambda v: jnp.full_like(v, 7), state)
  param_shapes = {p.shape for p in jax.tree.leaves(params)}
  for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(mapped), strict=True):
    if np.shape(old) in param_shapes and jnp.issubdtype(jnp.result_type(old), jnp.floating):
      np.testing.assert_array_equal(new, np.full_like(old, 7))
    else:
      np.testing.assert_array_equal(new, old)


@pytest.mark.parametrize('name', ALL)
def test_inject_hyperparams_gives_equal_results(name):
  case = CASES[name]
  _, state, updates = reference_run(name)
  _, injected_state, injected_updates = run(case, case.inject(), 3)
  chex.assert_trees_all_equal(injected_updates, updates)
  chex.assert_trees_all_equal(injected_state.inner_state, state)


# Dtypes and the structure of the state.


@pytest.mark.parametrize('name', ALL)
def test_init_on_abstract_params(name):
  # As when a checkpoint is restored: init on shapes and dtypes alone.
  opt = CASES[name].build()
  params = small_params(jnp.bfloat16)
  abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
  assert types(jax.eval_shape(opt.init, abstract)) == types(opt.init(params))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name', ALL)
def test_param_dtypes_preserved(name, dtype):
  case = CASES[name]
  if dtype == jnp.float32:
    params, state, history = reference_run(name)
  else:
    params, state, history = run(case, case.build(), 2, params=small_params(dtype))
  for leaf in jax.tree.leaves((params, history)):
    assert leaf.dtype == dtype
  chex.assert_trees_all_equal_shapes_and_dtypes(state, case.build().init(small_params(dtype)))


@pytest.mark.parametrize('name', ALL)
def test_state_stable_under_cond_and_scan(name):
  case = CASES[name]
  opt = case.build()
  params = small_params()
  step = step_fn(case, opt)

  @jax.jit
  def scanned(params, state, key):
    def body(carry, key):
      params, state = carry
      # A condition the compiler cannot fold: both branches must agree on the state.
      take = jax.random.bernoulli(key)
      params, state, _ = jax.lax.cond(
        take, step, lambda p, s: (p, s, jax.tree.map(jnp.zeros_like, p)), params, state
      )
      return (params, state), take

    return jax.lax.scan(body, (params, state), jax.random.split(key, 4))

  initial = opt.init(params)
  (_, state), taken = scanned(params, initial, jax.random.key(1))
  assert 0 < int(np.sum(taken)) < 4  # Both branches ran.
  assert types(state) == types(initial)
  assert types(jax.eval_shape(lambda p, s: step(p, s)[1], params, initial)) == types(initial)


# Schedules.


@pytest.mark.parametrize('name', cases_where(lambda case: case.schedule_arg))
def test_schedule_as_learning_rate(name):
  case = CASES[name]
  value = case.kwargs[case.schedule_arg]
  constant = reference_run(name)
  scheduled = run(case, case.build(**{case.schedule_arg: optax.constant_schedule(value)}), 3)
  chex.assert_trees_all_equal(scheduled, constant)
  # The schedule is read at every step: a different value changes the result.
  changed = run(case, case.build(**{case.schedule_arg: lambda n: 3.0 * value * (n + 1)}), 3)
  pairs = zip(jax.tree.leaves(changed[:2]), jax.tree.leaves(constant[:2]), strict=True)
  assert any(not np.array_equal(a, b) for a, b in pairs)


# MultiSteps.


@pytest.mark.parametrize('name', cases_where(lambda case: case.in_multi_steps))
def test_works_in_multi_steps(name):
  case = CASES[name]
  k = 2
  inner = case.build()
  opt = optax.MultiSteps(inner, every_k_schedule=k)
  params = small_params()
  micro_grads = [
    jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)) + 0.1 * i, params) for i in range(4)
  ]
  state = opt.init(params)
  reference_state = inner.init(params)
  multi_update, inner_update = jax.jit(opt.update), jax.jit(inner.update)
  for i, grads in enumerate(micro_grads):
    updates, state = multi_update(grads, state, params)
    if i % k != k - 1:
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
      continue
    mean = jax.tree.map(lambda *g: sum(g) / k, *micro_grads[i - k + 1 : i + 1])
    expected, reference_state = inner_update(mean, reference_state, params)
    chex.assert_trees_all_close(updates, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('name', cases_where(lambda case: not case.in_multi_steps))
def test_multi_steps_rule_is_documented(name):
  case = CASES[name]
  # metropolis cannot see that MultiSteps wraps it; the rule and the recipe are
  # in its docstring and in the method's page.
  assert MULTI_STEPS_RULE in coolopt.metropolis.__doc__
  assert 'value_fn=mean_loss' in coolopt.metropolis.__doc__
  with open('docs/method.md') as page:
    assert '**Never inside `optax.MultiSteps`.**' in page.read()
  if case.factory is not coolopt.metropolis:
    assert ':func:`metropolis`' in case.factory.__doc__
