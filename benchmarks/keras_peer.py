"""Train-step throughput of the reference trainer against the same model in Keras.

In one process, on one fixed batch of random images and labels, three train steps
of the same model run in interleaved rounds (the starting one rotates from round
to round):

- jax: the trainer's own step, `examples.train.build(...).parallel.train_step`
  with `config.parallelism = 'jit'` and the 'momentum' optimizer (`optax.sgd(0.01,
  momentum=0.9)`), the train state donated;
- keras (XLA): the Keras model's `train_on_batch` with `keras.optimizers.SGD(0.01,
  momentum=0.9)`, compiled as Keras compiles it by default on TensorFlow
  (`jit_compile='auto'`, which is XLA);
- keras (graph): the same with `jit_compile=False`: a TensorFlow graph of its own
  kernels (oneDNN on x86).

The models: ResNet-20 v1 of the Keras example cifar10_resnet.py (3x3 convolutions
with biases and `l2(1e-4)`, BatchNorm, a bare 1x1 projection; 273,066 trainable
parameters on both sides) and EfficientNet-B0 (`keras.applications.EfficientNetB0`,
`weights=None`, against `examples.models.EfficientNetB0`; Keras' also rescales and
normalises its input in the graph, two elementwise layers). Images/s is the batch
over the median step time; the ratio jax / keras is taken round by round.

Like `examples.main`, the script sets `examples.main.CPU_XLA_FLAGS` in `XLA_FLAGS`
before JAX starts (`--no-xla-flags`: XLA's defaults). TensorFlow's own copy of XLA,
which runs the Keras XLA step, reads `XLA_FLAGS` too. With TensorFlow installed
(`pip install -e '.[keras_peer]'`), from the repository root:

  python -m benchmarks.keras_peer
  python -m benchmarks.keras_peer --no-xla-flags
  python -m benchmarks.keras_peer --models resnet20 efficientnet_b0 --rounds 10
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any

import jax
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
from examples import train
from examples.configs import cifar10_resnet20, imagenet_efficientnet_b0

# TensorFlow and Keras come with the [keras_peer] extra, not with [examples]: imported
# by `import_keras` when the benchmark runs, so that importing this module needs neither.
tf: Any = None
keras: Any = None


def import_keras() -> None:
  """Imports Keras on TensorFlow, which must see no GPU that JAX uses."""
  global tf, keras
  os.environ.setdefault('KERAS_BACKEND', 'tensorflow')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow

  tensorflow.config.set_visible_devices([], 'GPU')
  import keras as keras_module

  tf, keras = tensorflow, keras_module


CONFIGS = {'resnet20': cifar10_resnet20, 'efficientnet_b0': imagenet_efficientnet_b0}
# (batch, image side) on a CPU.
DEFAULTS = {'resnet20': (128, 32), 'efficientnet_b0': (16, 64)}
LEARNING_RATE = 0.01
MOMENTUM = 0.9
# Sets only the schedules' lengths; no step of a timed run reaches their ends.
STEPS_PER_EPOCH = 1000


def keras_resnet20(num_classes: int = 10, l2: float = 1e-4) -> keras.Model:
  """ResNet-20 v1 as built by the Keras example cifar10_resnet.py (depth 20)."""

  def layer(x, filters, kernel_size=3, strides=1, activation='relu', batch_norm=True):
    x = keras.layers.Conv2D(
      filters,
      kernel_size,
      strides=strides,
      padding='same',
      kernel_initializer='he_normal',
      kernel_regularizer=keras.regularizers.l2(l2),
    )(x)
    if batch_norm:
      x = keras.layers.BatchNormalization()(x)
    if activation is not None:
      x = keras.layers.Activation(activation)(x)
    return x

  inputs = keras.Input((32, 32, 3))
  x = layer(inputs, 16)
  filters = 16
  for stack in range(3):
    for block in range(3):
      strides = 2 if stack > 0 and block == 0 else 1
      y = layer(x, filters, strides=strides)
      y = layer(y, filters, activation=None)
      if stack > 0 and block == 0:
        x = layer(x, filters, kernel_size=1, strides=strides, activation=None, batch_norm=False)
      x = keras.layers.Activation('relu')(keras.layers.add([x, y]))
    filters *= 2
  x = keras.layers.AveragePooling2D(8)(x)
  x = keras.layers.Flatten()(x)
  outputs = keras.layers.Dense(num_classes, kernel_initializer='he_normal')(x)
  return keras.Model(inputs, outputs)


def keras_model(model_name: str, num_classes: int, image_size: int) -> keras.Model:
  """The Keras counterpart of the trainer's model, with logits as outputs."""
  if model_name == 'resnet20':
    return keras_resnet20(num_classes)
  return keras.applications.EfficientNetB0(
    weights=None, input_shape=(image_size, image_size, 3), classes=num_classes,
    classifier_activation=None,
  )  # fmt: skip


def keras_step(
  model_name: str,
  num_classes: int,
  image_size: int,
  images: np.ndarray,
  labels: np.ndarray,
  jit_compile: bool,
) -> Timed:
  """Keras' `train_on_batch` of the model, compiled with XLA or as a TensorFlow graph."""
  model = keras_model(model_name, num_classes, image_size)
  model.compile(
    optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    jit_compile=jit_compile,
  )
  x, y = tf.constant(images), tf.constant(labels)
  # train_on_batch returns the loss as numpy: it has waited for the step.
  return Timed(lambda: model.train_on_batch(x, y), sync=lambda loss: loss)


def jax_step(
  model_name: str, images: np.ndarray, labels: np.ndarray, image_size: int
) -> tuple[Timed, int]:
  """The trainer's jitted train step, and the model's parameter count."""
  config = CONFIGS[model_name].get_config()
  # The recipe's baseline: optax.sgd(0.01, momentum=0.9), constant for 80 epochs.
  config.optimizer = 'momentum'
  config.image_size = image_size
  config.parallelism = 'jit'
  # Keras normalises over the whole batch; the recipe's groups of 256 exceed a CPU batch.
  config.batch_norm_group_size = 0
  # The recipe's model on the given images: the timed step reads no data set.
  config.update(dataset='synthetic', num_channels=images.shape[-1], batch_size=len(images))
  config.update(steps_per_epoch=STEPS_PER_EPOCH, synthetic_train_size=len(images))
  config.synthetic_test_size = len(images)
  run = train.build(*train.prepare(config))
  state, parallel = run.state, run.parallel
  batch = parallel.put_batch({'image': images[None], 'label': labels[None]})
  timed, _ = jax_carry_step(parallel.train_step, (parallel.put_state(state),), batch)
  return timed, sum(np.size(p) for p in jax.tree.leaves(state.params))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', choices=tuple(CONFIGS), default=['resnet20'])
  parser.add_argument('--batch', type=int, help='batch for every model (default per model)')
  parser.add_argument('--image-size', type=int, help='image side (EfficientNet-B0 only)')
  add_round_arguments(parser, rounds=10, steps=3, warmup=2)
  parser.add_argument(
    '--keras', nargs='+', choices=('xla', 'graph'), default=['xla', 'graph'],
    help='Keras steps to time: XLA (its default on TensorFlow) and a plain TF graph',
  )  # fmt: skip
  add_xla_flags_argument(parser)
  args = parser.parse_args()
  import_keras()
  set_trainer_xla_flags(args)
  warnings.filterwarnings('ignore', message='Some donated buffers were not usable')
  print(machine())
  print(f'tensorflow {tf.__version__}, keras {keras.__version__}')
  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(f'float32; {args.rounds} rounds x {args.steps} steps, {args.warmup} warm-up steps')

  for model_name in args.models:
    batch, image_size = DEFAULTS[model_name]
    batch = args.batch or batch
    if model_name != 'resnet20' and args.image_size:
      image_size = args.image_size
    num_classes = CONFIGS[model_name].get_config().num_classes
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
    labels = rng.integers(0, num_classes, (batch,), dtype=np.int32)

    variants = {}
    start = time.perf_counter()
    variants['jax'], n_params = jax_step(model_name, images, labels, image_size)
    for mode in args.keras:
      variants[f'keras ({mode})'] = keras_step(
        model_name, num_classes, image_size, images, labels, jit_compile=mode == 'xla'
      )
    times = time_rounds(
      variants, rounds=args.rounds, steps_per_round=args.steps, warmup=args.warmup
    )
    print(
      f'\n{model_name}: {n_params:,} parameters, batch {batch}, {image_size}x{image_size}; '
      f'{time.perf_counter() - start:.0f} s with compilation'
    )
    print(f'{"step":14s} {"images/s":>9s} {"ms/step":>8s} {"IQR ms":>15s} {"jax / this":>20s}')
    for name, ts in times.items():
      q1, median, q3 = quartiles(ts)
      speedup = quartiles(ratios(ts, times['jax']))
      print(
        f'{name:14s} {batch / median:9.1f} {1e3 * median:8.1f} {1e3 * q1:7.1f}-{1e3 * q3:<7.1f} '
        f'{speedup[1]:6.3f} ({speedup[0]:.3f}-{speedup[2]:.3f})'
      )
    print('jax / this: throughput of jax over that of the step, round by round (median, IQR)')


if __name__ == '__main__':
  main()
