"""Test set-up: eight CPU devices for the data-parallel tests, and one persistent
compilation cache for the whole session and the processes it starts."""

import os
import shutil
import tempfile

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


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
