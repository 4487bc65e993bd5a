"""Tests for examples/input_pipeline.py.

The TFDS pipelines run on `tfds.testing.mock_data` (see `tests.helpers.mock_tfds`),
which needs no network and, like the pipeline, no TensorFlow.
"""

import dataclasses
import functools
import io
import os
import time

import jax
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from examples import input_pipeline, tasks
from examples.configs import default
from tests.helpers import digest, mock_tfds

NUM_MOCK_EXAMPLES = 10
Options = input_pipeline.DatasetOptions


def _epoch(options, split='train', *, epoch=0, global_batch_size=4, num_local_devices=1, **kw):
  return list(
    input_pipeline.create_input_iter(
      options,
      split,
      epoch=epoch,
      global_batch_size=global_batch_size,
      num_local_devices=num_local_devices,
      **kw,
    )
  )


def _stack(batches, key):
  """All examples of `batches` in order, devices flattened."""
  return np.concatenate([b[key].reshape(-1, *b[key].shape[2:]) for b in batches])


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def _check_test_batches(batches, *, num_batches, num_local_devices, per_device, image_shape):
  assert len(batches) == num_batches
  for batch in batches:
    assert batch.keys() == {'image', 'label', 'mask'}
    assert batch['image'].shape == (num_local_devices, per_device, *image_shape)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (num_local_devices, per_device)
    assert batch['label'].dtype == np.int32
    assert batch['mask'].shape == (num_local_devices, per_device)
    assert batch['mask'].dtype == np.float32
  mask = _stack(batches, 'mask')
  # Real examples first, then padding: every test example counted exactly once.
  num_real = int(mask.sum())
  np.testing.assert_array_equal(mask, np.arange(len(mask)) < num_real)
  np.testing.assert_array_equal(_stack(batches, 'image')[num_real:], 0.0)
  return num_real


def test_no_tensorflow_is_imported():
  import subprocess
  import sys

  code = (
    'import sys; from examples import input_pipeline, text_pipeline, train, main; '
    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))"
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


def _mocked_epochs(options, num_classes: int):
  """The mocked `options.dataset` read in batches of 4 over 2 devices, after its info
  and the shapes every split shares are checked: the train split's epoch 0 (read twice,
  alike) and epoch 1, and the test split's real examples (read twice, alike)."""
  with mock_tfds(options.data_dir, options.dataset, NUM_MOCK_EXAMPLES):
    info = input_pipeline.dataset_info(options)
    assert info == input_pipeline.DatasetInfo(
      num_train=NUM_MOCK_EXAMPLES,
      num_test=NUM_MOCK_EXAMPLES,
      num_classes=num_classes,
      image_shape=(32, 32, 3),
    )
    read = functools.partial(_epoch, options, global_batch_size=4, num_local_devices=2)
    train, train_again, other_epoch = read(), read(), read(epoch=1)
    test, test_again = read('test'), read('test')

  # 10 // 4 full batches, split over 2 devices.
  assert len(train) == 2
  for batch in train:
    assert batch.keys() == {'image', 'label'}
    assert batch['image'].shape == (2, 2, 32, 32, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (2, 2)
    assert batch['label'].dtype == np.int32
  _assert_same(train, train_again)
  _assert_same(test, test_again)
  num_real = _check_test_batches(
    test, num_batches=3, num_local_devices=2, per_device=2, image_shape=(32, 32, 3)
  )
  assert num_real == NUM_MOCK_EXAMPLES
  return train, other_epoch, {key: _stack(test, key)[:num_real] for key in ('image', 'label')}


@pytest.mark.parametrize('cache', [True, False])
def test_cifar10(tmp_path, cache):
  options = Options('cifar10', data_dir=str(tmp_path), cache=cache)
  train, other_epoch, test = _mocked_epochs(options, num_classes=10)
  # Pixels in [0, 1] minus a mean in [0, 1].
  assert np.abs(_stack(train, 'image')).max() <= 1.0
  assert not np.array_equal(_stack(train, 'image'), _stack(other_epoch, 'image'))
  # The mock serves the same examples as train and test split, so the test
  # images minus the training mean image average to zero at every pixel.
  np.testing.assert_allclose(test['image'].mean(axis=0), 0.0, atol=1e-5)
  # Augmentation shifts and flips but never leaves the image's value range.
  assert np.abs(_stack(train, 'image')).max() <= np.abs(test['image']).max() + 1e-6


def test_cifar10_augmentation_is_a_nearest_fill_shift_and_flip():
  """Every augmented image is one of the 7 x 7 shifts, flipped or not, drawn uniformly."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
  example = {'image': image, 'label': np.int32(0)}
  augment = functools.partial(
    input_pipeline._cifar10_train, pixel_mean=np.zeros((32, 32, 3), np.float32)
  )
  x = image / np.float32(255)
  candidates = {}
  for dy in range(-3, 4):
    for dx in range(-3, 4):
      # Keras' 'nearest' fill: the source coordinate clipped to the image.
      shifted = x[np.clip(np.arange(32) - dy, 0, 31)][:, np.clip(np.arange(32) - dx, 0, 31)]
      candidates.setdefault(shifted.tobytes(), []).append((dy, dx, False))
      candidates.setdefault(np.ascontiguousarray(shifted[:, ::-1]).tobytes(), []).append(
        (dy, dx, True)
      )
  # 98 different images: no shift and flip looks like another.
  assert len(candidates) == 98
  seen = []
  for i in range(400):
    out = augment(example, np.random.default_rng(i))['image']
    # The generator alone decides the augmentation.
    np.testing.assert_array_equal(out, augment(example, np.random.default_rng(i))['image'])
    (match,) = candidates[out.tobytes()]
    seen.append(match)
  dys, dxs, flips = (np.array(v) for v in zip(*seen, strict=True))
  # Shifts uniform over -3..3 in both directions (each expected 400 / 7 = 57 times),
  # flips at rate 1/2 (binomial sd 10).
  for shifts in (dys, dxs):
    counts = np.bincount(shifts + 3, minlength=7)
    assert counts.min() > 30 and counts.max() < 90, counts
  assert 160 < flips.sum() < 240


def _jpeg(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, format='JPEG', quality=95)
  return out.getvalue()


def test_inception_crop_boxes_follow_the_area_and_aspect_ratio_ranges():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(2000):
    top, left, height, width = input_pipeline.random_crop_box(300, 400, rng)
    assert top >= 0 and top + height <= 300 and left >= 0 and left + width <= 400
    areas.append(height * width / (300 * 400))
    ratios.append(width / height)
  areas, ratios = np.array(areas), np.array(ratios)
  # The area is uniform in [0.08, 1] of the image, less the crops under 10% (the
  # `min_object_covered`) and those that do not fit; the aspect ratio in [3/4, 4/3]
  # up to the rounding of the sides.
  assert areas.min() >= 0.1 and areas.max() <= 1.0
  assert areas.min() < 0.12 and areas.max() > 0.9
  assert ratios.min() > 0.74 and ratios.max() < 1.345
  assert ratios.min() < 0.77 and ratios.max() > 1.3
  # No crop of a 1 x 100 strip has an aspect ratio in range: the caller falls back.
  assert input_pipeline.random_crop_box(1, 100, rng) is None
  # The evaluation crop: the centred square of image_size / (image_size + 32) of the
  # shorter side.
  assert input_pipeline.center_crop_box(100, 200, 32) == (25, 75, 50, 50)
  assert input_pipeline.center_crop_box(101, 60, 224) == (25, 4, 52, 52)


def test_imagenet_preprocessing_on_fixed_images():
  # A uniform image of the ImageNet mean colour normalizes to zero, one of mean + std
  # to one, whatever the crop and flip.
  mean = np.array(input_pipeline.MEAN_RGB)
  std = np.array(input_pipeline.STDDEV_RGB)
  for colour, expected in ((mean, 0.0), (mean + std, 1.0)):
    pixels = np.broadcast_to(np.round(colour).astype(np.uint8), (60, 90, 3)).copy()
    example = {'image': _jpeg(pixels), 'label': 3}
    for i in range(5):
      out = input_pipeline._imagenet_train(example, np.random.default_rng(i), image_size=16)
      assert out['image'].shape == (16, 16, 3) and out['image'].dtype == np.float32
      np.testing.assert_allclose(out['image'], expected, atol=0.03)
      assert out['label'] == 3 and out['label'].dtype == np.int32
    out = input_pipeline._imagenet_eval(example, image_size=16)
    np.testing.assert_allclose(out['image'], expected, atol=0.03)
  # The evaluation crop of a left-to-right ramp is its centre; train crops flip half
  # of the time, which reverses the ramp.
  ramp = np.broadcast_to(np.linspace(0, 255, 128).astype(np.uint8)[None, :, None], (64, 128, 3))
  example = {'image': _jpeg(ramp.copy()), 'label': 0}
  center = input_pipeline._imagenet_eval(example, image_size=8)['image'][..., 0] * std[0] + mean[0]
  # int(64 * 8 / 40) = 12 columns of 128 around the middle, 58 to 69: values from
  # about 116 to 139, resized to 8.
  assert 112 < center[:, 0].mean() < 124 and 131 < center[:, -1].mean() < 143
  rising = []
  for i in range(200):
    out = input_pipeline._imagenet_train(example, np.random.default_rng(i), image_size=8)
    rising.append(out['image'][:, -1, 0].mean() > out['image'][:, 0, 0].mean())
  assert 70 < sum(rising) < 130


def test_imagenet2012(tmp_path):
  options = Options('imagenet2012', data_dir=str(tmp_path), image_size=32)
  # The mock's JPEGs are 5 to 50 pixels a side, so crops are both up- and down-sampled.
  train, other_epoch, test = _mocked_epochs(options, num_classes=1000)
  assert np.all(np.isfinite(_stack(train, 'image')))
  assert not np.array_equal(_stack(train, 'label'), _stack(other_epoch, 'label'))
  np.testing.assert_array_equal(test['label'], np.arange(NUM_MOCK_EXAMPLES))
  # Normalized with the ImageNet statistics: roughly centred, unit scale.
  assert -2.2 < test['image'].mean() < 2.7
  assert np.abs(test['image']).max() < 4.0


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])
def test_unprepared_dataset_fails_fast(tmp_path, name):
  options = Options(name, data_dir=str(tmp_path))
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info_error:
    input_pipeline.dataset_info(options)
  with pytest.raises(FileNotFoundError) as iter_error:
    input_pipeline.create_input_iter(options, 'train', global_batch_size=4, num_local_devices=1)
  assert time.monotonic() - start < 10.0
  for error in (info_error, iter_error):
    message = str(error.value)
    assert f'tfds build {name} --file_format=array_record --data_dir={tmp_path}' in message
    assert '[prepare]' in message
    if name == 'imagenet2012':
      assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
      assert 'ILSVRC2012_img_train.tar' in message
  # Nothing was downloaded or prepared.
  assert not any(tmp_path.rglob('*.array_record*'))


def test_digits():
  options = Options('digits')
  info = input_pipeline.dataset_info(options)
  assert info == input_pipeline.DatasetInfo(
    num_train=1437, num_test=360, num_classes=10, image_shape=(8, 8, 1)
  )
  train = _epoch(options, global_batch_size=32, num_local_devices=2)
  assert len(train) == 1437 // 32
  for batch in train:
    assert batch['image'].shape == (2, 16, 8, 8, 1)
    assert batch['image'].dtype == np.float32
    assert batch['label'].dtype == np.int32
  images = _stack(train, 'image')
  assert images.min() >= 0.0
  assert images.max() <= 1.0
  assert images.max() == 1.0  # 16 / 16: the data really is scaled, not clipped.

  # By default the batch is split over all local devices.
  num_devices = jax.local_device_count()
  batch = next(
    input_pipeline.create_input_iter(options, 'train', global_batch_size=4 * num_devices)
  )
  assert batch['image'].shape == (num_devices, 4, 8, 8, 1)

  test = _epoch(options, 'test', global_batch_size=32, num_local_devices=2)
  num_real = _check_test_batches(
    test, num_batches=12, num_local_devices=2, per_device=16, image_shape=(8, 8, 1)
  )
  assert num_real == 360
  # A stratified split: every digit is in the test set about 36 times.
  counts = np.bincount(_stack(test, 'label')[:num_real], minlength=10)
  assert counts.min() >= 35
  assert counts.max() <= 37


SYNTHETIC = Options(
  'synthetic',
  image_size=8,
  num_channels=3,
  num_classes=4,
  synthetic_train_size=64,
  synthetic_test_size=20,
)


def test_synthetic_is_deterministic():
  options = SYNTHETIC
  info = input_pipeline.dataset_info(options)
  assert info == input_pipeline.DatasetInfo(
    num_train=64, num_test=20, num_classes=4, image_shape=(8, 8, 3)
  )
  epoch0 = _epoch(options, global_batch_size=16)
  _assert_same(epoch0, _epoch(options, global_batch_size=16))
  epoch1 = _epoch(options, epoch=1, global_batch_size=16)
  assert len(epoch0) == 4
  assert epoch0[0]['image'].shape == (1, 16, 8, 8, 3)

  # 64 examples in batches of 16: each epoch is a permutation of the whole
  # train split, a different one every epoch.
  images0 = _stack(epoch0, 'image').reshape(64, -1)
  images1 = _stack(epoch1, 'image').reshape(64, -1)
  assert len(np.unique(images0, axis=0)) == 64
  assert not np.array_equal(images0, images1)
  np.testing.assert_array_equal(np.unique(images0, axis=0), np.unique(images1, axis=0))
  # Labels are a function of the image: the same image keeps its label.
  labels = dict(zip(map(bytes, images0), _stack(epoch0, 'label'), strict=True))
  for image, label in zip(map(bytes, images1), _stack(epoch1, 'label'), strict=True):
    assert labels[image] == label
  assert len(set(labels.values())) == 4

  # Another seed reorders, but the data stay the same.
  other_seed = _epoch(dataclasses.replace(options, seed=1), global_batch_size=16)
  np.testing.assert_array_equal(
    np.unique(_stack(other_seed, 'image').reshape(64, -1), axis=0), np.unique(images0, axis=0)
  )

  test = _epoch(options, 'test', global_batch_size=16)
  assert (
    _check_test_batches(
      test, num_batches=2, num_local_devices=1, per_device=16, image_shape=(8, 8, 3)
    )
    == 20
  )
  _assert_same(test, _epoch(options, 'test', global_batch_size=16))


def test_steps_per_epoch_beyond_one_pass():
  options = dataclasses.replace(SYNTHETIC, image_size=4, synthetic_test_size=8)
  batches = _epoch(options, global_batch_size=16, num_steps=6)
  assert len(batches) == 6
  images = _stack(batches, 'image').reshape(96, -1)
  # One full pass, then a second pass in another order.
  assert len(np.unique(images[:64], axis=0)) == 64
  assert len(np.unique(images, axis=0)) == 64
  assert not np.array_equal(images[:32], images[64:])
  assert len(_epoch(options, 'test', global_batch_size=16, num_steps=5)) == 5


def test_steps():
  info = input_pipeline.DatasetInfo(
    num_train=100, num_test=30, num_classes=10, image_shape=(4,) * 3
  )
  assert input_pipeline.steps_per_epoch(info, 16) == 6
  assert input_pipeline.steps_per_eval(info, 16) == 2
  for unset in (-1, 0, None):
    assert input_pipeline.steps_per_epoch(info, 16, unset) == 6
    assert input_pipeline.steps_per_eval(info, 16, unset) == 2
  assert input_pipeline.steps_per_epoch(info, 16, 3) == 3
  assert input_pipeline.steps_per_eval(info, 16, 1) == 1
  with pytest.raises(ValueError, match='batch_size=128 exceeds the 100 training examples'):
    input_pipeline.steps_per_epoch(info, 128)


def test_evaluation_covers_each_split_once_over_processes(monkeypatch):
  """Each process reads its own part of the split, with its share of the batch."""
  options = Options('digits')
  everything = {}
  for split, evaluation, size in (('test', None, 360), ('train', True, 1437)):
    everything[split] = _stack(
      _epoch(options, split, global_batch_size=40, evaluation=evaluation), 'image'
    )[:size]
  for processes in (2, 3):
    monkeypatch.setattr(jax, 'process_count', lambda processes=processes: processes)
    for split, evaluation, size in (('test', None, 360), ('train', True, 1437)):
      parts = []
      for index in range(processes):
        monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
        batches = _epoch(
          options, split, global_batch_size=24, num_local_devices=2, evaluation=evaluation
        )
        # The global batch of 24 is 24 / processes per process, and every process
        # runs the same ceil(size / 24) steps.
        assert len(batches) == -(-size // 24)
        assert batches[0]['image'].shape == (2, 12 // processes, 8, 8, 1)
        mask = _stack(batches, 'mask')
        parts.append(_stack(batches, 'image')[mask == 1])
      assert sum(len(p) for p in parts) == size
      np.testing.assert_array_equal(np.concatenate(parts), everything[split])


def test_batch_size_must_divide_devices():
  with pytest.raises(ValueError, match=r'batch_size=6 .*device count 4'):
    input_pipeline.create_input_iter(
      Options('digits'), 'train', global_batch_size=6, num_local_devices=4
    )


def test_unknown_dataset_and_split():
  with pytest.raises(ValueError, match='cifar10, imagenet2012, digits, synthetic'):
    input_pipeline.dataset_info(Options('mnist'))
  with pytest.raises(ValueError, match='cifar10, imagenet2012, digits, synthetic'):
    input_pipeline.create_input_iter(Options('mnist'), 'train', global_batch_size=4)
  with pytest.raises(ValueError, match='validation'):
    input_pipeline.create_input_iter(
      Options('digits'), 'validation', global_batch_size=4, num_local_devices=1
    )


def _process_batches(options, *, processes, devices_per_process, epoch=0, start_step=0):
  """Every process's train batches, each batch's rows in device order."""
  per_process = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, 'process_count', lambda: processes)
    for index in range(processes):
      patch.setattr(jax, 'process_index', lambda index=index: index)
      per_process.append(
        _epoch(
          options,
          epoch=epoch,
          global_batch_size=8,
          num_local_devices=devices_per_process,
          start_step=start_step,
          num_steps=3,
        )
      )
  return [
    {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    for batches in zip(*per_process, strict=True)
  ]


def test_the_global_batches_do_not_depend_on_the_process_count(tmp_path):
  # CIFAR-10's augmentation included: each example's shift and flip are keyed by its
  # position in the epoch, not by the process that reads it.
  options = Options('cifar10', data_dir=str(tmp_path))
  with mock_tfds(str(tmp_path), 'cifar10', NUM_MOCK_EXAMPLES):
    one = _process_batches(options, processes=1, devices_per_process=8)
    two = _process_batches(options, processes=2, devices_per_process=4)
    eight = _process_batches(options, processes=8, devices_per_process=1)
    next_epoch = _process_batches(options, processes=1, devices_per_process=8, epoch=1)
    resumed = {
      step: _process_batches(options, processes=2, devices_per_process=4, start_step=step)
      for step in (1, 2, 3)
    }
  assert len(one) == 3 and one[0]['image'].shape == (8, 1, 32, 32, 3)
  _assert_same(one, two)
  _assert_same(one, eight)
  # Resuming at any step of the epoch yields the rest of the same batches.
  for step, rest in resumed.items():
    _assert_same(one[step:], rest)
  assert not np.array_equal(_stack(one, 'image'), _stack(next_epoch, 'image'))


def test_a_process_reads_only_its_rows(monkeypatch):
  read = []

  class Recording(input_pipeline.ArraySource):
    def __getitem__(self, index):
      read.append(index)
      return super().__getitem__(index)

  images, labels = input_pipeline._digits_arrays()['train']
  monkeypatch.setattr(
    input_pipeline, '_source', lambda options, split: Recording(images[:64], labels[:64])
  )
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  batches = _epoch(Options('digits'), global_batch_size=16, num_local_devices=1, num_steps=4)
  assert len(batches) == 4 and batches[0]['image'].shape == (1, 4, 8, 8, 1)
  # 4 batches of this process's 4 rows of 16, each read once (by threads, in any order).
  assert len(read) == 16 and len(set(read)) == 16
  np.testing.assert_array_equal(
    np.sort(_stack(batches, 'image').reshape(16, -1), axis=0),
    np.sort(images[:64][read].reshape(16, -1), axis=0),
  )


def test_an_epoch_is_a_permutation_of_the_split_by_seed_and_epoch(monkeypatch):
  rows = np.arange(10, dtype=np.int32)
  arrays = {'train': (np.zeros((10, 1, 1, 1), np.uint8), rows), 'test': (None, rows)}
  spec = dataclasses.replace(input_pipeline.DATASETS['digits'], arrays=lambda options: arrays)
  monkeypatch.setitem(input_pipeline.DATASETS, 'rows', spec)

  def order(seed, epoch):
    batches = _epoch(Options('rows', seed=seed), epoch=epoch, global_batch_size=5, num_steps=5)
    return _stack(batches, 'label')

  first = order(0, 0)
  # Two whole passes in two different orders, then the start of a third.
  for start in (0, 10):
    np.testing.assert_array_equal(np.sort(first[start : start + 10]), rows)
  assert not np.array_equal(first[:10], first[10:20])
  assert len(set(first[20:])) == 5
  np.testing.assert_array_equal(first, order(0, 0))
  assert not np.array_equal(first, order(0, 1))
  assert not np.array_equal(first, order(1, 0))


def test_a_split_not_stored_as_array_record_is_refused(tmp_path):
  import tensorflow_datasets as tfds

  builder = tfds.builder('cifar10', data_dir=str(tmp_path))
  builder.info.set_splits(
    tfds.core.SplitDict(
      [tfds.core.SplitInfo(name=s, shard_lengths=[4], num_bytes=0) for s in ('train', 'test')]
    )
  )
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  with pytest.raises(ValueError, match='--file_format=array_record'):
    _epoch(Options('cifar10', data_dir=str(tmp_path)))


# The digests of these batches as the Grain pipeline produces them: any change to a
# batch, bit for bit, changes a digest.
PINNED_BATCHES = {
  'digits_train': 'eb499d5335b8ae8a',
  'digits_train_resumed': 'a18fae4c8f07b1d4',
  'digits_test': 'e67f27e91e9bcb09',
  'digits_train_evaluation': '7294386c54b50b6b',
  'synthetic_train': '5227fca15f7d7208',
  'synthetic_test': '6d6b717b6db5b807',
  'cifar10_train': '28a285e8d3d77bbc',
  'cifar10_test': 'b9ff9722fdc688b7',
}


def test_batches_are_pinned(tmp_path):
  digits = functools.partial(
    input_pipeline.create_input_iter,
    Options('digits', seed=3),
    global_batch_size=64,
    num_local_devices=2,
  )
  synthetic = functools.partial(
    input_pipeline.create_input_iter,
    dataclasses.replace(SYNTHETIC, seed=5, image_size=6, num_classes=4),
    global_batch_size=16,
    num_local_devices=1,
  )
  cifar10 = functools.partial(
    input_pipeline.create_input_iter,
    Options('cifar10', data_dir=str(tmp_path), seed=7),
    global_batch_size=4,
    num_local_devices=2,
  )
  digests = {
    'digits_train': digest(digits('train', epoch=1)),
    'digits_train_resumed': digest(digits('train', epoch=1, start_step=20)),
    'digits_test': digest(digits('test')),
    'digits_train_evaluation': digest(digits('train', evaluation=True, num_local_devices=1)),
    'synthetic_train': digest(synthetic('train', epoch=2, num_steps=6)),
    'synthetic_test': digest(synthetic('test', num_steps=1)),
  }
  with mock_tfds(str(tmp_path), 'cifar10', NUM_MOCK_EXAMPLES):
    digests['cifar10_train'] = digest(cifar10('train', epoch=1))
    digests['cifar10_test'] = digest(cifar10('test'))
  assert digests == PINNED_BATCHES


def test_the_pipeline_options_are_set_from_the_command_line_on_a_locked_config():
  argv = [
    'main',
    '--config.dataset=synthetic',
    '--config.cache=false',
    '--config.data_dir=/data',
    '--config.num_channels=3',
    '--config.synthetic_train_size=64',
    '--config.synthetic_test_size=8',
  ]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_dict(
    'config', default.get_config(), flag_values=flag_values, sys_argv=argv
  )
  flag_values(argv)
  config = flag_values.config
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.no_such_field = 1
  options = tasks.create_task(config).data_options()
  assert options == Options(
    dataset='synthetic',
    data_dir='/data',
    image_size=8,
    num_channels=3,
    num_classes=10,
    synthetic_train_size=64,
    synthetic_test_size=8,
    seed=0,
    cache=False,
  )
  info = input_pipeline.dataset_info(options)
  assert info == input_pipeline.DatasetInfo(
    num_train=64, num_test=8, num_classes=10, image_shape=(8, 8, 3)
  )
  # Unset, the cache is the dataset's default.
  assert tasks.create_task(default.get_config()).data_options().cache is None


def test_a_dataset_is_one_entry_in_the_registry(monkeypatch):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(30, 2, 2, 1), dtype=np.uint8)
  labels = np.arange(30, dtype=np.int32) % 3
  arrays = {'train': (images[:20], labels[:20]), 'test': (images[20:], labels[20:])}
  spec = input_pipeline.DatasetSpec(
    image_shape=lambda options: (2, 2, 1),
    preprocess=lambda options: (input_pipeline._to_float, input_pipeline._to_float),
    arrays=lambda options: arrays,
    num_classes=lambda options: 3,
  )
  monkeypatch.setitem(input_pipeline.DATASETS, 'tiny', spec)
  assert input_pipeline.dataset_info(Options('tiny')) == input_pipeline.DatasetInfo(
    num_train=20, num_test=10, num_classes=3, image_shape=(2, 2, 1)
  )
  train = _epoch(Options('tiny'), global_batch_size=5)
  assert len(train) == 4
  # One permutation of the training split, scaled to [0, 1].
  np.testing.assert_array_equal(
    np.sort(_stack(train, 'image').reshape(-1)),
    np.sort(images[:20].reshape(-1).astype(np.float32) / np.float32(255)),
  )
  test = _epoch(Options('tiny'), 'test', global_batch_size=4)
  assert (
    _check_test_batches(
      test, num_batches=3, num_local_devices=1, per_device=4, image_shape=(2, 2, 1)
    )
    == 10
  )
  np.testing.assert_array_equal(_stack(test, 'label')[:10], labels[20:])


def test_a_spec_reads_from_tfds_or_from_arrays():
  shape = {'image_shape': lambda options: (2, 2, 1), 'preprocess': lambda options: None}
  with pytest.raises(ValueError, match='exactly one of tfds_splits and arrays'):
    input_pipeline.DatasetSpec(**shape)
  with pytest.raises(ValueError, match='exactly one of tfds_splits and arrays'):
    input_pipeline.DatasetSpec(
      **shape, tfds_splits={'train': 'train', 'test': 'test'}, arrays=lambda options: {}
    )
  with pytest.raises(ValueError, match='needs num_classes'):
    input_pipeline.DatasetSpec(**shape, arrays=lambda options: {})


def _real(batches):
  """The unpadded examples of evaluation batches, in order."""
  num_real = int(_stack(batches, 'mask').sum())
  return {key: _stack(batches, key)[:num_real] for key in ('image', 'label')}


def test_the_validation_split_is_the_last_part_of_the_training_split():
  held_out = dataclasses.replace(SYNTHETIC, validation_fraction=0.25)
  info = input_pipeline.dataset_info(held_out)
  assert (info.num_train, info.num_validation, info.num_test) == (48, 16, 20)
  stored = _real(_epoch(SYNTHETIC, 'train', global_batch_size=16, evaluation=True))
  fit = _real(_epoch(held_out, 'train', global_batch_size=16, evaluation=True))
  validation = _real(_epoch(held_out, 'validation', global_batch_size=16))
  for key in ('image', 'label'):
    np.testing.assert_array_equal(fit[key], stored[key][:48])
    np.testing.assert_array_equal(validation[key], stored[key][48:])
  # Training reads the 48 examples of its part only, every one of them.
  trained = np.unique(
    _stack(_epoch(held_out, global_batch_size=16), 'image').reshape(48, -1), axis=0
  )
  np.testing.assert_array_equal(trained, np.unique(fit['image'].reshape(48, -1), axis=0))
  # The test split is untouched; the validation split is read as the test split is.
  _assert_same(
    _epoch(held_out, 'test', global_batch_size=16), _epoch(SYNTHETIC, 'test', global_batch_size=16)
  )
  assert len(_epoch(held_out, 'validation', global_batch_size=16, num_steps=3)) == 3


@pytest.mark.parametrize('cache', [True, False])
def test_a_tfds_validation_split_is_sliced_from_the_stored_training_split(tmp_path, cache):
  options = Options('cifar10', data_dir=str(tmp_path), cache=cache)
  held_out = dataclasses.replace(options, validation_fraction=0.2)
  with mock_tfds(options.data_dir, options.dataset, NUM_MOCK_EXAMPLES):
    read = functools.partial(_epoch, global_batch_size=4, num_local_devices=2)
    stored = _real(read(options, 'train', evaluation=True))
    fit = _real(read(held_out, 'train', evaluation=True))
    validation = _real(read(held_out, 'validation'))
  assert len(fit['label']) == 8 and len(validation['label']) == 2
  np.testing.assert_array_equal(
    np.concatenate([fit['label'], validation['label']]), stored['label']
  )
  # The pixel mean is that of the part trained on, so the images differ by a constant.
  shift = np.concatenate([fit['image'], validation['image']]) - stored['image']
  np.testing.assert_allclose(shift, shift[:1].repeat(len(shift), axis=0), atol=1e-6)


def test_bad_validation_fractions_are_refused_naming_the_field():
  with pytest.raises(ValueError, match=r'validation_fraction must be in \[0, 1\).*1\.0'):
    dataclasses.replace(SYNTHETIC, validation_fraction=1.0)
  with pytest.raises(ValueError, match='validation_fraction must be in'):
    dataclasses.replace(SYNTHETIC, validation_fraction=-0.1)
  with pytest.raises(ValueError, match=r"split='validation'.*validation_fraction=0\.0"):
    _epoch(SYNTHETIC, 'validation')
  with pytest.raises(ValueError, match='holds out all 64 training examples'):
    input_pipeline.dataset_info(dataclasses.replace(SYNTHETIC, validation_fraction=0.999))
