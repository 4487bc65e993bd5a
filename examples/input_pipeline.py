# Copyright 2025 The coolopt Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

"""Input pipelines for the reference trainers.

Four datasets, one entry each in `DATASETS`, are served through one `tf.data`
batching path:

* ``cifar10`` (TFDS): the augmentation of the Keras ``cifar10_resnet.py``
  example: random shifts of up to 10% of the width and height with 'nearest'
  fill, random horizontal flips, pixels scaled to [0, 1] minus the per-pixel
  mean image of the training set.
* ``imagenet2012`` (TFDS, manual download): Inception-style random-resized
  crops and flips for training, a padded center crop for evaluation, and the
  usual per-channel ImageNet mean/std normalization.
* ``digits``: scikit-learn's bundled 8x8 digits, a fixed stratified 1,437/360
  split. Small enough for tests and notebooks, and needs no download.
* ``synthetic``: seeded random images whose labels are a fixed linear function
  of the pixels, so that a model can learn them. For benchmarks and tests.

A dataset is added by one `DatasetSpec` in `DATASETS`: its source (a TFDS
builder or arrays in memory), its image shape, its train and evaluation
preprocessing, and whether its splits are cached by default.

The global batch sequence of a train epoch is a function of ``(seed, epoch)``
alone, whatever the number of processes and devices: the epoch is a seeded
permutation of the whole training split (a new one for each further pass when
``num_steps`` asks for more), batch n holds its examples
``[n * batch_size, (n + 1) * batch_size)``, and the augmentation of each example is
keyed by ``(seed, epoch, its position in the epoch)`` with stateless random ops.
Each process reads only the rows of each global batch that its devices hold (a
contiguous block, process 0 first) by random access, and can start at any step:
a run resumed anywhere sees exactly the batches an uninterrupted run would have
seen, on one process or many.

Random access needs the training split in memory (digits, synthetic data, and the
TFDS datasets when ``cache``, CIFAR-10's default) or prepared by TFDS as
ArrayRecord (``--file_format=array_record``; ImageNet's way).

Evaluation batches are read in order, each process its own slice of the split,
and carry a ``mask``; the last one is padded, so that evaluation covers the
split exactly once.

The functions take the trainer config's fields of the same names as arguments
(see examples/configs/default.py): ``dataset``, ``data_dir``, ``image_size``,
``num_channels``, ``num_classes``, ``synthetic_train_size``,
``synthetic_test_size``, ``cache`` and ``seed``; ``num_steps`` is
``steps_per_epoch`` for training and ``steps_per_eval`` for evaluation.
"""

import dataclasses
import functools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

SPLITS = ('train', 'test')

# Keras' width_shift_range=0.1 on 32 pixels, rounded to whole pixels.
CIFAR10_MAX_SHIFT = 3

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The evaluation crop keeps image_size / (image_size + CROP_PADDING) of the
# shorter side, as in the Inception and EfficientNet references.
CROP_PADDING = 32

DIGITS_TEST_SIZE = 360

Example = dict[str, tf.Tensor]
# A train function takes a per-example stateless seed (int64 [2]) besides the example.
TrainFn = Callable[[Example, tf.Tensor], Example]
EvalFn = Callable[[Example], Example]
Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes and shapes of a dataset, for all processes together."""

  num_train: int
  num_test: int
  num_classes: int
  image_shape: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class DatasetOptions:
  """What reading a dataset may depend on besides its name.

  Attributes:
    data_dir: the TFDS data directory; None for TFDS' default.
    image_size: ImageNet's crop size; the synthetic images' side.
    num_channels: the synthetic images' channels.
    num_classes: the synthetic data's classes.
    synthetic_train_size: the synthetic training split's examples.
    synthetic_test_size: the synthetic test split's examples.
  """

  data_dir: str | None
  image_size: int
  num_channels: int
  num_classes: int
  synthetic_train_size: int
  synthetic_test_size: int


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset: where it comes from, how it is preprocessed, and its defaults.

  A dataset is read either from TFDS, by the builder named as its `DATASETS` key
  (`tfds_splits` set), or from arrays in memory (`arrays` and `num_classes` set).

  Attributes:
    image_shape: `image_shape(options)`, the shape of a preprocessed image.
    preprocess: `preprocess(options)`, the (train, eval) preprocessing functions;
      both return {'image': float32 [H, W, C], 'label': int32 []}.
    cache: whether the splits are kept in memory across epochs when the caller
      does not say.
    tfds_splits: the TFDS split read for each of 'train' and 'test'.
    decode_after_crop: TFDS images are read as encoded JPEGs and decoded by the
      preprocessing, which then decodes only the crop.
    manual_download: for a TFDS dataset that cannot be downloaded by TFDS, how to
      get its files into '{manual_dir}'.
    arrays: `arrays(options)`, {'train': (images, labels), 'test': (...)} as numpy.
    num_classes: `num_classes(options)`, for a dataset in memory (a TFDS builder
      knows its own).
  """

  image_shape: Callable[[DatasetOptions], tuple[int, int, int]]
  preprocess: Callable[[DatasetOptions], tuple[TrainFn, EvalFn]]
  cache: bool = True
  tfds_splits: Mapping[str, str] | None = None
  decode_after_crop: bool = False
  manual_download: str | None = None
  arrays: Callable[[DatasetOptions], Arrays] | None = None
  num_classes: Callable[[DatasetOptions], int] | None = None

  def __post_init__(self):
    if (self.tfds_splits is None) == (self.arrays is None):
      raise ValueError(
        'A DatasetSpec reads from TFDS or from arrays: exactly one of tfds_splits and arrays '
        f'must be set, got tfds_splits={self.tfds_splits!r} and arrays={self.arrays!r}.'
      )
    if (self.arrays is None) != (self.num_classes is None):
      raise ValueError(
        'A DatasetSpec in memory needs num_classes, and a TFDS one reads its own: got '
        f'arrays={self.arrays!r} and num_classes={self.num_classes!r}.'
      )


# --------------------------------------------------------------------------
# Preprocessing. Train functions take a per-example stateless seed `key`
# (int64 [2]); all return {'image': float32 [H, W, C], 'label': int32 []}.


def _cifar10_train(example: Example, key: tf.Tensor, *, pixel_mean: np.ndarray) -> Example:
  # Keras subtracts the mean image before ImageDataGenerator shifts it.
  image = tf.cast(example['image'], tf.float32) / 255.0 - pixel_mean
  shift_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  shift = tf.random.stateless_uniform(
    [2], shift_key, minval=-CIFAR10_MAX_SHIFT, maxval=CIFAR10_MAX_SHIFT + 1, dtype=tf.int32
  )
  # A translation with fill_mode='nearest' reads every output pixel from the
  # clipped source coordinate, which replicates the border pixels.
  height, width = image.shape[0], image.shape[1]
  rows = tf.clip_by_value(tf.range(height) - shift[0], 0, height - 1)
  cols = tf.clip_by_value(tf.range(width) - shift[1], 0, width - 1)
  image = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)
  image = tf.image.stateless_random_flip_left_right(image, flip_key)
  return {'image': image, 'label': example['label']}


def _cifar10_eval(example: Example, *, pixel_mean: np.ndarray) -> Example:
  image = tf.cast(example['image'], tf.float32) / 255.0 - pixel_mean
  return {'image': image, 'label': example['label']}


def _resize(image: tf.Tensor, image_size: int) -> tf.Tensor:
  image = tf.image.resize(image, [image_size, image_size], method='bicubic')
  return tf.ensure_shape(image, [image_size, image_size, 3])


def _normalize(image: tf.Tensor) -> tf.Tensor:
  return (image - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def _center_crop(image_bytes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes the padded center square of a JPEG and resizes it."""
  shape = tf.io.extract_jpeg_shape(image_bytes)
  height, width = shape[0], shape[1]
  fraction = image_size / (image_size + CROP_PADDING)
  crop = tf.cast(fraction * tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  crop = tf.maximum(crop, 1)
  window = tf.stack([(height - crop + 1) // 2, (width - crop + 1) // 2, crop, crop])
  image = tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)
  return _resize(image, image_size)


def _random_crop(image_bytes: tf.Tensor, key: tf.Tensor, image_size: int) -> tf.Tensor:
  """Decodes an Inception-style random crop (8%-100% of the area) of a JPEG."""
  shape = tf.io.extract_jpeg_shape(image_bytes)
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=whole_image,
    seed=key,
    min_object_covered=0.1,
    aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  # The op returns the whole image when no attempt met the constraints; the
  # references then fall back to the evaluation crop rather than squash it.
  found = tf.reduce_any(tf.not_equal(size[:2], shape[:2]))

  def crop() -> tf.Tensor:
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return _resize(tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3), image_size)

  return tf.cond(found, crop, lambda: _center_crop(image_bytes, image_size))


def _imagenet_train(example: Example, key: tf.Tensor, *, image_size: int) -> Example:
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  image = _random_crop(example['image'], crop_key, image_size)
  image = tf.image.stateless_random_flip_left_right(image, flip_key)
  return {'image': _normalize(image), 'label': example['label']}


def _imagenet_eval(example: Example, *, image_size: int) -> Example:
  image = _center_crop(example['image'], image_size)
  return {'image': _normalize(image), 'label': example['label']}


def _to_float(example: Example, key: tf.Tensor | None = None) -> Example:
  del key  # Digits and synthetic data are not augmented.
  image = example['image']
  if image.dtype == tf.uint8:
    image = tf.cast(image, tf.float32) / 255.0
  return {'image': image, 'label': example['label']}


def _cifar10_preprocess(options: DatasetOptions) -> tuple[TrainFn, EvalFn]:
  pixel_mean = _cifar10_pixel_mean(options.data_dir)
  return (
    functools.partial(_cifar10_train, pixel_mean=pixel_mean),
    functools.partial(_cifar10_eval, pixel_mean=pixel_mean),
  )


def _imagenet_preprocess(options: DatasetOptions) -> tuple[TrainFn, EvalFn]:
  return (
    functools.partial(_imagenet_train, image_size=options.image_size),
    functools.partial(_imagenet_eval, image_size=options.image_size),
  )


def _float_preprocess(options: DatasetOptions) -> tuple[TrainFn, EvalFn]:
  del options
  return _to_float, _to_float


# --------------------------------------------------------------------------
# Data in memory, and the statistics of a TFDS split.


@functools.cache
def _digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """scikit-learn's digits as float32 images in [0, 1], split once and for all."""
  # Imported here so that the TFDS datasets do not pay for scikit-learn.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  train_x, test_x, train_y, test_y = train_test_split(
    images, labels, test_size=DIGITS_TEST_SIZE, stratify=labels, random_state=0
  )
  return {'train': (train_x, train_y), 'test': (test_x, test_y)}


@functools.cache
def _synthetic_arrays(
  image_shape: tuple[int, int, int], num_classes: int, num_train: int, num_test: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Uniform uint8 images labelled by the argmax of a fixed random projection."""
  # The data must not depend on the seed: runs with different seeds should
  # still be trained and evaluated on the same dataset.
  rng = np.random.default_rng(0)
  n = num_train + num_test
  images = rng.integers(0, 256, size=(n, *image_shape), dtype=np.uint8)
  projection = rng.standard_normal((math.prod(image_shape), num_classes), dtype=np.float32)
  labels = np.empty(n, np.int32)
  # Centred pixels make the classes about equally frequent. In chunks, so that a
  # large synthetic ImageNet never needs a float copy of all images at once.
  for start in range(0, n, 256):
    chunk = images[start : start + 256].reshape(-1, projection.shape[0])
    labels[start : start + 256] = np.argmax((chunk / 255.0 - 0.5) @ projection, axis=-1)
  return {
    'train': (images[:num_train], labels[:num_train]),
    'test': (images[num_train:], labels[num_train:]),
  }


def _synthetic_shape(options: DatasetOptions) -> tuple[int, int, int]:
  return (options.image_size, options.image_size, options.num_channels)


def _synthetic_data(options: DatasetOptions) -> Arrays:
  return _synthetic_arrays(
    _synthetic_shape(options),
    options.num_classes,
    options.synthetic_train_size,
    options.synthetic_test_size,
  )


@functools.cache
def _cifar10_pixel_mean(data_dir: str | None) -> np.ndarray:
  """The mean training image in [0, 1], [32, 32, 3]: over the whole split, all processes."""
  builder = tfds.builder('cifar10', data_dir=data_dir)
  ds = builder.as_dataset(split='train', read_config=tfds.ReadConfig(try_autocache=False))
  ds = ds.map(lambda ex: tf.cast(ex['image'], tf.float64), num_parallel_calls=tf.data.AUTOTUNE)
  # Sum per batch in float64 so that 50k images lose no precision.
  ds = ds.batch(1024).map(lambda x: (tf.reduce_sum(x, axis=0), tf.shape(x)[0]))
  total, count = np.zeros([32, 32, 3], np.float64), 0
  for batch_sum, batch_count in ds.as_numpy_iterator():
    total += batch_sum
    count += int(batch_count)
  return (total / count / 255.0).astype(np.float32)


# --------------------------------------------------------------------------
# The datasets.

DATASETS: dict[str, DatasetSpec] = {
  'cifar10': DatasetSpec(
    image_shape=lambda options: (32, 32, 3),
    preprocess=_cifar10_preprocess,
    tfds_splits={'train': 'train', 'test': 'test'},
  ),
  'imagenet2012': DatasetSpec(
    image_shape=lambda options: (options.image_size, options.image_size, 3),
    preprocess=_imagenet_preprocess,
    # The encoded JPEGs (~150 GB) do not fit a host's memory.
    cache=False,
    # ImageNet's labelled held-out split is called 'validation'.
    tfds_splits={'train': 'train', 'test': 'validation'},
    decode_after_crop=True,
    manual_download=(
      'ImageNet cannot be downloaded automatically: register at '
      'https://image-net.org/download-images, put ILSVRC2012_img_train.tar and '
      'ILSVRC2012_img_val.tar in {manual_dir}'
    ),
  ),
  'digits': DatasetSpec(
    image_shape=lambda options: (8, 8, 1),
    preprocess=_float_preprocess,
    arrays=lambda options: _digits_arrays(),
    num_classes=lambda options: 10,
  ),
  'synthetic': DatasetSpec(
    image_shape=_synthetic_shape,
    preprocess=_float_preprocess,
    arrays=_synthetic_data,
    num_classes=lambda options: options.num_classes,
  ),
}
KNOWN_DATASETS = tuple(DATASETS)


def get_dataset(dataset: str) -> DatasetSpec:
  """The `DatasetSpec` of `dataset`, one of `KNOWN_DATASETS`."""
  if dataset not in DATASETS:
    raise ValueError(f'Unknown dataset {dataset!r}; known datasets: {", ".join(DATASETS)}.')
  return DATASETS[dataset]


def _not_prepared_message(
  name: str, builder: tfds.core.DatasetBuilder, manual_download: str | None
) -> str:
  # builder.data_dir is <root>/<name>/<version>; the commands want <root>.
  root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  prepare = (
    'python -m tensorflow_datasets.scripts.download_and_prepare '
    f'--datasets={name} --data_dir={root}'
  )
  if manual_download is not None:
    manual_dir = os.path.join(root, 'downloads', 'manual')
    return (
      f'Dataset {name} is not prepared in {root} (no {builder.data_dir}). '
      f'{manual_download.format(manual_dir=manual_dir)}, then run\n'
      f'  {prepare}\n'
      'or point config.data_dir at the directory that holds the prepared dataset.'
    )
  return (
    f'Dataset {name} is not prepared in {root} (no {builder.data_dir}). Prepare it on a machine '
    f'with network access with\n  {prepare}\n'
    'and copy that directory here, or point config.data_dir at the directory that holds it.'
  )


def _tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """Returns the builder of a prepared TFDS dataset; fails fast otherwise."""
  builder = tfds.builder(name, data_dir=data_dir)
  # Reading an unprepared builder would either fail deep inside TFDS or start a
  # download; neither helps on a machine without network.
  if not builder.is_prepared():
    raise FileNotFoundError(_not_prepared_message(name, builder, DATASETS[name].manual_download))
  return builder


def _info(name: str, options: DatasetOptions) -> DatasetInfo:
  spec = get_dataset(name)
  if spec.arrays is None:
    builder = _tfds_builder(name, options.data_dir)
    return DatasetInfo(
      num_train=builder.info.splits[spec.tfds_splits['train']].num_examples,
      num_test=builder.info.splits[spec.tfds_splits['test']].num_examples,
      num_classes=builder.info.features['label'].num_classes,
      image_shape=spec.image_shape(options),
    )
  arrays = spec.arrays(options)
  return DatasetInfo(
    num_train=len(arrays['train'][1]),
    num_test=len(arrays['test'][1]),
    num_classes=spec.num_classes(options),
    image_shape=spec.image_shape(options),
  )


def dataset_info(
  dataset: str,
  *,
  data_dir: str | None = None,
  image_size: int = 32,
  num_channels: int = 3,
  num_classes: int = 10,
  synthetic_train_size: int = 1024,
  synthetic_test_size: int = 256,
) -> DatasetInfo:
  """Returns the sizes and shapes of `dataset`.

  Args:
    dataset: one of `KNOWN_DATASETS`.
    data_dir, image_size, num_channels, num_classes, synthetic_train_size,
      synthetic_test_size: as for `create_input_iter`.

  Raises:
    ValueError: for an unknown dataset.
    FileNotFoundError: if a TFDS dataset has not been prepared in `data_dir`.
  """
  options = DatasetOptions(
    data_dir, image_size, num_channels, num_classes, synthetic_train_size, synthetic_test_size
  )
  return _info(dataset, options)


def steps_per_epoch(info: DatasetInfo, global_batch_size: int, steps: int | None = -1) -> int:
  """`steps` if positive, else the full batches in the train split."""
  if steps is not None and steps > 0:
    return steps
  steps = info.num_train // global_batch_size
  if steps == 0:
    raise ValueError(
      f'batch_size={global_batch_size} exceeds the {info.num_train} training examples.'
    )
  return steps


def steps_per_eval(info: DatasetInfo, global_batch_size: int, steps: int | None = -1) -> int:
  """`steps` if positive, else enough batches to cover the test split."""
  if steps is not None and steps > 0:
    return steps
  return math.ceil(info.num_test / global_batch_size)


# --------------------------------------------------------------------------
# Sources: one process's slice of a split, before preprocessing.


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')


def _process_slice(n: int, index: int, count: int) -> slice:
  """The `index`-th of `count` contiguous near-equal parts of range(n), as TFDS splits."""
  return slice(index * n // count, (index + 1) * n // count)


# Cached TFDS sources, kept across calls so that the in-memory `cache()` is
# filled once and reused by every later epoch and evaluation.
_CACHED_SOURCES: dict[tuple[Any, ...], tf.data.Dataset] = {}


def _tfds_source(name: str, data_dir: str | None, split: str, *, cache: bool) -> tf.data.Dataset:
  """This process's slice of `split`, in file order, for evaluation."""
  spec = DATASETS[name]
  builder = _tfds_builder(name, data_dir)
  key = (name, os.fspath(builder.data_dir), split, jax.process_index(), jax.process_count())
  if cache and key in _CACHED_SOURCES:
    return _CACHED_SOURCES[key]
  ds = builder.as_dataset(
    split=tfds.split_for_jax_process(spec.tfds_splits[split]),
    shuffle_files=False,
    decoders={'image': tfds.decode.SkipDecoding()} if spec.decode_after_crop else None,
    read_config=tfds.ReadConfig(
      try_autocache=False,
      skip_prefetch=True,
    ),
  )
  ds = ds.map(
    lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32)},
    num_parallel_calls=tf.data.AUTOTUNE,
  )
  if cache:
    ds = ds.cache()
    _CACHED_SOURCES[key] = ds
  return ds


def _array_source(arrays: Arrays, split: str) -> tf.data.Dataset:
  images, labels = arrays[split]
  local = _process_slice(len(labels), jax.process_index(), jax.process_count())
  return tf.data.Dataset.from_tensor_slices({'image': images[local], 'label': labels[local]})


# --------------------------------------------------------------------------
# Batching.


def epoch_order(num_train: int, seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The training-split indices of the first `num_examples` examples of an epoch.

  One seeded permutation of `range(num_train)` per pass over the split, so that every
  process computes the same global order.
  """
  passes = math.ceil(num_examples / num_train)
  orders = [
    np.random.default_rng(np.random.SeedSequence([seed % 2**32, epoch, k])).permutation(num_train)
    for k in range(passes)
  ]
  return np.concatenate(orders)[:num_examples]


def _augment_key(seed: int, epoch: int) -> np.ndarray:
  # SeedSequence mixes its entropy well: neighbouring epochs and seeds give unrelated keys.
  state = np.random.SeedSequence([int(seed) % 2**32, epoch, 2**31]).generate_state(2)
  return state.astype(np.int64)


# Training splits held for random access, kept across epochs.
_TRAIN_ROWS: dict[tuple[Any, ...], Callable[[np.ndarray], dict[str, np.ndarray]]] = {}


def _stack_records(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
  image = [r['image'] for r in records]
  return {
    # Encoded JPEGs (bytes) stay an object array; tf.numpy_function makes them strings.
    'image': np.array(image, dtype=object) if isinstance(image[0], bytes) else np.stack(image),
    'label': np.asarray([r['label'] for r in records], np.int32),
  }


def _train_rows(
  name: str, options: DatasetOptions, *, cache: bool
) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
  """`read(indices)`: the training examples at `indices`, by random access."""
  spec = DATASETS[name]
  if spec.arrays is not None:
    images, labels = spec.arrays(options)['train']
    return lambda indices: {'image': images[indices], 'label': labels[indices]}

  builder = _tfds_builder(name, options.data_dir)
  key = (name, os.fspath(builder.data_dir))
  if key in _TRAIN_ROWS:
    return _TRAIN_ROWS[key]
  split = spec.tfds_splits['train']
  decoders = {'image': tfds.decode.SkipDecoding()} if spec.decode_after_crop else None
  if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
    source = builder.as_data_source(split=split, decoders=decoders)

    def read(indices):
      return _stack_records(source.__getitems__([int(i) for i in indices]))

  elif cache:
    ds = builder.as_dataset(
      split=split,
      decoders=decoders,
      read_config=tfds.ReadConfig(try_autocache=False, skip_prefetch=True),
    )
    records = list(ds.batch(1024).as_numpy_iterator())
    arrays = {
      'image': np.concatenate([r['image'] for r in records]),
      'label': np.concatenate([r['label'] for r in records]).astype(np.int32),
    }

    def read(indices):
      return {k: v[indices] for k, v in arrays.items()}

  else:
    raise ValueError(
      f'The training split of {name} in {builder.data_dir} is stored as '
      f'{builder.info.file_format.value}, which cannot be read by index, and '
      f'config.cache=False keeps it out of memory. Prepare it as ArrayRecord with\n'
      f'  tfds build {name} --file_format=array_record --data_dir=<data_dir>\n'
      'or set config.cache=True if it fits in memory.'
    )
  _TRAIN_ROWS[key] = read
  return read


def _train_batches(
  read: Callable[[np.ndarray], dict[str, np.ndarray]],
  train_fn: TrainFn,
  info: DatasetInfo,
  *,
  seed: int,
  epoch: int,
  global_batch_size: int,
  num_batches: int,
  start_step: int,
) -> tf.data.Dataset:
  """This process's rows of the epoch's global batches `start_step`, ... as examples."""
  process, processes = jax.process_index(), jax.process_count()
  local_batch_size = global_batch_size // processes
  order = epoch_order(info.num_train, seed, epoch, num_batches * global_batch_size)
  positions = np.arange(num_batches * global_batch_size).reshape(num_batches, global_batch_size)
  rows = slice(process * local_batch_size, (process + 1) * local_batch_size)
  positions = positions[start_step:, rows]
  indices = order.reshape(num_batches, global_batch_size)[start_step:, rows]
  augment_key = _augment_key(seed, epoch)
  sample = read(indices[:1, 0] if indices.size else np.zeros([1], np.int64))
  image_shape = [local_batch_size, *sample['image'].shape[1:]]
  image_dtype = tf.string if sample['image'].dtype == object else tf.as_dtype(sample['image'].dtype)

  def fetch(batch_indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = read(batch_indices)
    return rows['image'], rows['label']

  def load(batch_indices, batch_positions):
    image, label = tf.numpy_function(fetch, [batch_indices], [image_dtype, tf.int32])
    image = tf.ensure_shape(image, image_shape)
    label = tf.ensure_shape(label, [local_batch_size])
    return {'image': image, 'label': label}, batch_positions

  ds = tf.data.Dataset.from_tensor_slices((indices, positions))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.unbatch()
  ds = ds.map(
    lambda example, position: train_fn(
      example, tf.random.experimental.stateless_fold_in(augment_key, position)
    ),
    num_parallel_calls=tf.data.AUTOTUNE,
    deterministic=True,
  )
  return ds.batch(local_batch_size, drop_remainder=True)


def _eval_batches(
  source: tf.data.Dataset, eval_fn: EvalFn, *, local_batch_size: int, num_batches: int
) -> tf.data.Dataset:
  """`num_batches` batches of `source`, each example with 'mask' 1, then padding with 0."""

  def with_mask(example: Example) -> Example:
    return {**eval_fn(example), 'mask': tf.constant(1.0, tf.float32)}

  ds = source.map(with_mask, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  # Endless all-zero examples with mask 0 fill the last batch (and any batch
  # past the end of this process's slice), so every test example is counted
  # exactly once and every process runs the same number of steps.
  padding = tf.nest.map_structure(lambda s: tf.zeros(s.shape, s.dtype), ds.element_spec)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat())
  ds = ds.batch(local_batch_size, drop_remainder=True)
  return ds.take(num_batches)


def _shard(batch: Example, num_local_devices: int) -> Example:
  return {k: tf.reshape(v, [num_local_devices, -1, *v.shape[1:]]) for k, v in batch.items()}


def _finish(ds: tf.data.Dataset, num_local_devices: int) -> Iterator[dict[str, np.ndarray]]:
  ds = ds.map(functools.partial(_shard, num_local_devices=num_local_devices))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).as_numpy_iterator()


def create_input_iter(
  dataset: str,
  split: str,
  *,
  global_batch_size: int,
  epoch: int = 0,
  seed: int = 0,
  num_steps: int | None = -1,
  cache: bool | None = None,
  data_dir: str | None = None,
  image_size: int = 32,
  num_channels: int = 3,
  num_classes: int = 10,
  synthetic_train_size: int = 1024,
  synthetic_test_size: int = 256,
  num_local_devices: int | None = None,
  evaluation: bool | None = None,
  start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Returns an iterator over one epoch of this process's batches of `split`.

  Args:
    dataset: one of `KNOWN_DATASETS`.
    split: 'train' or 'test'.
    global_batch_size: examples per step over all processes and devices.
    epoch: the epoch number; the train order and augmentation depend only on it
      and `seed`. Ignored for evaluation.
    seed: with `epoch`, decides the train order and augmentation.
    num_steps: the batches to yield: for training the epoch's steps (a permutation
      of the split for each pass they need), for evaluation on 'test' the first
      `num_steps` batches; -1 or None: one pass over the split. Evaluation on
      'train' always covers the split once.
    cache: keep the TFDS splits in memory across epochs; None: the dataset's
      default (`DatasetSpec.cache`: yes but for ImageNet).
    data_dir: the TFDS data directory; None for TFDS' default.
    image_size: ImageNet's crop size; the synthetic images' side.
    num_channels: the synthetic images' channels.
    num_classes: the synthetic data's classes.
    synthetic_train_size: the synthetic training split's examples.
    synthetic_test_size: the synthetic test split's examples.
    num_local_devices: leading dimension of the batches; defaults to
      `jax.local_device_count()`.
    evaluation: batches for evaluation: no augmentation, a 'mask', the whole split
      once (the test split: `steps_per_eval` batches). Default: for 'test' only.
    start_step: the first training batch of the epoch to yield (to resume inside it).

  Returns:
    An iterator of numpy dicts with 'image' float32 [num_local_devices,
    per_device, H, W, C] and 'label' int32 [num_local_devices, per_device];
    evaluation batches also have 'mask' float32 [num_local_devices, per_device],
    0 on the padding after the last example. Training yields
    `steps_per_epoch(info, global_batch_size, num_steps)` batches, evaluation on
    'test' `steps_per_eval(info, global_batch_size, num_steps)`.

  Raises:
    ValueError: for an unknown dataset or split, or a batch size that the
      devices do not divide.
    FileNotFoundError: if a TFDS dataset has not been prepared in `data_dir`;
      the message says how to prepare it.
  """
  spec = get_dataset(dataset)
  _check_split(split)
  if num_local_devices is None:
    num_local_devices = jax.local_device_count()
  num_devices = jax.process_count() * num_local_devices
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
      f'batch_size={global_batch_size} must be a positive multiple of the device count '
      f'{num_devices} ({jax.process_count()} processes x {num_local_devices} local devices).'
    )
  local_batch_size = global_batch_size // jax.process_count()
  options = DatasetOptions(
    data_dir, image_size, num_channels, num_classes, synthetic_train_size, synthetic_test_size
  )
  info = _info(dataset, options)
  if cache is None:
    cache = spec.cache
  if evaluation is None:
    evaluation = split == 'test'
  if not evaluation:
    if split != 'train':
      raise ValueError(f'Only the train split is trained on, got split={split!r}.')
    train_fn, _ = spec.preprocess(options)
    ds = _train_batches(
      _train_rows(dataset, options, cache=cache),
      train_fn,
      info,
      seed=seed,
      epoch=epoch,
      global_batch_size=global_batch_size,
      num_batches=steps_per_epoch(info, global_batch_size, num_steps),
      start_step=start_step,
    )
    return _finish(ds, num_local_devices)

  _, eval_fn = spec.preprocess(options)
  if spec.arrays is None:
    source = _tfds_source(dataset, options.data_dir, split, cache=cache)
  else:
    source = _array_source(spec.arrays(options), split)
  if split == 'test':
    num_batches = steps_per_eval(info, global_batch_size, num_steps)
  else:
    num_batches = math.ceil(info.num_train / global_batch_size)
  ds = _eval_batches(source, eval_fn, local_batch_size=local_batch_size, num_batches=num_batches)
  return _finish(ds, num_local_devices)
