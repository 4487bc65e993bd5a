"""K vmapped runs (examples.sweep) against the same K runs one after another.

The runs are CoolMomentum on examples/configs/digits.py (or, with `--model resnet20`, the
CIFAR-10 recipe's ResNet-20 on synthetic 32x32 images): rates around the recipe's rate
times seeds, rho_0 = 0.99, `--steps` steps each on the batches of their seeds (read
once, before the clocks start, so that both sides time the steps alone). One after
another, each run is what the trainer compiles: its own optimizer and a jitted
`train.train_step`, compiled anew for each rate. Vmapped, the K runs are one program of
`examples.sweep`. Printed: images/s of the whole sweep (compilation included) and of the
steady steps (after each program's first step), and their ratio, also for the one
program stepping its runs one at a time (`runs_per_vmap=1`); then the vmapped
steady images/s for each K of `--ks`, which shows where vmapping stops paying, and the
memory of the K-run step: the sweep's estimate (from the traced step, before compiling)
against what XLA allocates for the compiled step.

From the repository root:

  python -m benchmarks.sweep
  python -m benchmarks.sweep --runs 16 --steps 38 --ks 1,4,16,64
  python -m benchmarks.sweep --model resnet20 --runs 4 --steps 8 --ks 1,4
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import numpy as np

from benchmarks.machine import machine
from examples import compare, optimizers, schema, sweep, tasks, train
from examples.configs import cifar10_resnet20, digits


def _base_config(name: str):
  """'digits': the digits recipe (a small CNN on 8x8 images); 'resnet20': the CIFAR-10
  recipe (ResNet-20) on synthetic 32x32 images, a model ~100x the CNN's compute."""
  if name == 'digits':
    return digits.get_config()
  config = cifar10_resnet20.get_config()
  config.update(dataset='synthetic', image_size=32, synthetic_train_size=2048)
  return config


def _setup(num_runs: int, steps: int, model: str = 'digits'):
  config = compare.optimizer_config(_base_config(model), 'coolmomentum')
  config.num_epochs = 1
  config.steps_per_epoch = steps
  config, task = train.prepare(config)
  num_seeds = min(4, num_runs)
  factors = np.geomspace(1 / 5.5, 5.5, max(1, num_runs // num_seeds))
  runs = [(config.learning_rate * f, s) for f in factors for s in range(num_seeds)][:num_runs]
  while len(runs) < num_runs:
    runs.append(runs[len(runs) % len(runs)])
  batches = {}
  for seed in range(num_seeds):
    seed_config = config.copy_and_resolve_references()
    seed_config.seed = seed
    batches[seed] = [
      jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), b)
      for b in tasks.create_task(seed_config).train_batches(0)
    ]
  return config, task, runs, batches


def time_vmapped(config, task, runs, batches, steps, runs_per_vmap=None):
  """(whole seconds, steady seconds per step) of the runs in one program, all vmapped or
  `runs_per_vmap` at a time."""
  start = time.perf_counter()
  program = sweep.build_program(config, task, runs_per_vmap=runs_per_vmap)
  padded = runs + [runs[-1]] * (-len(runs) % jax.device_count())
  hparams = jax.device_put(
    {
      'learning_rate': np.array([lr for lr, _ in padded], np.float32),
      'rho_0': np.full(len(padded), config.rho_0, np.float32),
      'seed': np.array([s for _, s in padded], np.uint32),
      'seed_index': np.array([s for _, s in padded], np.int32),
    },
    program.sharding,
  )
  states = program.init(hparams)
  stacked = [
    jax.device_put(
      jax.tree.map(lambda *xs: np.stack(xs), *[batches[s][i] for s in sorted(batches)]),
      program.replicated,
    )
    for i in range(steps)
  ]
  steady = None
  for i in range(steps):
    states, metrics = program.train_step(hparams, states, stacked[i])
    if i == 0:
      jax.block_until_ready(metrics)
      steady = time.perf_counter()
  jax.block_until_ready(states)
  end = time.perf_counter()
  return end - start, (end - steady) / max(1, steps - 1)


def time_one_after_another(config, task, runs, batches, steps):
  """(whole seconds, steady seconds per step) of the runs trained one at a time."""
  start, steady_seconds = time.perf_counter(), 0.0
  model = task.create_model()
  for lr, seed in runs:
    run_config = config.copy_and_resolve_references()
    run_config.learning_rate, run_config.seed = float(lr), seed
    tx, _ = optimizers.create_optimizer(run_config, config.steps_per_epoch)
    state = train.create_train_state(jax.random.PRNGKey(seed), model, task.init_inputs(model), tx)
    step = jax.jit(functools.partial(train.train_step, task=task, model=model), donate_argnums=0)
    for i in range(steps):
      state, metrics = step(state, batches[seed][i])
      if i == 0:
        jax.block_until_ready(metrics)
        steady = time.perf_counter()
    jax.block_until_ready(state)
    steady_seconds += time.perf_counter() - steady
  return time.perf_counter() - start, steady_seconds / (len(runs) * max(1, steps - 1))


def memory(config, task, k: int) -> tuple[float, float]:
  """(the sweep's estimate, XLA's allocation) in MiB of the train step of K runs on one
  device: `examples.sweep.estimate_memory` from the traced step, and
  `examples.sweep.compiled_memory` of the compiled step."""
  program = sweep.build_program(config, task)
  estimate = sweep.estimate_memory(program, task, config, k)
  return estimate.bytes / 2**20, sweep.compiled_memory(program, task, k) / 2**20


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=16)
  parser.add_argument('--steps', type=int, default=38)
  parser.add_argument('--ks', default='1,4,16,64', help='vmapped run counts to scan')
  parser.add_argument('--model', choices=('digits', 'resnet20'), default='digits')
  args = parser.parse_args(argv)
  print(machine())
  print(f'load average before: {os.getloadavg()}')
  config, task, runs, batches = _setup(args.runs, args.steps, args.model)
  schema.validate_config(config)
  images = len(runs) * args.steps * config.batch_size
  whole_v, step_v = time_vmapped(config, task, runs, batches, args.steps)
  whole_s, step_s = time_one_after_another(config, task, runs, batches, args.steps)
  print(f'K={len(runs)} runs x {args.steps} steps of {config.batch_size} images')
  print(
    f'  vmapped:            whole {whole_v:7.1f} s = {images / whole_v:8.0f} images/s; '
    f'steady {config.batch_size * len(runs) / step_v:8.0f} images/s'
  )
  print(
    f'  one after another:  whole {whole_s:7.1f} s = {images / whole_s:8.0f} images/s; '
    f'steady {config.batch_size / step_s:8.0f} images/s'
  )
  print(f'  ratio: whole {whole_s / whole_v:.2f}x, steady {step_s * len(runs) / step_v:.2f}x')
  whole_m, step_m = time_vmapped(config, task, runs, batches, args.steps, runs_per_vmap=1)
  print(
    f'  one program, lax.map one run at a time: whole {whole_m:7.1f} s = '
    f'{images / whole_m:8.0f} images/s; steady {config.batch_size * len(runs) / step_m:8.0f} '
    f'images/s; ratio to one after another: whole {whole_s / whole_m:.2f}x, '
    f'steady {step_s * len(runs) / step_m:.2f}x'
  )
  print(
    'vmapped steady images/s by K (one-at-a-time steady for comparison: '
    f'{config.batch_size / step_s:.0f}):'
  )
  for k in (int(k) for k in args.ks.split(',') if k):
    config_k, task_k, runs_k, batches_k = _setup(k, args.steps, args.model)
    whole, per_step = time_vmapped(config_k, task_k, runs_k, batches_k, args.steps)
    rate = config.batch_size * k / per_step
    print(
      f'  K={k:4d}: steady {rate:8.0f} images/s ({rate * step_s / config.batch_size:.2f}x), '
      f'whole {whole:6.1f} s'
    )
  print('memory of the train step per device by K (estimate from the traced step; XLA):')
  for k in (int(k) for k in args.ks.split(',') if k):
    estimate, allocated = memory(config, task, k)
    print(
      f'  K={k:4d}: estimate {estimate:8.1f} MiB, XLA {allocated:8.1f} MiB '
      f'({estimate / allocated:.2f}x)'
    )
  print(f'load average after: {os.getloadavg()}')


if __name__ == '__main__':
  main()
