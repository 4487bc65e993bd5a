"""Records per second of the trainer's train input pipeline, on mocked records.

Two record shapes, both in memory so that the figure is the pipeline's own cost:

- cifar10: 32x32x3 uint8 images, the trainer's CIFAR-10 augmentation (Keras' nearest-fill
  shifts and flips, minus the mean image), in global batches of 128;
- imagenet: JPEG-encoded random images of 300 to 500 pixels a side (about an ImageNet
  photo's), the Inception random-resized crop to 224x224 and flip, in batches of 32.

Each is read by the Grain pipeline of `examples.input_pipeline` (threads as the trainer
uses them) and, where TensorFlow can be imported, by the `tf.data` pipeline the trainer
used before (kept here only, for the comparison: a numpy_function read by index, the
stateless tf.image augmentation, AUTOTUNE maps), in the same run, in interleaved
rounds. The figure is the median over the rounds of records / seconds for a number of
batches after one warm-up batch.

From the repository root:

  python -m benchmarks.input_pipeline
  python -m benchmarks.input_pipeline --datasets cifar10 --rounds 5
"""

from __future__ import annotations

import argparse
import functools
import io
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from benchmarks.machine import machine
from examples import input_pipeline as ip

SHAPES = {'cifar10': (128, 4096), 'imagenet': (32, 512)}  # (global batch, records)
IMAGENET_SIZE = 224


def _records(name: str, count: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, count).astype(np.int32)
  if name == 'cifar10':
    return rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), labels
  images = []
  for _ in range(count):
    height, width = rng.integers(300, 501, size=2)
    # Smooth images compress as photos do; noise would make every JPEG huge.
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    pixels = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    pixels.save(out, format='JPEG', quality=90)
    images.append(out.getvalue())
  return np.array(images, dtype=object), labels


def grain_batches(name: str, images, labels, batch: int, steps: int) -> Iterator:
  if name == 'cifar10':
    pixel_mean = (images.mean(0) / 255.0).astype(np.float32)
    train_fn = functools.partial(ip._cifar10_train, pixel_mean=pixel_mean)
  else:
    train_fn, _ = ip._imagenet_preprocess(ip.DatasetOptions('imagenet2012', image_size=224))
  ds = ip._train_dataset(
    ip.ArraySource(images, labels),
    train_fn,
    seed=ip.epoch_seed(0, 0),
    global_batch_size=batch,
    num_batches=steps,
  )
  return ip._iterate(ds, 1)


def tf_batches(name: str, images, labels, batch: int, steps: int) -> Iterator:
  """The former tf.data train pipeline of examples/input_pipeline.py, in brief."""
  import tensorflow as tf

  pixel_mean = (images.mean(0) / 255.0).astype(np.float32) if name == 'cifar10' else None

  def cifar10_train(image, key):
    image = tf.cast(image, tf.float32) / 255.0 - pixel_mean
    shift_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    shift = tf.random.stateless_uniform([2], shift_key, minval=-3, maxval=4, dtype=tf.int32)
    rows = tf.clip_by_value(tf.range(32) - shift[0], 0, 31)
    cols = tf.clip_by_value(tf.range(32) - shift[1], 0, 31)
    image = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)
    return tf.image.stateless_random_flip_left_right(image, flip_key)

  def resize(image):
    image = tf.image.resize(image, [IMAGENET_SIZE, IMAGENET_SIZE], method='bicubic')
    return tf.ensure_shape(image, [IMAGENET_SIZE, IMAGENET_SIZE, 3])

  def center_crop(image_bytes):
    shape = tf.io.extract_jpeg_shape(image_bytes)
    fraction = IMAGENET_SIZE / (IMAGENET_SIZE + 32)
    crop = tf.cast(fraction * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32), tf.int32)
    window = tf.stack([(shape[0] - crop + 1) // 2, (shape[1] - crop + 1) // 2, crop, crop])
    return resize(tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3))

  def imagenet_train(image_bytes, key):
    crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
    shape = tf.io.extract_jpeg_shape(image_bytes)
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4]),
      seed=crop_key,
      min_object_covered=0.1,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    found = tf.reduce_any(tf.not_equal(size[:2], shape[:2]))
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    image = tf.cond(
      found,
      lambda: resize(tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)),
      lambda: center_crop(image_bytes),
    )
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
    return (image - ip.MEAN_RGB) / ip.STDDEV_RGB

  augment = cifar10_train if name == 'cifar10' else imagenet_train
  order = np.random.default_rng(0).permutation(len(labels))[: steps * batch]
  indices = order.reshape(steps, batch)
  dtype = tf.uint8 if name == 'cifar10' else tf.string
  shape = [batch, 32, 32, 3] if name == 'cifar10' else [batch]

  def fetch(batch_indices):
    return images[batch_indices] if name == 'cifar10' else images[batch_indices].astype(bytes)

  def load(batch_indices):
    image = tf.ensure_shape(tf.numpy_function(fetch, [batch_indices], dtype), shape)
    return image, tf.gather(labels, batch_indices)

  ds = tf.data.Dataset.from_tensor_slices(indices).map(load, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.unbatch().enumerate()
  key = tf.constant([1, 2], tf.int64)
  ds = ds.map(
    lambda i, x: (augment(x[0], tf.random.experimental.stateless_fold_in(key, i)), x[1]),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  ds = ds.batch(batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def records_per_sec(make: Callable[..., Iterator], name, images, labels, batch, steps) -> float:
  batches = make(name, images, labels, batch, steps + 1)
  next(batches)  # The warm-up batch: threads start, buffers fill.
  start = time.perf_counter()
  count = sum(1 for _ in batches)
  return count * batch / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--datasets', nargs='+', choices=tuple(SHAPES), default=list(SHAPES))
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=None, help='timed batches per round')
  args = parser.parse_args()
  pipelines = {'grain': grain_batches}
  try:
    import tensorflow as tf  # noqa: F401

    pipelines['tf.data'] = tf_batches
  except ImportError:
    print('TensorFlow is not installed: the Grain pipeline alone.')
  print(machine())
  print(f'read threads {ip.READ_THREADS}, prefetch {ip.PREFETCH_BATCHES} batches')
  for name in args.datasets:
    batch, count = SHAPES[name]
    steps = args.steps or count // batch - 1
    images, labels = _records(name, count)
    figures = {pipeline: [] for pipeline in pipelines}
    for _ in range(args.rounds):
      for pipeline, make in pipelines.items():
        figures[pipeline].append(records_per_sec(make, name, images, labels, batch, steps))
    for pipeline, values in figures.items():
      print(
        f'{name:9s} {pipeline:8s} batch {batch:4d}, {steps} batches: '
        f'{statistics.median(values):8.1f} records/s (rounds: '
        + ', '.join(f'{v:.0f}' for v in values)
        + ')'
      )


if __name__ == '__main__':
  main()
