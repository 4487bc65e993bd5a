"""Test set-up: eight CPU devices for the data-parallel tests, one persistent
compilation cache for the whole session and the processes it starts, and one directory
where the test processes share what they compute once."""

import os
import shutil
import tempfile

import pytest

# Must precede the first import of jax anywhere in the test session.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
# Many tests (and the `python -m examples.main` subprocesses, which inherit the
# environment) compile the same small programs: each is compiled once per session. A
# cache directory set by the caller is kept, so that CI can carry it from run to run.
_OWN_CACHE = 'JAX_COMPILATION_CACHE_DIR' not in os.environ
if _OWN_CACHE:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='jax_compilation_cache_')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# What the test processes (pytest-xdist's workers) compute once and share: see
# `tests.library_helpers.once_per_session`.
_OWN_SHARED = 'COOLOPT_TEST_SHARED_DIR' not in os.environ
if _OWN_SHARED:
  os.environ['COOLOPT_TEST_SHARED_DIR'] = tempfile.mkdtemp(prefix='coolopt_tests_')


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
  if _OWN_SHARED:
    shutil.rmtree(os.environ['COOLOPT_TEST_SHARED_DIR'], ignore_errors=True)


# The tests of coolopt itself. They import neither flax nor examples, and .ci/run runs
# them (`-m library`) also against the minimum versions that pyproject.toml declares.
LIBRARY_TESTS = {
  'test_battery.py',
  'test_coolmomentum.py',
  'test_kinetic_temperature.py',
  'test_metropolis.py',
  'test_metropolis_clock.py',
  'test_metropolis_parallel.py',
  'test_parallel.py',
  'test_random_walk.py',
  'test_range_test.py',
  'test_schedules.py',
  'test_sharding.py',
  'test_structure.py',
  'test_thermostat.py',
}


def pytest_collection_modifyitems(items):
  for item in items:
    if item.path.name in LIBRARY_TESTS:
      item.add_marker(pytest.mark.library)


def pytest_ignore_collect(collection_path, config):
  """With `-m library`, the other test modules are not even imported: an environment
  with only coolopt's own dependencies (the minimum versions of .ci/run) lacks theirs."""
  if config.getoption('markexpr') != 'library':
    return None
  if collection_path.suffix == '.py' and collection_path.name.startswith('test_'):
    return True if collection_path.name not in LIBRARY_TESTS else None
  return None
