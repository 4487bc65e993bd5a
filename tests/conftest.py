"""Test set-up: eight CPU devices for the data-parallel tests."""

import os

# Must precede the first import of jax anywhere in the test session.
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
