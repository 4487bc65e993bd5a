"""The shape of the library: imports without cycles, one measurement of the temperature."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import coolopt

PACKAGE = pathlib.Path(coolopt.__file__).parent


def coolopt_imports(path: pathlib.Path) -> set[str]:
  """The coolopt modules that a module imports, at any depth of its code."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names if alias.name.startswith('coolopt.')}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('coolopt'):
      if node.module == 'coolopt':  # from coolopt import _checks, schedules
        found |= {f'coolopt.{alias.name}' for alias in node.names}
      else:
        found.add(node.module)
  return found


def import_graph() -> dict[str, set[str]]:
  modules = {f'coolopt.{path.stem}': path for path in PACKAGE.glob('*.py')}
  modules['coolopt'] = modules.pop('coolopt.__init__')
  return {name: coolopt_imports(path) & set(modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle of the graph as a list of modules, or None; a depth-first search."""
  state = dict.fromkeys(graph, 'new')

  def visit(node, path):
    state[node] = 'open'
    for child in sorted(graph[node]):
      if state[child] == 'open':
        return [*path[path.index(child) :], child]
      if state[child] == 'new' and (cycle := visit(child, [*path, child])):
        return cycle
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if state[node] == 'new' and (cycle := visit(node, [node])):
      return cycle
  return None


def test_no_module_of_coolopt_imports_another_in_a_circle():
  graph = import_graph()
  assert 'coolopt.alias' in graph['coolopt']
  assert {'coolopt.coolmomentum', 'coolopt.thermostat', 'coolopt.metropolis'} <= graph[
    'coolopt.alias'
  ]
  assert find_cycle(graph) is None, find_cycle(graph)


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'b'}}) is None


def test_no_frame_inspection():
  for path in PACKAGE.glob('*.py'):
    text = path.read_text()
    assert '_getframe' not in text and 'f_back' not in text, path


def test_thermostat_measures_the_temperature_that_kinetic_temperature_reports():
  # bfloat16 parameters: under jit the thermostat must measure the rounded updates
  # it returns, as track_kinetic_temperature does. On the first update the smoothed
  # temperature is the measurement itself.
  opt = optax.chain(coolopt.scale_by_thermostat(0.3, 0.9, 100), coolopt.track_kinetic_temperature())
  params = {
    'w': jnp.linspace(-3.0, 3.0, 999, dtype=jnp.bfloat16),
    'b': jnp.full((3, 5), 0.7, jnp.bfloat16),
  }
  gradients = jax.tree.map(lambda p: jnp.sin(7.0 * p.astype(jnp.float32)) + 0.01, params)
  gradients = jax.tree.map(lambda g: g.astype(jnp.bfloat16), gradients)
  updates, state = jax.jit(opt.update)(gradients, opt.init(params), params)
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
  measured = coolopt.thermostat_state(state).kinetic_temperature
  assert measured > 0.0
  assert measured == coolopt.kinetic_temperature(state)
  returned = np.concatenate([np.asarray(u, np.float64).ravel() for u in jax.tree.leaves(updates)])
  np.testing.assert_allclose(measured, np.mean(returned**2), rtol=1e-6)


def test_library_tests_import_neither_flax_nor_examples():
  from tests.conftest import LIBRARY_TESTS

  tests = pathlib.Path(__file__).parent
  # The library's tests and the one helper module they share.
  library = {*LIBRARY_TESTS, 'library_helpers.py'}
  for name in sorted(library):
    assert (tests / name).exists(), name
    for node in ast.walk(ast.parse((tests / name).read_text())):
      if isinstance(node, ast.Import):
        modules = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom):
        modules = [node.module or '']
      else:
        continue
      for module in modules:
        top = module.split('.')[0]
        assert top not in {'flax', 'examples', 'tensorflow', 'tensorflow_datasets'}, (name, module)
        if top == 'tests' and module != 'tests.conftest':
          assert f'{module.split(".")[1]}.py' == 'library_helpers.py', (name, module)
