"""Tests for examples/input_pipeline.py.

The TFDS pipelines run on `tfds.testing.mock_data`, which needs no network. Its
`MockPolicy.USE_CODE` leaves the builder unprepared and its split sizes unknown,
so the pipeline would rightly refuse it. Instead each test writes the real
metadata (`dataset_info.json`, `features.json`) of a tiny dataset into a
temporary `data_dir` and mocks with `MockPolicy.USE_FILES`: the builder is then
prepared, knows its split sizes, and `as_dataset` yields `NUM_MOCK_EXAMPLES`
random examples for every split (the same ones for train and test, and the
whole split for every process slice).
"""

import contextlib
import functools
import inspect
import os
import time

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from examples import input_pipeline, train
from examples.configs import default
from tests.helpers import digest

NUM_MOCK_EXAMPLES = 10


def _config(dataset: str, **overrides) -> dict:
  """Keyword arguments of `create_input_iter`: `dataset` and `overrides`."""
  return {'dataset': dataset, **overrides}


def _info(config: dict) -> input_pipeline.DatasetInfo:
  """`dataset_info` for the `create_input_iter` arguments `config`."""
  fields = {k: v for k, v in config.items() if k not in ('seed', 'cache', 'num_steps')}
  return input_pipeline.dataset_info(**fields)


@contextlib.contextmanager
def _mock_tfds(data_dir: str, name: str):
  """Mocks `name` as prepared in `data_dir`, NUM_MOCK_EXAMPLES per split."""
  builder = tfds.builder(name, data_dir=data_dir)
  splits = input_pipeline.DATASETS[name].tfds_splits.values()
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(name=split, shard_lengths=[NUM_MOCK_EXAMPLES], num_bytes=0)
        for split in splits
      ]
    )
  )
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(
    num_examples=NUM_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir
  ):
    yield


def _epoch(config, split='train', *, epoch=0, global_batch_size=4, num_local_devices=1):
  return list(
    input_pipeline.create_input_iter(
      split=split,
      epoch=epoch,
      global_batch_size=global_batch_size,
      num_local_devices=num_local_devices,
      **config,
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


def test_cifar10(tmp_path):
  config = _config('cifar10', data_dir=str(tmp_path))
  with _mock_tfds(str(tmp_path), 'cifar10'):
    info = _info(config)
    assert info == input_pipeline.DatasetInfo(
      num_train=NUM_MOCK_EXAMPLES,
      num_test=NUM_MOCK_EXAMPLES,
      num_classes=10,
      image_shape=(32, 32, 3),
    )
    train = _epoch(config, global_batch_size=4, num_local_devices=2)
    train_again = _epoch(config, global_batch_size=4, num_local_devices=2)
    other_epoch = _epoch(config, epoch=1, global_batch_size=4, num_local_devices=2)
    test = _epoch(config, 'test', global_batch_size=4, num_local_devices=2)

  # 10 // 4 full batches, split over 2 devices.
  assert len(train) == 2
  for batch in train:
    assert batch.keys() == {'image', 'label'}
    assert batch['image'].shape == (2, 2, 32, 32, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (2, 2)
    assert batch['label'].dtype == np.int32
    # Pixels in [0, 1] minus a mean in [0, 1].
    assert np.all(np.abs(batch['image']) <= 1.0)
  _assert_same(train, train_again)
  assert not np.array_equal(_stack(train, 'label'), _stack(other_epoch, 'label'))

  num_real = _check_test_batches(
    test, num_batches=3, num_local_devices=2, per_device=2, image_shape=(32, 32, 3)
  )
  assert num_real == NUM_MOCK_EXAMPLES
  # The mock serves the same examples as train and test split, so the test
  # images minus the training mean image average to zero at every pixel.
  test_images = _stack(test, 'image')[:num_real]
  np.testing.assert_allclose(test_images.mean(axis=0), 0.0, atol=1e-5)
  # Augmentation shifts and flips but never leaves the image's value range.
  assert np.abs(_stack(train, 'image')).max() <= np.abs(test_images).max() + 1e-6


def test_cifar10_augmentation_is_a_nearest_fill_shift_and_flip():
  """Every augmented image is one of the 7 x 7 shifts, flipped or not."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
  example = {'image': tf.constant(image), 'label': tf.constant(0, tf.int32)}
  augment = functools.partial(
    input_pipeline._cifar10_train, pixel_mean=np.zeros((32, 32, 3), np.float32)
  )
  x = image / 255.0
  seen = set()
  for i in range(40):
    key = tf.constant([7, i], tf.int64)
    out = augment(example, key)['image'].numpy()
    # Stateless: the key alone decides the augmentation.
    np.testing.assert_array_equal(out, augment(example, key)['image'].numpy())
    matches = []
    for dy in range(-3, 4):
      for dx in range(-3, 4):
        rows = np.clip(np.arange(32) - dy, 0, 31)
        cols = np.clip(np.arange(32) - dx, 0, 31)
        shifted = x[rows][:, cols]
        for flip in (False, True):
          candidate = shifted[:, ::-1] if flip else shifted
          if np.allclose(out, candidate, atol=1e-6):
            matches.append((dy, dx, flip))
    assert len(matches) == 1, matches
    seen.add(matches[0])
  # The keys really vary the shift in both directions and the flip.
  assert len({dy for dy, _, _ in seen}) > 3
  assert len({dx for _, dx, _ in seen}) > 3
  assert {flip for _, _, flip in seen} == {False, True}


def test_imagenet2012(tmp_path):
  # The mock is stored as TFRecord: random access needs it in memory.
  config = _config('imagenet2012', data_dir=str(tmp_path), image_size=32, cache=True)
  with _mock_tfds(str(tmp_path), 'imagenet2012'):
    info = _info(config)
    assert info == input_pipeline.DatasetInfo(
      num_train=NUM_MOCK_EXAMPLES,
      num_test=NUM_MOCK_EXAMPLES,
      num_classes=1000,
      image_shape=(32, 32, 3),
    )
    # The mock's JPEGs are 5 to 50 pixels a side, so crops are both up- and
    # down-sampled.
    train = _epoch(config, global_batch_size=4, num_local_devices=2)
    train_again = _epoch(config, global_batch_size=4, num_local_devices=2)
    other_epoch = _epoch(config, epoch=1, global_batch_size=4, num_local_devices=2)
    test = _epoch(config, 'test', global_batch_size=4, num_local_devices=2)
    test_again = _epoch(config, 'test', global_batch_size=4, num_local_devices=2)

  assert len(train) == 2
  for batch in train:
    assert batch['image'].shape == (2, 2, 32, 32, 3)
    assert batch['image'].dtype == np.float32
    assert batch['label'].shape == (2, 2)
    assert batch['label'].dtype == np.int32
    assert np.all(np.isfinite(batch['image']))
  _assert_same(train, train_again)
  assert not np.array_equal(_stack(train, 'label'), _stack(other_epoch, 'label'))

  num_real = _check_test_batches(
    test, num_batches=3, num_local_devices=2, per_device=2, image_shape=(32, 32, 3)
  )
  assert num_real == NUM_MOCK_EXAMPLES
  _assert_same(test, test_again)
  # Normalized with the ImageNet statistics: roughly centred, unit scale.
  test_images = _stack(test, 'image')[:num_real]
  assert -2.2 < test_images.mean() < 2.7
  assert np.abs(test_images).max() < 4.0


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])
def test_unprepared_dataset_fails_fast(tmp_path, name):
  config = _config(name, data_dir=str(tmp_path))
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info_error:
    _info(config)
  with pytest.raises(FileNotFoundError) as iter_error:
    input_pipeline.create_input_iter(
      split='train', epoch=0, global_batch_size=4, num_local_devices=1, **config
    )
  assert time.monotonic() - start < 10.0
  for error in (info_error, iter_error):
    message = str(error.value)
    assert 'tensorflow_datasets.scripts.download_and_prepare' in message
    assert f'--datasets={name}' in message
    assert f'--data_dir={tmp_path}' in message
    if name == 'imagenet2012':
      assert os.path.join(str(tmp_path), 'downloads', 'manual') in message
      assert 'ILSVRC2012_img_train.tar' in message
  # Nothing was downloaded or prepared.
  assert not any(tmp_path.rglob('*.tfrecord*'))


def test_digits():
  config = _config('digits')
  info = _info(config)
  assert info == input_pipeline.DatasetInfo(
    num_train=1437, num_test=360, num_classes=10, image_shape=(8, 8, 1)
  )
  train = _epoch(config, global_batch_size=32, num_local_devices=2)
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
    input_pipeline.create_input_iter('digits', 'train', global_batch_size=4 * num_devices)
  )
  assert batch['image'].shape == (num_devices, 4, 8, 8, 1)

  test = _epoch(config, 'test', global_batch_size=32, num_local_devices=2)
  num_real = _check_test_batches(
    test, num_batches=12, num_local_devices=2, per_device=16, image_shape=(8, 8, 1)
  )
  assert num_real == 360
  # A stratified split: every digit is in the test set about 36 times.
  counts = np.bincount(_stack(test, 'label')[:num_real], minlength=10)
  assert counts.min() >= 35
  assert counts.max() <= 37


def test_synthetic_is_deterministic():
  fields = {
    'image_size': 8,
    'num_channels': 3,
    'num_classes': 4,
    'synthetic_train_size': 64,
    'synthetic_test_size': 20,
  }
  config = _config('synthetic', **fields)
  info = _info(config)
  assert info == input_pipeline.DatasetInfo(
    num_train=64, num_test=20, num_classes=4, image_shape=(8, 8, 3)
  )
  epoch0 = _epoch(config, global_batch_size=16)
  _assert_same(epoch0, _epoch(config, global_batch_size=16))
  epoch1 = _epoch(config, epoch=1, global_batch_size=16)
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

  # A fixed seed: another config.seed reorders, but the data stay the same.
  other_seed = _epoch(_config('synthetic', seed=1, **fields), global_batch_size=16)
  np.testing.assert_array_equal(
    np.unique(_stack(other_seed, 'image').reshape(64, -1), axis=0), np.unique(images0, axis=0)
  )

  test = _epoch(config, 'test', global_batch_size=16)
  assert (
    _check_test_batches(
      test, num_batches=2, num_local_devices=1, per_device=16, image_shape=(8, 8, 3)
    )
    == 20
  )
  _assert_same(test, _epoch(config, 'test', global_batch_size=16))


def test_steps_per_epoch_beyond_one_pass():
  config = _config(
    'synthetic', image_size=4, synthetic_train_size=64, synthetic_test_size=8, num_steps=6
  )
  batches = _epoch(config, global_batch_size=16)
  assert len(batches) == 6
  images = _stack(batches, 'image').reshape(96, -1)
  # One full pass, then a second pass in another order.
  assert len(np.unique(images[:64], axis=0)) == 64
  assert len(np.unique(images, axis=0)) == 64
  assert not np.array_equal(images[:32], images[64:])
  config['num_steps'] = 5
  assert len(_epoch(config, 'test', global_batch_size=16)) == 5


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


def test_process_slices(monkeypatch):
  """Each process reads its own part of the split, with its share of the batch."""
  config = _config('digits')
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  parts = []
  for index in range(2):
    monkeypatch.setattr(jax, 'process_index', lambda index=index: index)
    test = _epoch(config, 'test', global_batch_size=32, num_local_devices=2)
    # The global batch of 32 is 16 per process, 8 per device, and both
    # processes run the same ceil(360 / 32) steps.
    assert len(test) == 12
    assert test[0]['image'].shape == (2, 8, 8, 8, 1)
    mask = _stack(test, 'mask')
    parts.append(_stack(test, 'image')[mask == 1])
  assert [len(p) for p in parts] == [180, 180]
  monkeypatch.undo()
  everything = _stack(_epoch(_config('digits'), 'test', global_batch_size=40), 'image')[:360]
  np.testing.assert_array_equal(np.concatenate(parts), everything)


def test_batch_size_must_divide_devices():
  with pytest.raises(ValueError, match=r'batch_size=6 .*device count 4'):
    input_pipeline.create_input_iter('digits', 'train', global_batch_size=6, num_local_devices=4)


def test_unknown_dataset_and_split():
  with pytest.raises(ValueError, match='cifar10, imagenet2012, digits, synthetic'):
    input_pipeline.dataset_info('mnist')
  with pytest.raises(ValueError, match='cifar10, imagenet2012, digits, synthetic'):
    input_pipeline.create_input_iter('mnist', 'train', global_batch_size=4)
  with pytest.raises(ValueError, match='validation'):
    input_pipeline.create_input_iter(
      'digits', 'validation', epoch=0, global_batch_size=4, num_local_devices=1
    )


def _process_batches(config, *, processes, devices_per_process, epoch=0, start_step=0):
  """Every process's train batches, each batch's rows in device order."""
  per_process = []
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(jax, 'process_count', lambda: processes)
    for index in range(processes):
      patch.setattr(jax, 'process_index', lambda index=index: index)
      per_process.append(
        list(
          input_pipeline.create_input_iter(
            split='train',
            epoch=epoch,
            global_batch_size=8,
            num_local_devices=devices_per_process,
            start_step=start_step,
            **config,
          )
        )
      )
  return [
    {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    for batches in zip(*per_process, strict=True)
  ]


def test_the_global_batches_do_not_depend_on_the_process_count(tmp_path):
  # CIFAR-10's augmentation included: each example's shift and flip are keyed by its
  # position in the epoch, not by the process that reads it.
  config = _config('cifar10', data_dir=str(tmp_path), num_steps=3)
  with _mock_tfds(str(tmp_path), 'cifar10'):
    one = _process_batches(config, processes=1, devices_per_process=8)
    two = _process_batches(config, processes=2, devices_per_process=4)
    eight = _process_batches(config, processes=8, devices_per_process=1)
    resumed = _process_batches(config, processes=2, devices_per_process=4, start_step=1)
    next_epoch = _process_batches(config, processes=1, devices_per_process=8, epoch=1)
  assert len(one) == 3 and one[0]['image'].shape == (8, 1, 32, 32, 3)
  _assert_same(one, two)
  _assert_same(one, eight)
  # Resuming inside the epoch yields the rest of the same batches.
  _assert_same(one[1:], resumed)
  assert not np.array_equal(_stack(one, 'image'), _stack(next_epoch, 'image'))


def test_an_epoch_is_a_permutation_of_the_split_by_seed_and_epoch():
  order = input_pipeline.epoch_order(10, seed=0, epoch=0, num_examples=25)
  # Two whole passes in two different orders, then the start of a third.
  for start in (0, 10):
    np.testing.assert_array_equal(np.sort(order[start : start + 10]), np.arange(10))
  assert not np.array_equal(order[:10], order[10:20])
  assert len(set(order[20:])) == 5
  np.testing.assert_array_equal(order, input_pipeline.epoch_order(10, 0, 0, 25))
  assert not np.array_equal(order, input_pipeline.epoch_order(10, 0, 1, 25))
  assert not np.array_equal(order, input_pipeline.epoch_order(10, 1, 0, 25))


def test_a_tfrecord_split_out_of_memory_cannot_be_trained_on(tmp_path):
  config = _config('imagenet2012', data_dir=str(tmp_path), image_size=32)
  with (
    _mock_tfds(str(tmp_path), 'imagenet2012'),
    pytest.raises(ValueError, match='--file_format=array_record'),
  ):
    _epoch(config)


# The digests of these batches as the pipeline has produced them since the trainer's
# results were recorded: any change to a batch, bit for bit, changes a digest.
PINNED_BATCHES = {
  'digits_train': '6da04ce2c009efa0',
  'digits_train_resumed': '942d3dc43f2b8990',
  'digits_test': 'e67f27e91e9bcb09',
  'digits_train_evaluation': '7294386c54b50b6b',
  'synthetic_train': '511b9f93d9b8224c',
  'synthetic_test': '6d6b717b6db5b807',
  'cifar10_train': '407b694b5ef043f2',
  'cifar10_test': '60624121975ad425',
}


def test_batches_are_pinned(tmp_path):
  digits = functools.partial(
    input_pipeline.create_input_iter, 'digits', seed=3, global_batch_size=64, num_local_devices=2
  )
  synthetic = functools.partial(
    input_pipeline.create_input_iter,
    'synthetic',
    seed=5,
    image_size=6,
    num_channels=3,
    num_classes=4,
    synthetic_train_size=64,
    synthetic_test_size=20,
    global_batch_size=16,
    num_local_devices=1,
  )
  cifar10 = functools.partial(
    input_pipeline.create_input_iter,
    'cifar10',
    data_dir=str(tmp_path),
    seed=7,
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
  with _mock_tfds(str(tmp_path), 'cifar10'):
    digests['cifar10_train'] = digest(cifar10('train', epoch=1))
    digests['cifar10_test'] = digest(cifar10('test'))
  assert digests == PINNED_BATCHES


def test_the_pipeline_fields_are_set_from_the_command_line_on_a_locked_config():
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
  args = train.pipeline_args(config)
  assert args == {
    'dataset': 'synthetic',
    'data_dir': '/data',
    'image_size': 8,
    'num_channels': 3,
    'num_classes': 10,
    'synthetic_train_size': 64,
    'synthetic_test_size': 8,
    'seed': 0,
    'cache': False,
  }
  # The config sets every argument of the pipeline but those of a call.
  per_call = {'split', 'global_batch_size', 'num_steps', 'epoch', 'start_step'}
  per_call |= {'num_local_devices', 'evaluation'}
  parameters = inspect.signature(input_pipeline.create_input_iter).parameters
  assert set(parameters) == set(args) | per_call
  info = input_pipeline.dataset_info(**train.dataset_args(config))
  assert info == input_pipeline.DatasetInfo(
    num_train=64, num_test=8, num_classes=10, image_shape=(8, 8, 3)
  )
  # Unset, the cache is the dataset's default.
  assert train.pipeline_args(default.get_config())['cache'] is None


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
  assert input_pipeline.dataset_info('tiny') == input_pipeline.DatasetInfo(
    num_train=20, num_test=10, num_classes=3, image_shape=(2, 2, 1)
  )
  train = _epoch(_config('tiny'), global_batch_size=5)
  assert len(train) == 4
  # One permutation of the training split, scaled to [0, 1].
  np.testing.assert_array_equal(
    np.sort(_stack(train, 'image').reshape(-1)),
    np.sort(images[:20].reshape(-1).astype(np.float32) / np.float32(255)),
  )
  test = _epoch(_config('tiny'), 'test', global_batch_size=4)
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
