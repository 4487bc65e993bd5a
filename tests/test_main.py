"""The XLA flags that examples.main sets before JAX starts."""

import os
import subprocess
import sys

from examples import main
from tests.helpers import REPO_ROOT

FLAG = '--xla_cpu_experimental_ynn_fusion_type='


def test_set_xla_flags_adds_the_cpu_flags_and_keeps_the_users():
  environ = {}
  main.set_xla_flags(environ)
  assert environ['XLA_FLAGS'] == f'{FLAG}-individual_convolution'

  environ = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'}
  main.set_xla_flags(environ)
  assert environ['XLA_FLAGS'].split() == [
    '--xla_force_host_platform_device_count=2',
    f'{FLAG}-individual_convolution',
  ]

  # A value the user chose wins.
  environ = {'XLA_FLAGS': f'{FLAG}-reduce'}
  main.set_xla_flags(environ)
  assert environ['XLA_FLAGS'] == f'{FLAG}-reduce'


# The kernel gradient of a 3x3 'SAME' convolution, against float64 numpy; prints what
# computes it. (This jaxlib hands it to YNNPACK from a batch of 32 on.)
_KERNEL_GRADIENT = """
import sys
import jax, jax.numpy as jnp, numpy as np
rng = np.random.default_rng(0)
x = rng.standard_normal((32, 8, 8, 4)).astype(np.float32)
g = rng.standard_normal((32, 8, 8, 8)).astype(np.float32)
w = np.zeros((3, 3, 4, 8), np.float32)
layout = ('NHWC', 'HWIO', 'NHWC')
def conv(w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=layout)
kernel_gradient = jax.jit(lambda w, g: jax.vjp(conv, w)[1](g)[0])
padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
expected = np.stack([
  np.stack([np.einsum('nhwi,nhwo->io', padded[:, i:i + 8, j:j + 8], g) for j in range(3)])
  for i in range(3)
])
np.testing.assert_allclose(kernel_gradient(w, g), expected, rtol=1e-5, atol=1e-4)
print('ynnpack' if '__ynn_fusion' in kernel_gradient.lower(w, g).compile().as_text() else 'xla')
"""


def _kernel_gradient_backend(environ: dict[str, str]) -> str:
  result = subprocess.run(
    [sys.executable, '-c', _KERNEL_GRADIENT],
    cwd=REPO_ROOT,
    env=environ,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()[-1]


def test_cpu_flags_compute_kernel_gradients_without_ynnpack_and_to_rounding():
  environ = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  environ['JAX_PLATFORMS'] = 'cpu'
  flagged = dict(environ)
  main.set_xla_flags(flagged)
  # Both compute the kernel gradient to float32 rounding (the script asserts it); by
  # default in YNNPACK, which the flags take the convolutions from.
  assert _kernel_gradient_backend(environ) == 'ynnpack'
  assert _kernel_gradient_backend(flagged) == 'xla'
