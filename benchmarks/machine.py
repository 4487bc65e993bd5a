"""The machine a benchmark ran on, for the figures it prints."""

import os
import platform

import jax
import optax


def machine() -> str:
  """Device, CPU model and core count, jax version, on one line."""
  model = platform.processor() or 'unknown CPU'
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  device = jax.devices()[0]
  return (
    f'device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)); '
    f'host: {model}, {os.cpu_count()} cores; jax {jax.__version__}, optax {optax.__version__}'
  )
