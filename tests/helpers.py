"""Shared by the tests: the configs of short trainer runs, a mocked TFDS data set, the
metrics rows of a run and their comparison between two runs, a digest that pins a
pipeline's batches bit for bit, and a float64 transcription of the cooling schedules."""

import hashlib
import os
import subprocess
import sys

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from examples import input_pipeline, workdir
from examples.configs import cifar10_resnet20, digits, lstm_lm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Fields that measure time, not training.
TIMING = ('images_per_sec', 'tokens_per_sec', 'wall_time')


def short(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """`config` cut to one epoch of two steps, without a progress bar, then `fields`."""
  config.progress_bar = False
  config.steps_per_epoch = 2
  config.steps_per_eval = 1
  config.num_epochs = 1
  config.update(fields)
  return config


def short_digits(**fields) -> ml_collections.ConfigDict:
  """The digits recipe cut to one epoch of three steps, then `fields`."""
  return short(digits.get_config(), **{'steps_per_epoch': 3, **fields})


def synthetic_cifar10(**fields) -> ml_collections.ConfigDict:
  """The CIFAR-10 recipe (ResNet-20 with BatchNorm, L2 on kernels, CoolMomentum) on small
  synthetic images (8x8, 32 training examples, 8 test examples), then `fields`."""
  config = cifar10_resnet20.get_config()
  config.update(
    dataset='synthetic',
    image_size=8,
    synthetic_train_size=32,
    synthetic_test_size=8,
    batch_size=8,
    progress_bar=False,
  )
  config.update(fields)
  return config


def tiny_language_model(**fields) -> ml_collections.ConfigDict:
  """The language-model recipe on python_docs with a tiny model and a few windows of 8
  streams (one per test device), then `fields`."""
  config = lstm_lm.get_config()
  config.update(
    embedding_size=8,
    hidden_size=16,
    num_layers=2,
    bptt=10,
    batch_size=8,
    eval_batch_size=8,
    steps_per_epoch=4,
    steps_per_eval=2,
    num_epochs=2,
    progress_bar=False,
  )
  config.update(fields)
  return config


def run_module(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs `python -m module args` from the repository root and checks that it succeeds."""
  result = subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def run_python(args: list[str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs this interpreter with `args` in `cwd`, importing this checkout's coolopt and
  drawing with matplotlib's Agg; the caller checks the result."""
  env = dict(os.environ, MPLBACKEND='Agg')
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [REPO_ROOT, env.get('PYTHONPATH')]))
  return subprocess.run(
    [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
  )


def read_rows(directory) -> list[dict]:
  """The rows of metrics.jsonl in the workdir `directory`."""
  return workdir.read_metrics(os.path.join(directory, workdir.METRICS_FILE))


def assert_same_rows(rows, expected, rtol=1e-6):
  """`rows` hold the values of `expected`, all but the timings, None where it is None."""
  assert len(rows) == len(expected)
  for row, expected_row in zip(rows, expected, strict=True):
    for key in expected_row.keys() - set(TIMING):
      if expected_row[key] is None:
        assert row[key] is None, key
      else:
        np.testing.assert_allclose(row[key], expected_row[key], rtol=rtol, err_msg=key)


def largest_data_file(directory) -> str:
  """The largest of the array data files (orbax's `d/` folders) under a checkpoint's
  `directory`: the file to damage in a test."""
  files = [
    os.path.join(root, name)
    for root, _, names in os.walk(directory)
    if os.path.basename(root) == 'd'
    for name in names
  ]
  return max(files, key=os.path.getsize)


def digest(batches) -> str:
  """The first 16 hex digits of the SHA-256 of every batch's arrays, in order."""
  sha = hashlib.sha256()
  for batch in batches:
    for key in sorted(batch):
      sha.update(key.encode())
      sha.update(np.ascontiguousarray(batch[key]).tobytes())
  return sha.hexdigest()[:16]


def mock_tfds(data_dir: str, name: str, num_examples: int):
  """Mocks the TFDS dataset `name` as prepared as ArrayRecord in `data_dir`.

  `tfds.testing.mock_data`'s `MockPolicy.USE_CODE` leaves the builder unprepared and
  its split sizes unknown, so the pipeline would rightly refuse it. Instead the real
  metadata (`dataset_info.json`, `features.json`) of a dataset of `num_examples` in
  each split the pipeline reads (`input_pipeline.DATASETS[name].tfds_splits`) is
  written into `data_dir` and mocked with `MockPolicy.USE_FILES`.
  TFDS' random records serve CIFAR-10 (the same ones for every split); ImageNet's are
  encoded JPEGs, which TFDS' mock encodes with TensorFlow, so they are made here with
  Pillow: random images of 5 to 50 pixels a side, the same for every split.
  """
  import io

  from PIL import Image

  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)
        for split in input_pipeline.DATASETS[name].tfds_splits.values()
      ]
    )
  )
  builder.info.set_file_format(tfds.core.FileFormat.ARRAY_RECORD, override=True)
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  as_data_source_fn = None
  if name == 'imagenet2012':

    def as_data_source_fn(self, split, decoders=None, **kwargs):
      del self, split, decoders, kwargs
      rng = np.random.default_rng(0)
      records = []
      for label in range(num_examples):
        height, width = rng.integers(5, 51, size=2)
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        jpeg = io.BytesIO()
        Image.fromarray(pixels).save(jpeg, format='JPEG')
        records.append({'image': jpeg.getvalue(), 'label': label % 1000})
      return records

  return tfds.testing.mock_data(
    num_examples=num_examples,
    policy=tfds.testing.MockPolicy.USE_FILES,
    data_dir=data_dir,
    as_data_source_fn=as_data_source_fn,
  )
