r"""Compile time and step time of the Metropolis test against the number of parameter leaves.

The model is a residual MLP of width 8 with one kernel and one bias per layer, so
the number of parameter leaves is twice the depth. Five jit-compiled train steps
(`value_and_grad` of the mean squared output, the update, `optax.apply_updates`):

  inner      `optax.sgd(0.1, momentum=0.9)` alone;
  metro      `coolopt.metropolis(inner, temperature=1e-2)`;
  metro+mult `coolopt.metropolis(inner, 1e-2, multipliers=SGD-SA's set)`, the
             multiplier path;
  inner+T    `inner` followed by `coolopt.track_kinetic_temperature()`;
  metro+T    `metro` followed by `coolopt.track_kinetic_temperature()`.

For each size it reports the time to trace and lower the step, the time XLA takes
to compile it and the median time of a step, and the ratios of compile and step
time to those of the same step without the Metropolis test (inner, or inner+T for
metro+T). Compile times on one machine vary by some 10-20% from run to run.

From the repository root:

  python -m benchmarks.metropolis_compile
  python -m benchmarks.metropolis_compile --leaves 100 1000 4000 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import coolopt
from benchmarks.machine import machine

WIDTH = 8


def make_params(num_leaves: int) -> dict:
  keys = jax.random.split(jax.random.key(0), num_leaves // 2)
  return {
    f'layer_{i:05d}': {
      'kernel': jax.random.normal(key, (WIDTH, WIDTH)) * 0.1,
      'bias': jnp.zeros(WIDTH),
    }
    for i, key in enumerate(keys)
  }


def loss(params: dict, x: jax.Array) -> jax.Array:
  for name in sorted(params):
    layer = params[name]
    x = x + jnp.tanh(x @ layer['kernel'] + layer['bias'])
  return jnp.mean(x**2)


def optimizers() -> dict[str, optax.GradientTransformation]:
  inner = optax.sgd(0.1, momentum=0.9)
  return {
    'inner': inner,
    'metro': coolopt.metropolis(inner, 1e-2),
    'metro+mult': coolopt.metropolis(inner, 1e-2, multipliers=coolopt.SGD_SA_LEARNING_RATES),
    'inner+T': optax.chain(inner, coolopt.track_kinetic_temperature()),
    'metro+T': optax.chain(coolopt.metropolis(inner, 1e-2), coolopt.track_kinetic_temperature()),
  }


def make_step(name: str, tx: optax.GradientTransformation):
  def step(params, opt_state, x):
    value, grads = jax.value_and_grad(loss)(params, x)
    if name.startswith('inner'):
      updates, opt_state = tx.update(grads, opt_state, params)
    else:
      updates, opt_state = tx.update(
        grads, opt_state, params, value=value, value_fn=lambda p: loss(p, x)
      )
    return optax.apply_updates(params, updates), opt_state, value

  return step


def measure(name, tx, num_leaves, num_steps):
  params = make_params(num_leaves)
  x = jax.random.normal(jax.random.key(1), (16, WIDTH))
  opt_state = tx.init(params)
  step = jax.jit(make_step(name, tx), donate_argnums=(0, 1))
  start = time.perf_counter()
  lowered = step.lower(params, opt_state, x)
  traced = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(num_steps + 1):
    start = time.perf_counter()
    params, opt_state, value = compiled(params, opt_state, x)
    jax.block_until_ready((params, opt_state, value))
    times.append(time.perf_counter() - start)
  return traced, compile_s, statistics.median(times[1:])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--leaves', type=int, nargs='+', default=[100, 1000, 4000])
  parser.add_argument('--steps', type=int, default=5, help='timed steps per variant')
  parser.add_argument('--variants', nargs='+', default=list(optimizers()))
  args = parser.parse_args()
  print(machine())
  print(
    '| leaves | variant | trace+lower s | compile s | compile / baseline | step ms '
    '| step / baseline |'
  )
  print('|---:|---|---:|---:|---:|---:|---:|')
  for num_leaves in args.leaves:
    baselines = {}
    for name, tx in optimizers().items():
      if name not in args.variants:
        continue
      traced, compile_s, step_s = measure(name, tx, num_leaves, args.steps)
      if name.startswith('inner'):
        baselines[name] = (compile_s, step_s)
      base = baselines.get('inner+T' if name.endswith('+T') else 'inner', (compile_s, step_s))
      print(
        f'| {num_leaves} | {name} | {traced:.2f} | {compile_s:.2f} | '
        f'{compile_s / base[0]:.2f} | {1e3 * step_s:.2f} | {step_s / base[1]:.2f} |',
        flush=True,
      )


if __name__ == '__main__':
  main()
