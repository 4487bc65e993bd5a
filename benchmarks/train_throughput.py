"""Train-step throughput of the reference trainers, and the optimizer's share of a step.

For each model (ResNet-20 of `examples/configs/cifar10_resnet20.py`, EfficientNet-B0
of `examples/configs/imagenet_efficientnet_b0.py`) and each optimizer ('coolmomentum',
which the trainer chains with `coolopt.track_kinetic_temperature()`, and 'momentum', the
recipe's baseline), two jit-compiled steps are timed on one fixed synthetic batch:

- (a) the trainer's own train step, `examples.train.build(...).parallel.train_step`
  with `config.parallelism = 'jit'` (forward, backward, optimizer, the finite-step
  check), the train state donated, as `examples.train` runs it;
- (b) the optimizer alone: `tx.update` + `optax.apply_updates` with the same `tx`
  (`examples.optimizers.create_optimizer`), on float32 gradients shaped like the
  parameters, parameters and optimizer state donated.

All steps run in interleaved rounds (the starting one rotates from round to round);
the figures are medians over the rounds, and the share (b)/(a) is taken round by
round. Images/s is the batch over the median of (a).

On a GPU the defaults are the trainers' scale: bfloat16, ResNet-20 at batch 1024 on
32x32 images and EfficientNet-B0 at batch 256 on 224x224 images. On a CPU they are
small enough to finish in minutes: float32, batch 128 at 32x32 and batch 16 at 64x64.
Like `examples.main`, the script sets `examples.main.CPU_XLA_FLAGS` in `XLA_FLAGS`
before JAX starts (`--no-xla-flags`: XLA's defaults).

From the repository root:

  python -m benchmarks.train_throughput
  python -m benchmarks.train_throughput --models resnet20 efficientnet_b0
  python -m benchmarks.train_throughput --models resnet20 --batch 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import machine
from benchmarks.timing import (
  Timed,
  add_round_arguments,
  add_xla_flags_argument,
  jax_carry_step,
  optimizer_step,
  quartiles,
  ratios,
  set_trainer_xla_flags,
  time_rounds,
)
from examples import train
from examples.configs import cifar10_resnet20, imagenet_efficientnet_b0

CONFIGS = {'resnet20': cifar10_resnet20, 'efficientnet_b0': imagenet_efficientnet_b0}
# (batch, image side) per model: on a GPU, and on a CPU.
GPU_DEFAULTS = {'resnet20': (1024, 32), 'efficientnet_b0': (256, 224)}
CPU_DEFAULTS = {'resnet20': (128, 32), 'efficientnet_b0': (16, 64)}
OPTIMIZERS = ('coolmomentum', 'momentum')
# Sets only the schedules' lengths; no step of a timed run reaches their ends.
STEPS_PER_EPOCH = 1000


def make_config(model: str, optimizer: str, batch: int, image_size: int, half_precision: bool):
  config = CONFIGS[model].get_config()
  config.optimizer = optimizer
  config.image_size = image_size
  config.half_precision = half_precision
  config.parallelism = 'jit'
  # The recipe's model on random images of its shape: the timed steps read no data set.
  config.update(
    dataset='synthetic', num_channels=3, batch_size=batch, steps_per_epoch=STEPS_PER_EPOCH
  )
  config.update(synthetic_train_size=batch, synthetic_test_size=batch)
  group = config.batch_norm_group_size
  if group and batch % group:
    # The recipe's BatchNorm groups (256 examples) do not divide a small batch: the whole
    # batch is one group.
    config.batch_norm_group_size = 0
  return config


def build(
  model_name: str, optimizer: str, batch: int, image_size: int, half: bool, seed: int
) -> tuple[Timed, Timed, int]:
  """The train step and the optimizer step of one (model, optimizer), and the parameter count."""
  config = make_config(model_name, optimizer, batch, image_size, half)
  config.seed = seed
  run = train.build(*train.prepare(config))
  host_state, parallel, tx = run.state, run.parallel, run.state.tx
  shape = (image_size, image_size, config.num_channels)

  rng = np.random.default_rng(seed)
  local = jax.local_device_count()
  images = rng.standard_normal((local, batch // local, *shape), dtype=np.float32)
  labels = rng.integers(0, config.num_classes, (local, batch // local), dtype=np.int32)
  device_batch = parallel.put_batch({'image': images, 'label': labels})

  train_step, _ = jax_carry_step(
    parallel.train_step, (parallel.put_state(host_state),), device_batch
  )

  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(jax.tree.leaves(host_state.params)))
  leaves, treedef = jax.tree.flatten(host_state.params)
  grads = jax.tree.unflatten(
    treedef,
    [
      1e-3 * jax.random.normal(k, np.shape(p), jnp.float32)
      for k, p in zip(keys, leaves, strict=True)
    ],
  )
  params = jax.tree.map(jnp.asarray, host_state.params)
  opt_step, _ = jax_carry_step(optimizer_step(tx), (params, jax.jit(tx.init)(params)), grads)
  return train_step, opt_step, sum(np.size(p) for p in leaves)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument(
    '--models', nargs='+', choices=tuple(CONFIGS), default=['resnet20'], help='models to time'
  )
  parser.add_argument(
    '--batch', type=int, help='global batch for every model (default per model and device)'
  )
  parser.add_argument(
    '--image-size', type=int, help='image side for every model (default per model and device)'
  )
  parser.add_argument(
    '--dtype',
    choices=('float32', 'bfloat16'),
    help='computation dtype (config.half_precision); default bfloat16 on GPU, float32 else',
  )
  add_round_arguments(parser, rounds=10, steps=3, warmup=2)
  parser.add_argument('--seed', type=int, default=0)
  add_xla_flags_argument(parser)
  args = parser.parse_args()
  set_trainer_xla_flags(args)

  gpu = jax.default_backend() == 'gpu'
  dtype = args.dtype or ('bfloat16' if gpu else 'float32')
  defaults = GPU_DEFAULTS if gpu else CPU_DEFAULTS
  # Buffers that the CPU backend cannot reuse in place are copied; the warning says so.
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  print(machine())
  print(f'dtype {dtype}; {args.rounds} rounds x {args.steps} steps, {args.warmup} warm-up steps')

  for model_name in args.models:
    batch = args.batch or defaults[model_name][0]
    image_size = args.image_size or defaults[model_name][1]
    steps: dict[str, Timed] = {}
    for optimizer in OPTIMIZERS:
      start = time.perf_counter()
      train_step, opt_step, n_params = build(
        model_name, optimizer, batch, image_size, dtype == 'bfloat16', args.seed
      )
      for timed in (train_step, opt_step):
        for _ in range(args.warmup):
          timed.sync(timed.step())
      print(
        f'{model_name}, {optimizer}: {n_params:,} parameters, compiled and warmed up in '
        f'{time.perf_counter() - start:.0f} s'
      )
      steps[f'{optimizer}/train'] = train_step
      steps[f'{optimizer}/opt'] = opt_step

    times = time_rounds(steps, rounds=args.rounds, steps_per_round=args.steps)
    print(f'\n{model_name}: batch {batch}, {image_size}x{image_size} images, {dtype}')
    print(
      f'{"optimizer":33s} {"images/s":>9s} {"ms/step":>8s} {"IQR ms":>15s} '
      f'{"opt ms":>7s} {"opt share":>9s} {"share IQR":>11s}'
    )
    for optimizer in OPTIMIZERS:
      full, opt = times[f'{optimizer}/train'], times[f'{optimizer}/opt']
      q_t, q_s = quartiles(full), quartiles(ratios(opt, full))
      label = optimizer + (' + track_kinetic_temperature' if optimizer == 'coolmomentum' else '')
      print(
        f'{label:33s} {batch / q_t[1]:9.1f} {1e3 * q_t[1]:8.1f} '
        f'{1e3 * q_t[0]:7.1f}-{1e3 * q_t[2]:<7.1f} {1e3 * quartiles(opt)[1]:7.2f} '
        f'{100 * q_s[1]:8.2f}% {100 * q_s[0]:5.2f}-{100 * q_s[2]:<5.2f}'
      )
    print()


if __name__ == '__main__':
  main()
