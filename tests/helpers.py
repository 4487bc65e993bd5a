"""Shared by the tests: the metrics rows of a trainer run and their comparison between
two runs, and a digest that pins a pipeline's batches bit for bit."""

import hashlib
import os

import numpy as np

from examples import workdir

# Fields that measure time, not training.
TIMING = ('images_per_sec', 'tokens_per_sec', 'wall_time')


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


def digest(batches) -> str:
  """The first 16 hex digits of the SHA-256 of every batch's arrays, in order."""
  sha = hashlib.sha256()
  for batch in batches:
    for key in sorted(batch):
      sha.update(key.encode())
      sha.update(np.ascontiguousarray(batch[key]).tobytes())
  return sha.hexdigest()[:16]
