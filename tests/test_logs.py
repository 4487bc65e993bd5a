"""What runs print and the TensorBoard event files they write (examples/logs.py)."""

import glob
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.util import tensor_util

from examples import checkpoints, compare, logs, tasks, train
from examples.configs import digits
from tests.helpers import REPO_ROOT

IMAGE_SCORES = tasks.ImageClassification.scores


def _events(workdir) -> dict[str, dict[int, float]]:
  """`{tag: {step: value}}` of the event files in `workdir`, later files winning."""
  scalars = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in EventFileLoader(path).Load():
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = float(
          tensor_util.make_ndarray(value.tensor)
        )
  return scalars


def _same(a: float, b: float | None) -> bool:
  """Equal once `b` (a float64 metrics row value) is stored as the event's float32."""
  if b is None or not math.isfinite(b):
    return b is None or math.isnan(a) == math.isnan(b)
  return a == float(np.float32(b))


def test_epoch_line_reads_the_row():
  row = {
    'epoch': 3,
    'train_loss': 0.12345,
    'test_accuracy': 0.9611,
    'rho': 0.5,
    'kinetic_temperature': 1.06e-8,
    'acceptance_rate': None,
  }
  assert logs.epoch_line('coolmomentum', row, 10, 1.25, IMAGE_SCORES) == (
    'coolmomentum epoch 3/10: train loss 0.1235, test accuracy 96.11%, rho 0.5, '
    'kinetic temperature 1.06e-08, 1.2s'
  )
  row.update(rho=None, acceptance_rate=0.25, test_accuracy=None)
  assert logs.epoch_line('sgd_sa', row, 10, 2.0, IMAGE_SCORES) == (
    'sgd_sa epoch 3/10: train loss 0.1235, test accuracy -, kinetic temperature 1.06e-08, '
    'acceptance 25.0%, 2.0s'
  )
  language = {
    'epoch': 1,
    'train_loss': 5.0,
    'valid_perplexity': 150.0,
    'test_perplexity': 140.5,
    'rho': None,
    'kinetic_temperature': 2e-3,
  }
  assert logs.epoch_line('sgd', language, 2, 3.0, tasks.LanguageModel.scores) == (
    'sgd epoch 1/2: train loss 5.0000, valid perplexity 150.00, test perplexity 140.50, '
    'kinetic temperature 0.002, 3.0s'
  )


def test_step_values_take_the_step_and_the_acceptance_of_the_last_steps():
  step_metrics = {
    'loss': np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32),
    'kinetic_temperature': np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32),
    'accepted': np.array([1.0, 0.0, 0.0, 1.0, 1.0], np.float32),
  }
  values = logs.step_values(step_metrics, 4, every=3, rho=0.5, learning_rate=0.01)
  assert values == {
    'loss': 4.0,
    'kinetic_temperature': float(np.float32(0.4)),
    'rho': 0.5,
    'learning_rate': 0.01,
    'acceptance_rate': pytest.approx(1 / 3),
  }
  # The window stops at the epoch's first step.
  assert logs.step_values(step_metrics, 2, every=3, rho=None, learning_rate=0.1)[
    'acceptance_rate'
  ] == pytest.approx(0.5)


def test_event_files_hold_each_epochs_row_and_each_steps_metrics(tmp_path):
  steps_per_epoch = 3
  config = digits.get_config()
  config.update(
    optimizer='metropolis_coolmomentum',
    progress_bar=False,
    steps_per_epoch=steps_per_epoch,
    steps_per_eval=1,
    num_epochs=2,
    log_every_steps=1,
  )
  train.train_and_evaluate(config, str(tmp_path))
  rows = train.read_metrics(os.path.join(tmp_path, train.METRICS_FILE))
  events = _events(tmp_path)

  # Every number of every row, at the row's step.
  for row in rows:
    for key, value in row.items():
      if key in ('epoch', 'step') or value is None:
        assert f'epoch/{key}' not in events or row['step'] not in events[f'epoch/{key}']
        continue
      assert _same(events[f'epoch/{key}'][row['step']], value), (key, row)
  assert set(events['epoch/test_accuracy']) == {3, 6}

  # Every step: the epoch's per-step metrics, as its checkpoint holds them.
  manager = ocp.CheckpointManager(os.path.join(tmp_path, checkpoints.CHECKPOINT_DIR))
  for epoch, row in enumerate(rows):
    step_metrics = manager.restore(row['step'], args=ocp.args.StandardRestore())['step_metrics']
    steps = [epoch * steps_per_epoch + i + 1 for i in range(steps_per_epoch)]
    for name, key in (
      ('loss', 'loss'),
      ('kinetic_temperature', 'kinetic_temperature'),
      ('acceptance_rate', 'accepted'),
    ):
      logged = [events[f'step/{name}'][step] for step in steps]
      np.testing.assert_array_equal(logged, np.asarray(step_metrics[key], np.float32))
    # The epoch's means are its row's.
    assert np.mean(np.asarray(logged, np.float64)) == pytest.approx(row['acceptance_rate'])
    # The schedules after the epoch's last step are those of its row.
    assert _same(events['step/rho'][row['step']], row['rho'])
    assert _same(events['step/learning_rate'][row['step']], row['learning_rate'])
  manager.close()
  # rho cools from step to step: read at each step, not once an epoch.
  rhos = [events['step/rho'][step] for step in sorted(events['step/rho'])]
  assert len(rhos) == 2 * steps_per_epoch and rhos == sorted(rhos, reverse=True)
  assert len(set(rhos)) > 2


def _run_piped(module: str, *args: str, timeout: int) -> subprocess.CompletedProcess:
  """`python -m module args` from the repository root, stdout and stderr in one pipe,
  as a user piping a command's output sees it."""
  return subprocess.run(
    [sys.executable, '-m', module, *args],
    cwd=REPO_ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    timeout=timeout,
  )


def test_quick_start_prints_a_line_an_epoch_and_ends_in_the_table(tmp_path):
  """The README's quick start, cut to a few steps, with its output piped."""
  num_epochs, steps_per_epoch = 2, 5
  result = _run_piped(
    'examples.compare',
    '--config',
    'examples/configs/digits.py',
    '--workdir',
    str(tmp_path),
    f'--config.num_epochs={num_epochs}',
    f'--config.steps_per_epoch={steps_per_epoch}',
    '--config.steps_per_eval=1',
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:]
  lines = result.stdout.rstrip('\n').splitlines()
  table = (tmp_path / 'comparison.md').read_text().rstrip('\n').splitlines()
  optimizers = compare.DEFAULT_OPTIMIZERS
  assert len(table) == 2 + len(optimizers)
  # A line per epoch of each optimizer, then the table; nothing else. The whole
  # quick start (10 epochs) is then 46 lines.
  assert lines[-len(table) :] == table
  epoch_lines = lines[: -len(table)]
  assert len(epoch_lines) == num_epochs * len(optimizers), result.stdout[-3000:]
  for name, line in zip(np.repeat(optimizers, num_epochs), epoch_lines, strict=True):
    assert line.startswith(f'{name} epoch '), line
  assert len(lines) <= 60
  # Each optimizer's run leaves its event files: its per-epoch curves, and a point
  # every config.log_every_steps (10) steps.
  for name in optimizers:
    events = _events(tmp_path / name)
    assert sorted(events['step/loss']) == [10]
    assert sorted(events['epoch/train_loss']) == [5, 10]


def test_verbosity_flag_shows_the_library_logs(tmp_path):
  result = _run_piped(
    'examples.main',
    '--config=examples/configs/digits.py',
    f'--workdir={tmp_path}',
    '--config.num_epochs=1',
    '--config.steps_per_epoch=2',
    '--config.steps_per_eval=1',
    '-v',
    '0',
    timeout=300,
  )
  assert result.returncode == 0, result.stdout[-3000:]
  # orbax's INFO logs and the whole metrics row.
  assert 'checkpoint_manager.py' in result.stdout
  assert 'epoch 1: step=2, train_loss=' in result.stdout
  assert 'coolmomentum epoch 1/1: train loss' in result.stdout


def _event_files(workdir) -> list[dict[str, dict[int, float]]]:
  """`_events` of each event file of `workdir`, in the order they were written."""
  paths = sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*')), key=os.path.getmtime)
  files = []
  for path in paths:
    scalars = {}
    for event in EventFileLoader(path).Load():
      for value in event.summary.value:
        scalars.setdefault(value.tag, {})[event.step] = float(
          tensor_util.make_ndarray(value.tensor)
        )
    files.append(scalars)
  return files


def test_a_resumed_run_writes_the_same_points_again(tmp_path):
  config = digits.get_config()
  config.update(
    optimizer='sgd_sa',
    progress_bar=False,
    steps_per_epoch=3,
    steps_per_eval=1,
    num_epochs=3,
    log_every_steps=2,
  )
  train.train_and_evaluate(config, str(tmp_path))
  # The last epoch's checkpoint lost: the rerun trains epoch 3 again.
  shutil.rmtree(tmp_path / checkpoints.CHECKPOINT_DIR / '9')
  train.train_and_evaluate(config, str(tmp_path))
  first, second = _event_files(tmp_path)
  # Epoch 3's points (steps 8 and 9 of the run), again and equal; the epoch's
  # throughput and wall time measure the clock.
  assert sorted(second['step/loss']) == [8]
  assert sorted(first['step/loss']) == [2, 4, 6, 8]
  for tag, points in second.items():
    if tag in ('epoch/images_per_sec', 'epoch/wall_time'):
      continue
    assert set(points) <= set(first[tag]), tag
    for step, value in points.items():
      assert value == first[tag][step] or (math.isnan(value) and math.isnan(first[tag][step]))
  assert sorted(second['epoch/train_loss']) == [9]
