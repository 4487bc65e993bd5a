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

"""Input pipelines for the reference trainers, on Grain.

Four datasets, one entry each in `DATASETS`, are served through one Grain path:

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

Every split is an index-addressable source for `grain.MapDataset.source`: arrays
in memory, or TFDS' `data_source` over a split prepared as ArrayRecord (read
without TensorFlow). Images are decoded and augmented with Pillow and NumPy.

The global batch sequence of a train epoch is a function of ``(seed, epoch)``
alone, whatever the number of processes and devices: the epoch is Grain's seeded
shuffle of the whole training split (a new permutation for each further pass when
``num_steps`` asks for more), global batch n holds the epoch's examples
``[n * batch_size, (n + 1) * batch_size)``, and `random_map` keys each example's
augmentation by the epoch's seed and its position in the epoch. Each process reads
only the rows of each global batch that its devices hold (a contiguous block,
process 0 first), and a run resumed at any step (the iterator's state) sees exactly
the batches an uninterrupted run would have seen, on one process or many.

Evaluation batches are read in order, each process its own slice of the split,
and carry a ``mask``; the last one is padded, so that evaluation covers the
split exactly once.

A `validation_fraction` of the options holds out the last part of the training
split (in its stored order, the same for every seed) as a 'validation' split, for
choosing hyperparameters without reading the test split; 'train' is then the rest.

The functions take a `DatasetOptions`, built once from the trainer config's fields
of the same names (see examples/configs/default.py).
"""

import dataclasses
import functools
import io
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SPLITS = ('train', 'validation', 'test')

# Keras' width_shift_range=0.1 on 32 pixels, rounded to whole pixels.
CIFAR10_MAX_SHIFT = 3

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# The evaluation crop keeps image_size / (image_size + CROP_PADDING) of the
# shorter side, as in the Inception and EfficientNet references.
CROP_PADDING = 32
# The Inception crop: `tf.image.sample_distorted_bounding_box`'s arguments in the
# references (min_object_covered=0.1 of the whole image, 10 attempts).
CROP_AREA_RANGE = (0.08, 1.0)
CROP_MIN_COVERED = 0.1
CROP_ASPECT_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10

DIGITS_TEST_SIZE = 360

# Threads that read and preprocess batches ahead of the trainer, and the batches
# they may hold ready.
READ_THREADS = min(os.cpu_count() or 1, 8)
PREFETCH_BATCHES = 2 * READ_THREADS

Example = dict[str, Any]
# A train function takes a per-example `np.random.Generator` besides the example.
TrainFn = Callable[[Example, np.random.Generator], Example]
EvalFn = Callable[[Example], Example]
Arrays = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Sizes and shapes of a dataset, for all processes together."""

  num_train: int
  num_test: int
  num_classes: int
  image_shape: tuple[int, int, int]
  num_validation: int = 0

  def num_examples(self, split: str) -> int:
    """The examples of `split`, one of `SPLITS`."""
    _check_split(split)
    return {'train': self.num_train, 'validation': self.num_validation, 'test': self.num_test}[
      split
    ]


@dataclasses.dataclass(frozen=True)
class DatasetOptions:
  """What reading a dataset depends on, besides the split and the batches asked for.

  Attributes:
    dataset: one of `KNOWN_DATASETS`.
    data_dir: the TFDS data directory; None for TFDS' default.
    image_size: ImageNet's crop size; the synthetic images' side.
    num_channels: the synthetic images' channels.
    num_classes: the synthetic data's classes.
    synthetic_train_size: the synthetic training split's examples.
    synthetic_test_size: the synthetic test split's examples.
    seed: with the epoch, decides the train order and augmentation.
    cache: keep the TFDS splits decoded in memory across epochs; None: the dataset's
      default (`DatasetSpec.cache`: yes but for ImageNet).
    validation_fraction: in [0, 1): the last this fraction of the stored training
      split is the 'validation' split, and 'train' the rest; 0: no validation split.
  """

  dataset: str
  data_dir: str | None = None
  image_size: int = 32
  num_channels: int = 3
  num_classes: int = 10
  synthetic_train_size: int = 1024
  synthetic_test_size: int = 256
  seed: int = 0
  cache: bool | None = None
  validation_fraction: float = 0.0

  def __post_init__(self):
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ValueError(
        f'validation_fraction must be in [0, 1), the fraction of the training split held '
        f'out, got validation_fraction={self.validation_fraction!r}.'
      )


# The options that some datasets read and others do not (`DatasetSpec.reads`); every
# dataset reads the others.
OPTIONAL_OPTIONS = (
  'data_dir',
  'image_size',
  'num_channels',
  'synthetic_train_size',
  'synthetic_test_size',
)


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
    reads: the options of `OPTIONAL_OPTIONS` that the dataset reads; a run refuses
      the others where they are set (see `examples.tasks.ImageClassification`).
  """

  image_shape: Callable[[DatasetOptions], tuple[int, int, int]]
  preprocess: Callable[[DatasetOptions], tuple[TrainFn, EvalFn]]
  cache: bool = True
  tfds_splits: Mapping[str, str] | None = None
  decode_after_crop: bool = False
  manual_download: str | None = None
  arrays: Callable[[DatasetOptions], Arrays] | None = None
  num_classes: Callable[[DatasetOptions], int] | None = None
  reads: frozenset[str] = frozenset()

  def __post_init__(self):
    if not self.reads <= set(OPTIONAL_OPTIONS):
      raise ValueError(
        f'A DatasetSpec reads some of {OPTIONAL_OPTIONS}, got reads={sorted(self.reads)}.'
      )
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
# Preprocessing. Train functions take a per-example `np.random.Generator`;
# all return {'image': float32 [H, W, C], 'label': int32 []}.


def _cifar10_train(
  example: Example, rng: np.random.Generator, *, pixel_mean: np.ndarray
) -> Example:
  # Keras subtracts the mean image before ImageDataGenerator shifts it.
  image = example['image'].astype(np.float32) / np.float32(255) - pixel_mean
  dy, dx = rng.integers(-CIFAR10_MAX_SHIFT, CIFAR10_MAX_SHIFT + 1, size=2)
  # A translation with fill_mode='nearest' reads every output pixel from the
  # clipped source coordinate, which replicates the border pixels.
  height, width = image.shape[:2]
  rows = np.clip(np.arange(height) - dy, 0, height - 1)
  cols = np.clip(np.arange(width) - dx, 0, width - 1)
  if rng.random() < 0.5:
    cols = cols[::-1]  # The horizontal flip of the shifted image.
  # Two takes of whole rows and columns: a few times faster than one 2-D gather.
  return {'image': image.take(rows, axis=0).take(cols, axis=1), 'label': np.int32(example['label'])}


def _cifar10_eval(example: Example, *, pixel_mean: np.ndarray) -> Example:
  image = example['image'].astype(np.float32) / np.float32(255) - pixel_mean
  return {'image': image, 'label': np.int32(example['label'])}


def _open_jpeg(image_bytes: bytes) -> Image.Image:
  # Opening reads the header only: the pixels are decoded by the crop's load.
  return Image.open(io.BytesIO(image_bytes))


def _crop_and_resize(image: Image.Image, box: tuple[int, int, int, int], size: int) -> np.ndarray:
  """The crop `box` = (top, left, height, width) of `image`, resized to `size` x `size`."""
  top, left, height, width = box
  # JPEG's draft mode decodes at 1/2, 1/4 or 1/8 of the size directly, the least
  # reduction that keeps the crop at least `size` pixels a side.
  scale = min(width, height) / size
  if image.format == 'JPEG' and scale >= 2:
    full_width, full_height = image.size
    image.draft('RGB', (math.ceil(full_width / scale), math.ceil(full_height / scale)))
    ratio = image.size[0] / full_width
    top, left = int(top * ratio), int(left * ratio)
    height, width = max(int(height * ratio), 1), max(int(width * ratio), 1)
  image = image.convert('RGB').crop((left, top, left + width, top + height))
  image = image.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(image, np.float32)


def center_crop_box(height: int, width: int, image_size: int) -> tuple[int, int, int, int]:
  """The padded centre square of the evaluation: (top, left, side, side)."""
  fraction = image_size / (image_size + CROP_PADDING)
  side = max(int(fraction * min(height, width)), 1)
  return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def random_crop_box(
  height: int, width: int, rng: np.random.Generator
) -> tuple[int, int, int, int] | None:
  """An Inception crop (top, left, height, width) of a `height` x `width` image, or None.

  As `tf.image.sample_distorted_bounding_box` with the whole image as the object:
  up to `CROP_ATTEMPTS` draws of an aspect ratio and an area fraction uniform in
  their ranges; the first crop that fits the image and covers at least
  `CROP_MIN_COVERED` of it, at a uniform position. None when no attempt fits.
  """
  image_area = height * width
  for _ in range(CROP_ATTEMPTS):
    aspect_ratio = rng.uniform(*CROP_ASPECT_RATIO_RANGE)
    area = rng.uniform(*CROP_AREA_RANGE) * image_area
    crop_height = round(math.sqrt(area / aspect_ratio))
    crop_width = round(crop_height * aspect_ratio)
    if (
      0 < crop_height <= height
      and 0 < crop_width <= width
      and crop_height * crop_width >= CROP_MIN_COVERED * image_area
    ):
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  return None


def _normalize(image: np.ndarray) -> np.ndarray:
  mean, std = np.float32(MEAN_RGB), np.float32(STDDEV_RGB)
  return (image - mean) / std


def _imagenet_train(example: Example, rng: np.random.Generator, *, image_size: int) -> Example:
  image = _open_jpeg(example['image'])
  width, height = image.size
  # When no attempt fits, the references fall back to the evaluation crop rather
  # than squash the whole image.
  box = random_crop_box(height, width, rng) or center_crop_box(height, width, image_size)
  pixels = _crop_and_resize(image, box, image_size)
  if rng.random() < 0.5:
    pixels = pixels[:, ::-1]
  return {'image': _normalize(pixels), 'label': np.int32(example['label'])}


def _imagenet_eval(example: Example, *, image_size: int) -> Example:
  image = _open_jpeg(example['image'])
  width, height = image.size
  pixels = _crop_and_resize(image, center_crop_box(height, width, image_size), image_size)
  return {'image': _normalize(pixels), 'label': np.int32(example['label'])}


def _to_float(example: Example, rng: np.random.Generator | None = None) -> Example:
  del rng  # Digits and synthetic data are not augmented.
  image = example['image']
  if image.dtype == np.uint8:
    image = image.astype(np.float32) / np.float32(255)
  return {'image': image, 'label': np.int32(example['label'])}


def _cifar10_preprocess(options: DatasetOptions) -> tuple[TrainFn, EvalFn]:
  pixel_mean = _cifar10_pixel_mean(options.data_dir, _cache(options), options.validation_fraction)
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
def _cifar10_pixel_mean(
  data_dir: str | None, cache: bool, validation_fraction: float
) -> np.ndarray:
  """The mean training image in [0, 1], [32, 32, 3]: over the whole split trained on (the
  validation split held out), all processes."""
  source = _tfds_split('cifar10', data_dir, 'train', cache=cache)
  count = _split_sizes(len(source), validation_fraction)[0]
  total = np.zeros([32, 32, 3], np.float64)
  # Summed in float64 chunks so that 50k images lose no precision.
  for start in range(0, count, 1024):
    records = _read(source, range(start, min(start + 1024, count)))
    total += np.sum([r['image'] for r in records], axis=0, dtype=np.float64)
  return (total / count / 255.0).astype(np.float32)


# --------------------------------------------------------------------------
# The datasets.

DATASETS: dict[str, DatasetSpec] = {
  'cifar10': DatasetSpec(
    image_shape=lambda options: (32, 32, 3),
    preprocess=_cifar10_preprocess,
    tfds_splits={'train': 'train', 'test': 'test'},
    reads=frozenset({'data_dir'}),
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
    reads=frozenset({'data_dir', 'image_size'}),
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
    reads=frozenset({'image_size', 'num_channels', 'synthetic_train_size', 'synthetic_test_size'}),
  ),
}
KNOWN_DATASETS = tuple(DATASETS)


def get_dataset(dataset: str) -> DatasetSpec:
  """The `DatasetSpec` of `dataset`, one of `KNOWN_DATASETS`."""
  if dataset not in DATASETS:
    raise ValueError(f'Unknown dataset {dataset!r}; known datasets: {", ".join(DATASETS)}.')
  return DATASETS[dataset]


def _prepare_command(name: str, root: str) -> str:
  return f'tfds build {name} --file_format=array_record --data_dir={root}'


def _not_prepared_message(
  name: str, builder: tfds.core.DatasetBuilder, manual_download: str | None
) -> str:
  # builder.data_dir is <root>/<name>/<version>; the commands want <root>.
  root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  prepare = _prepare_command(name, root)
  needs = "(with coolopt's [prepare] extra, which brings TensorFlow for the encoding)"
  if manual_download is not None:
    manual_dir = os.path.join(root, 'downloads', 'manual')
    return (
      f'Dataset {name} is not prepared in {root} (no {builder.data_dir}). '
      f'{manual_download.format(manual_dir=manual_dir)}, then run {needs}\n'
      f'  {prepare}\n'
      'or point config.data_dir at the directory that holds the prepared dataset.'
    )
  return (
    f'Dataset {name} is not prepared in {root} (no {builder.data_dir}). Prepare it on a machine '
    f'with network access {needs} with\n  {prepare}\n'
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


def _split_sizes(num_examples: int, validation_fraction: float) -> tuple[int, int]:
  """The sizes of the 'train' and 'validation' splits carved from a stored training split
  of `num_examples`: the last `validation_fraction` (rounded, at least one example when
  positive) is held out.

  Raises:
    ValueError: if the fraction leaves no example to train on.
  """
  held_out = max(1, round(validation_fraction * num_examples)) if validation_fraction else 0
  if held_out >= num_examples:
    raise ValueError(
      f'validation_fraction={validation_fraction} holds out all {num_examples} training '
      'examples: none is left to train on.'
    )
  return num_examples - held_out, held_out


def _info(options: DatasetOptions) -> DatasetInfo:
  spec = get_dataset(options.dataset)
  if spec.arrays is None:
    builder = _tfds_builder(options.dataset, options.data_dir)
    num_stored = builder.info.splits[spec.tfds_splits['train']].num_examples
    num_test = builder.info.splits[spec.tfds_splits['test']].num_examples
    num_classes = builder.info.features['label'].num_classes
  else:
    arrays = spec.arrays(options)
    num_stored, num_test = len(arrays['train'][1]), len(arrays['test'][1])
    num_classes = spec.num_classes(options)
  num_train, num_validation = _split_sizes(num_stored, options.validation_fraction)
  return DatasetInfo(
    num_train=num_train,
    num_test=num_test,
    num_classes=num_classes,
    image_shape=spec.image_shape(options),
    num_validation=num_validation,
  )


def dataset_info(options: DatasetOptions) -> DatasetInfo:
  """Returns the sizes and shapes of `options.dataset`.

  Raises:
    ValueError: for an unknown dataset.
    FileNotFoundError: if a TFDS dataset has not been prepared in `options.data_dir`.
  """
  return _info(options)


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


def steps_per_eval(
  info: DatasetInfo, global_batch_size: int, steps: int | None = -1, split: str = 'test'
) -> int:
  """`steps` if positive, else enough batches to cover `split` ('test' or 'validation')."""
  if steps is not None and steps > 0:
    return steps
  return math.ceil(info.num_examples(split) / global_batch_size)


# --------------------------------------------------------------------------
# Sources: a whole split, addressable by index, before preprocessing.


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f'Unknown split {split!r}; expected one of {SPLITS}.')


def _process_slice(n: int, index: int, count: int) -> slice:
  """The `index`-th of `count` contiguous near-equal parts of range(n), as TFDS splits."""
  return slice(index * n // count, (index + 1) * n // count)


@dataclasses.dataclass(frozen=True)
class ArraySource(Sequence):
  """Images and labels in memory as a Grain source of {'image', 'label'} records."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> Example:
    return {'image': self.images[index], 'label': self.labels[index]}


def _read(source: Sequence, indices: Sequence[int]) -> list[Example]:
  return [source[int(i)] for i in indices]


def _cache(options: DatasetOptions) -> bool:
  return get_dataset(options.dataset).cache if options.cache is None else options.cache


@functools.cache
def _tfds_split(name: str, data_dir: str | None, split: str, *, cache: bool) -> Sequence:
  """A split of a prepared TFDS dataset, by index: its ArrayRecord data source, or
  (`cache`) its records decoded once into memory."""
  spec = DATASETS[name]
  builder = _tfds_builder(name, data_dir)
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
    raise ValueError(
      f'The {name} splits in {builder.data_dir} are stored as '
      f'{builder.info.file_format.value}, which cannot be read by index. Prepare them as '
      f'ArrayRecord with\n  {_prepare_command(name, root)}'
    )
  decoders = {'image': tfds.decode.SkipDecoding()} if spec.decode_after_crop else None
  source = builder.as_data_source(split=spec.tfds_splits[split], decoders=decoders)
  if not cache:
    return source
  records = _read(source, range(len(source)))
  images = [r['image'] for r in records]
  return ArraySource(
    images=np.array(images, dtype=object) if isinstance(images[0], bytes) else np.stack(images),
    labels=np.asarray([r['label'] for r in records], np.int32),
  )


@dataclasses.dataclass(frozen=True)
class _Slice(Sequence):
  """The records `[start, stop)` of `source`, addressed from 0."""

  source: Sequence
  start: int
  stop: int

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> Example:
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} records.')
    return self.source[self.start + index]


def _source(options: DatasetOptions, split: str) -> Sequence:
  """The whole `split`, as a sequence of {'image', 'label', ...} records; 'train' and
  'validation' are the two parts of the stored training split."""
  spec = get_dataset(options.dataset)
  stored = 'test' if split == 'test' else 'train'
  if spec.arrays is not None:
    source = ArraySource(*spec.arrays(options)[stored])
  else:
    source = _tfds_split(options.dataset, options.data_dir, stored, cache=_cache(options))
  if split == 'test':
    return source
  num_train, num_validation = _split_sizes(len(source), options.validation_fraction)
  if split == 'validation':
    return _Slice(source, num_train, num_train + num_validation)
  return source if not num_validation else _Slice(source, 0, num_train)


# --------------------------------------------------------------------------
# Batching.


def epoch_seed(seed: int, epoch: int) -> int:
  """The Grain seed of an epoch's shuffle and augmentation, from `(seed, epoch)`.

  SeedSequence mixes its entropy well: neighbouring epochs and seeds give unrelated
  seeds (Grain's own per-pass reseeding adds the pass to the seed).
  """
  return int(np.random.SeedSequence([int(seed) % 2**32, epoch]).generate_state(1)[0])


def _train_dataset(
  source: Sequence,
  train_fn: TrainFn,
  *,
  seed: int,
  global_batch_size: int,
  num_batches: int,
) -> grain.MapDataset:
  """This process's rows of the epoch's `num_batches` global batches."""
  process, processes = jax.process_index(), jax.process_count()
  ds = grain.MapDataset.source(source)
  # A new permutation for every pass over the split (shuffle before repeat).
  passes = math.ceil(num_batches * global_batch_size / len(source))
  ds = ds.shuffle(seed=seed).repeat(passes)[: num_batches * global_batch_size]
  # Keyed by the seed and the position in the epoch, not by the process that reads it.
  ds = ds.random_map(train_fn, seed=seed)
  # Grain slices by process element-wise (ds[process::processes]); rows one process
  # apart would put other examples on each device than a single process does. Sliced
  # in blocks of a process's rows instead, global batch n is the blocks
  # n * processes, ..., (n + 1) * processes - 1, process 0's first; and since a
  # MapDataset reads only the elements asked for, each process reads only its rows.
  return ds.batch(global_batch_size // processes)[process::processes]


def _eval_dataset(
  source: Sequence, eval_fn: EvalFn, *, local_batch_size: int, num_batches: int
) -> grain.MapDataset:
  """This process's slice of `source` in `num_batches` batches, each example with
  'mask' 1, then padding with 0."""
  local = _process_slice(len(source), jax.process_index(), jax.process_count())
  ds = grain.MapDataset.source(source)[local]
  ds = ds.map(lambda example: {**eval_fn(example), 'mask': np.float32(1.0)})
  # All-zero examples with mask 0 fill the last batch (and any batch past the end
  # of this process's slice), so every test example is counted exactly once and
  # every process runs the same number of steps.
  padding = jax.tree.map(np.zeros_like, {**eval_fn(source[0]), 'mask': np.float32(0.0)})
  num_padding = max(num_batches * local_batch_size - len(ds), 0)
  if num_padding:
    padded = grain.MapDataset.source([padding]).repeat(num_padding)
    ds = grain.MapDataset.concatenate([ds, padded])
  return ds.batch(local_batch_size)[:num_batches]


def _iterate(
  ds: grain.MapDataset, num_local_devices: int, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
  """The batches of `ds` from its `start`-th on, read ahead by threads, each array
  [num_local_devices, per_device, ...]."""
  ds = ds.map(
    lambda batch: {k: v.reshape(num_local_devices, -1, *v.shape[1:]) for k, v in batch.items()}
  )
  read_options = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=PREFETCH_BATCHES)
  iterator = iter(ds.to_iter_dataset(read_options))
  # The iterator's state is the index of its next batch: setting it resumes inside
  # the epoch without reading the batches before.
  iterator.set_state({'next_index': start})
  return iterator


def create_input_iter(
  options: DatasetOptions,
  split: str,
  *,
  global_batch_size: int,
  epoch: int = 0,
  num_steps: int | None = -1,
  num_local_devices: int | None = None,
  evaluation: bool | None = None,
  start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
  """Returns an iterator over one epoch of this process's batches of `split`.

  Args:
    options: the dataset and how to read it.
    split: 'train', 'validation' (with `options.validation_fraction`) or 'test'.
    global_batch_size: examples per step over all processes and devices.
    epoch: the epoch number; the train order and augmentation depend only on it
      and `options.seed`. Ignored for evaluation.
    num_steps: the batches to yield: for training the epoch's steps (a permutation
      of the split for each pass they need), for evaluation on 'test' or
      'validation' the first `num_steps` batches; -1 or None: one pass over the
      split. Evaluation on 'train' always covers the split once.
    num_local_devices: leading dimension of the batches; defaults to
      `jax.local_device_count()`.
    evaluation: batches for evaluation: no augmentation, a 'mask', the whole split
      once ('test' and 'validation': `steps_per_eval` batches). Default: for all but
      'train'.
    start_step: the first training batch of the epoch to yield (to resume inside it).

  Returns:
    An iterator of numpy dicts with 'image' float32 [num_local_devices,
    per_device, H, W, C] and 'label' int32 [num_local_devices, per_device];
    evaluation batches also have 'mask' float32 [num_local_devices, per_device],
    0 on the padding after the last example. Training yields
    `steps_per_epoch(info, global_batch_size, num_steps)` batches, evaluation on
    'test' or 'validation' `steps_per_eval(info, global_batch_size, num_steps, split)`.

  Raises:
    ValueError: for an unknown dataset or split, 'validation' without a
      `validation_fraction`, a batch size that the devices do not divide, or a TFDS
      dataset not stored as ArrayRecord.
    FileNotFoundError: if a TFDS dataset has not been prepared in `data_dir`;
      the message says how to prepare it.
  """
  spec = get_dataset(options.dataset)
  _check_split(split)
  if split == 'validation' and not options.validation_fraction:
    raise ValueError(
      "split='validation' is held out of the training split by a validation_fraction, "
      f'got validation_fraction={options.validation_fraction}.'
    )
  if num_local_devices is None:
    num_local_devices = jax.local_device_count()
  num_devices = jax.process_count() * num_local_devices
  if global_batch_size <= 0 or global_batch_size % num_devices:
    raise ValueError(
      f'batch_size={global_batch_size} must be a positive multiple of the device count '
      f'{num_devices} ({jax.process_count()} processes x {num_local_devices} local devices).'
    )
  info = _info(options)
  if evaluation is None:
    evaluation = split != 'train'
  train_fn, eval_fn = spec.preprocess(options)
  if not evaluation:
    if split != 'train':
      raise ValueError(f'Only the train split is trained on, got split={split!r}.')
    ds = _train_dataset(
      _source(options, 'train'),
      train_fn,
      seed=epoch_seed(options.seed, epoch),
      global_batch_size=global_batch_size,
      num_batches=steps_per_epoch(info, global_batch_size, num_steps),
    )
    return _iterate(ds, num_local_devices, start_step)

  if split != 'train':
    num_batches = steps_per_eval(info, global_batch_size, num_steps, split)
  else:
    num_batches = math.ceil(info.num_train / global_batch_size)
  ds = _eval_dataset(
    _source(options, split),
    eval_fn,
    local_batch_size=global_batch_size // jax.process_count(),
    num_batches=num_batches,
  )
  return _iterate(ds, num_local_devices)
