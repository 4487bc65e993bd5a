"""EfficientNet-B0's depthwise convolutions: XLA's grouped convolution against shifted sums.

`examples.models.DepthwiseConv` computes a depthwise convolution either as XLA's
convolution with one channel per group ('convolution') or as the sum over the kernel
taps of shifted views of the padded input times the tap's per-channel weights
('shifted'); by default it takes 'shifted' on CPU only. This script times both, in
interleaved rounds in one process, with the ratio convolution / shifted taken round by
round:

- each distinct depthwise layer of EfficientNet-B0 (kernel, stride, channels, input
  side) at the given batch and image size: forward and gradients (input and kernel);
- the trainer's whole EfficientNet-B0 train step (`examples.train.build`,
  CoolMomentum, sharded jit) built with each implementation (`--no-step` skips it: it
  compiles for minutes on a CPU).

Like the trainer, it sets `examples.main.CPU_XLA_FLAGS` before JAX starts.

  python -m benchmarks.depthwise
  python -m benchmarks.depthwise --batch 16 --image-size 64 --rounds 5
"""

from __future__ import annotations

import argparse
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
  quartiles,
  ratios,
  set_trainer_xla_flags,
  time_rounds,
)
from examples import models, train
from examples.configs import imagenet_efficientnet_b0

STEPS_PER_EPOCH = 1000


def depthwise_layers(image_size: int) -> list[tuple[int, int, int, int]]:
  """(kernel, stride, channels, input side) of each distinct depthwise layer of B0."""
  side = -(-image_size // 2)  # After the stem's stride-2 convolution.
  layers = []
  for expand, kernel, stride, filters_in, filters_out, repeats in models.EFFICIENTNET_B0_BLOCKS:
    for r in range(repeats):
      channels = (filters_in if r == 0 else filters_out) * expand
      layer_stride = stride if r == 0 else 1
      if (kernel, layer_stride, channels, side) not in layers:
        layers.append((kernel, layer_stride, channels, side))
      side = -(-side // layer_stride)
  return layers


def layer_variant(
  implementation: str, kernel: int, stride: int, channels: int, side: int, batch: int
) -> Timed:
  """Forward and both gradients of one depthwise layer, compiled."""
  layer = models.DepthwiseConv(kernel, stride, implementation=implementation)
  x = jax.random.normal(jax.random.key(0), (batch, side, side, channels))
  params = layer.init(jax.random.key(1), x)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(jnp.square(layer.apply(p, x))), argnums=(0, 1)))
  return Timed(lambda: grad(params, x))


def step_variant(implementation: str, batch: int, image_size: int) -> Timed:
  """The trainer's EfficientNet-B0 train step with `implementation`, compiled."""
  config = imagenet_efficientnet_b0.get_config()
  config.image_size, config.parallelism = image_size, 'jit'
  # Random images of the recipe's shape, and BatchNorm over the whole small batch.
  config.update(dataset='synthetic', batch_size=batch, steps_per_epoch=STEPS_PER_EPOCH)
  config.update(synthetic_train_size=batch, synthetic_test_size=batch, batch_norm_group_size=0)
  config, task = train.prepare(config)
  model = models.EfficientNetB0(config.num_classes, depthwise_implementation=implementation)
  run = train.build(config, task, model=model)
  host_state, parallel = run.state, run.parallel
  shape = (image_size, image_size, 3)
  rng = np.random.default_rng(0)
  local = jax.local_device_count()
  images = rng.standard_normal((local, batch // local, *shape), dtype=np.float32)
  labels = rng.integers(0, config.num_classes, (local, batch // local), dtype=np.int32)
  device_batch = parallel.put_batch({'image': images, 'label': labels})
  variant, _ = jax_carry_step(parallel.train_step, (parallel.put_state(host_state),), device_batch)
  return variant


def report(name: str, times: dict[str, list[float]]) -> None:
  conv, shifted = times['convolution'], times['shifted']
  ratio = quartiles(ratios(conv, shifted))
  print(
    f'{name}: convolution {1e3 * np.median(conv):.2f} ms, shifted {1e3 * np.median(shifted):.2f}'
    f' ms, convolution / shifted {ratio[1]:.2f} (IQR {ratio[0]:.2f}-{ratio[2]:.2f})',
    flush=True,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--image-size', type=int, default=64)
  parser.add_argument('--no-step', dest='step', action='store_false', help='layers only')
  add_round_arguments(parser, rounds=5, steps=3, warmup=1)
  add_xla_flags_argument(parser)
  args = parser.parse_args()
  set_trainer_xla_flags(args)
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  print(machine())
  print(
    f'batch {args.batch}, {args.image_size}x{args.image_size}, '
    f'{args.rounds} rounds x {args.steps} steps'
  )
  rounds = {'rounds': args.rounds, 'steps_per_round': args.steps, 'warmup': args.warmup}
  for kernel, stride, channels, side in depthwise_layers(args.image_size):
    variants = {
      implementation: layer_variant(implementation, kernel, stride, channels, side, args.batch)
      for implementation in models.DEPTHWISE_IMPLEMENTATIONS
    }
    report(
      f'{kernel}x{kernel} stride {stride}, {channels} channels, {side}x{side}',
      time_rounds(variants, **rounds),
    )
  if args.step:
    variants = {
      implementation: step_variant(implementation, args.batch, args.image_size)
      for implementation in models.DEPTHWISE_IMPLEMENTATIONS
    }
    report('EfficientNet-B0 train step', time_rounds(variants, **rounds))


if __name__ == '__main__':
  main()
