"""The battery every public transformation passes, in the manner of optax's contrib tests.

One entry per transformation in `CASES`; each test runs over every entry to which its
property applies. Adding a transformation means adding one entry here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import coolopt


@dataclasses.dataclass(frozen=True)
class Case:
  """One public transformation and how the battery drives it.

  Attributes:
    factory: the public function; `factory(**kwargs)` builds the transformation.
    kwargs: its arguments for the battery (a small problem, few steps).
    metropolis: whether the update takes `value` and `value_fn`.
    converges: steps to converge on the parabola and on Rosenbrock; None where the
      transformation is not an optimizer on its own (a proposal, a tracker).
    schedule_arg: the argument that takes an optax schedule, if any.
    static_args: arguments `optax.inject_hyperparams` must keep static.
    in_multi_steps: whether it works inside `optax.MultiSteps`; when not, the rule
      is documented (`MULTI_STEPS_RULE`).
  """

  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict[str, Any]
  metropolis: bool = False
  converges: int | None = None
  schedule_arg: str | None = 'learning_rate'
  static_args: tuple[str, ...] = ()
  in_multi_steps: bool = True

  def build(self, **overrides: Any) -> optax.GradientTransformation:
    return self.factory(**{**self.kwargs, **overrides})

  def inject(self) -> optax.GradientTransformation:
    return optax.inject_hyperparams(
      self.factory, static_args=self.static_args, hyperparam_dtype=jnp.float32
    )(**self.kwargs)


def _coolmomentum(**kwargs: Any) -> Case:
  return Case(
    coolopt.coolmomentum,
    {'learning_rate': 2e-3, 'rho_0': 0.9, 'total_steps': 2000, **kwargs},
    converges=3000,
  )


CASES = {
  'coolmomentum_exponential': _coolmomentum(cooling='exponential'),
  'coolmomentum_linear': _coolmomentum(cooling='linear'),
  'coolmomentum_friction': _coolmomentum(cooling='friction'),
  'coolmomentum_thermostat': _coolmomentum(cooling='thermostat'),
  'coolmomentum_warmup': _coolmomentum(warmup_steps=50),
  'coolmomentum_weight_decay': _coolmomentum(weight_decay=1e-5),
  'scale_by_coolmomentum': Case(
    coolopt.scale_by_coolmomentum, {'learning_rate': 2e-3, 'momentum': 0.9}, converges=3000
  ),
  'scale_by_thermostat': Case(
    coolopt.scale_by_thermostat,
    {'learning_rate': 2e-3, 'rho_0': 0.9, 'total_steps': 2000},
    converges=3000,
  ),
  'metropolis_sgd': Case(
    coolopt.metropolis,
    # SGD-SA's idea: large steps are tried, and refused where they overshoot.
    {'inner': optax.sgd(1e-3), 'temperature': 1e-6, 'multipliers': (1.0, 2.0, 4.0), 'key': 0},
    metropolis=True,
    converges=5000,
    schedule_arg='temperature',
    static_args=('key',),
    in_multi_steps=False,
  ),
  'metropolis_coolmomentum': Case(
    coolopt.metropolis,
    {
      'inner': coolopt.coolmomentum(2e-3, 0.9, 2000),
      'temperature': 1e-6,
      'multipliers': (0.5, 1.0),
      'key': 0,
    },
    metropolis=True,
    converges=3000,
    schedule_arg='temperature',
    static_args=('key',),
    in_multi_steps=False,
  ),
  'sgd_sa': Case(
    coolopt.sgd_sa,
    {
      'learning_rates': (4e-3, 2e-3, 1e-3),
      'initial_temperature': 1e-6,
      'steps_per_epoch': 100,
      'key': 0,
    },
    metropolis=True,
    converges=5000,
    schedule_arg=None,
    # optax.exponential_decay tests cooling_factor in Python: it cannot be traced.
    static_args=('learning_rates', 'cooling_factor', 'steps_per_epoch', 'key'),
    in_multi_steps=False,
  ),
  'random_walk': Case(
    coolopt.random_walk, {'scale': 0.1, 'key': 0}, schedule_arg='scale', static_args=('key',)
  ),
  'track_kinetic_temperature': Case(
    coolopt.track_kinetic_temperature, {'every': 2}, schedule_arg=None
  ),
}

MULTI_STEPS_RULE = 'Not inside** `optax.MultiSteps`'


def cases_where(condition: Callable[[Case], bool]) -> list[str]:
  return [name for name, case in CASES.items() if condition(case)]


ALL = cases_where(lambda case: True)


def parabola(dtype=jnp.float32):
  target = jnp.array([1.0, -1.0, 1.0], dtype)
  return jnp.array([-1.0, 10.0, 1.0], dtype), target, lambda x: jnp.sum((x - target) ** 2)


def rosenbrock(dtype=jnp.float32):
  def objective(x):
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2

  return jnp.array([0.0, 0.0], dtype), jnp.array([1.0, 1.0], dtype), objective


def loss(params: optax.Params, **_: Any) -> chex.Array:
  """A loss on the battery's small parameter tree; extra keyword arguments are ignored."""
  return sum(jnp.sum((p.astype(jnp.float32) - 0.5) ** 2) for p in jax.tree.leaves(params))


def small_params(dtype=jnp.float32) -> optax.Params:
  return {'w': jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(3, 4), 'b': jnp.ones(4, dtype)}


def update(case: Case, opt, grads, state, params, objective=loss, **extra):
  """One update, with the loss and the loss function where the transformation takes them."""
  if case.metropolis:
    extra = dict(extra, value=objective(params), value_fn=objective)
  return opt.update(grads, state, params, **extra)


def step_fn(case: Case, opt, objective=loss, **extra):
  def step(params, state):
    grads = jax.grad(objective)(params)
    updates, state = update(case, opt, grads, state, params, objective, **extra)
    return optax.apply_updates(params, updates), state, updates

  return step


def run(case: Case, opt, num_steps: int = 3, params=None, **extra):
  """Parameters, state and the updates of each step, from a jitted step."""
  params = small_params() if params is None else params
  state = opt.init(params)
  step = jax.jit(step_fn(case, opt, **extra))
  history = []
  for _ in range(num_steps):
    params, state, updates = step(params, state)
    history.append(updates)
  return params, state, history


@functools.cache
def reference_run(name: str):
  """`run` of the entry as built, three steps: the reference of several tests."""
  case = CASES[name]
  return run(case, case.build(), 3)


def types(tree):
  return jax.tree.map(
    lambda x: (jnp.shape(x), jnp.result_type(x), getattr(x, 'weak_type', None)), tree
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


def map_params(opt, fn, state, *rest):
  """`optax.tree.map_params`, or `optax.tree_utils.tree_map_params` before optax 0.2.5."""
  tree = getattr(optax, 'tree', None)
  mapper = getattr(tree, 'map_params', None) or optax.tree_utils.tree_map_params
  return mapper(opt, fn, state, *rest)


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
