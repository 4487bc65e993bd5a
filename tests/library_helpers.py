"""What the library's tests share: the battery's table of every public transformation
(`CASES`, one entry each; tests/test_battery.py and tests/test_sharding.py run over it),
its objectives and drivers, the data-parallel helpers, and `once_per_session`. It imports
neither flax nor examples, so the library's tests also run on the minimum versions of
.ci/run."""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import pickle
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


def map_params(opt, fn, state, *rest):
  """`optax.tree.map_params`, or `optax.tree_utils.tree_map_params` before optax 0.2.5."""
  tree = getattr(optax, 'tree', None)
  mapper = getattr(tree, 'map_params', None) or optax.tree_utils.tree_map_params
  return mapper(opt, fn, state, *rest)


def as_varying(x, axis_name):
  """`x` marked as varying over `axis_name` (`jax.lax.pcast`; `pvary` before it)."""
  if hasattr(jax.lax, 'pcast'):
    return jax.lax.pcast(x, axis_name, to='varying')
  return jax.lax.pvary(x, axis_name)


COOLINGS = {
  'exponential': coolopt.exponential_cooling,
  'linear': coolopt.linear_cooling,
  'friction': coolopt.friction_cooling,
}


def reference_rho(cooling, n, rho_0, total_steps, warmup_steps=0):
  """rho_n in float64, transcribed from DESIGN.md §1 and paper Eqs. 20-21 / Table 1."""
  n, rho_0 = np.float64(n), np.float64(rho_0)
  if n < warmup_steps:
    return 0.0
  if total_steps is None:
    return float(rho_0)
  S = np.float64(total_steps)
  # Past S the formulas may divide by zero or overflow; the clip at 0 is the value.
  with np.errstate(divide='ignore', over='ignore', invalid='ignore'):
    if cooling == 'exponential':
      alpha = (1.0 - rho_0) ** (1.0 / S)
      rho = 1.0 - (1.0 - rho_0) / alpha**n
    elif cooling == 'linear':
      rho = rho_0 * (1.0 - n / S) / abs(1.0 - rho_0 * n / S)
    elif cooling == 'friction':
      c = (1.0 - rho_0) / (1.0 + rho_0)
      beta = c ** (1.0 / S)
      r = c / beta**n
      rho = (1.0 - r) / (1.0 + r)
    else:
      raise ValueError(cooling)
  return 0.0 if n >= S or np.isnan(rho) else float(max(0.0, rho))


def once_per_session(name: str, compute: Callable[[str], Any]) -> Any:
  """`compute(directory)` once per test session, whichever test process asks first: the
  others (pytest-xdist's workers) wait for it and read its pickled result.

  `directory` is where `compute` may write files that outlive it (a built site); it and
  the result live in the session's shared directory (tests/conftest.py), which is removed
  when the session ends.
  """
  root = os.environ['COOLOPT_TEST_SHARED_DIR']
  directory = os.path.join(root, name)
  result_path = os.path.join(root, f'{name}.pickle')
  with open(os.path.join(root, f'{name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not os.path.exists(result_path):
      os.makedirs(directory, exist_ok=True)
      result = compute(directory)
      with open(result_path + '.tmp', 'wb') as f:
        pickle.dump(result, f)
      os.replace(result_path + '.tmp', result_path)
      return result
    with open(result_path, 'rb') as f:
      return pickle.load(f)
