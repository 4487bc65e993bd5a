"""A run's record, its workdir and its bounds refuse or restore what would be silently
wrong: lock files that do not name a process, workdirs inside one another, a loss
diverged to finite values, fields that the data set or task does not read, and
metrics rows lost from metrics.jsonl."""

import json
import os
import re
import socket

import numpy as np
import pytest

from examples import checkpoints, divergence, train, workdir
from tests.helpers import short_digits, tiny_language_model


@pytest.mark.parametrize('pid', ['abc', 99999.5, 1e20, 2**40, 0, True])
def test_a_lock_whose_pid_is_not_a_process_id_is_named(tmp_path, pid):
  with open(tmp_path / workdir.LOCK_FILE, 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': pid, 'start_time': 'then'}, f)
  with pytest.raises(
    workdir.WorkdirLockedError, match=re.escape(f'pid {pid!r}, which is not a process id')
  ):
    workdir.acquire_lock(str(tmp_path))


def test_a_workdir_that_is_a_file_is_named(tmp_path):
  path = tmp_path / 'file'
  path.write_text('')
  for target in (path, path / 'below'):
    with pytest.raises(ValueError, match=re.escape(f'{path} is a file, not a directory')):
      workdir.acquire_lock(str(target))


def _foreign_lock(directory):
  # A live process of this host other than this one: the test's parent.
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, workdir.LOCK_FILE), 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': os.getppid(), 'start_time': 'then'}, f)


def test_a_workdir_inside_or_around_a_held_one_is_refused(tmp_path):
  _foreign_lock(tmp_path / 'sweep')
  with pytest.raises(workdir.WorkdirLockedError, match='inside the workdir'):
    workdir.acquire_lock(str(tmp_path / 'sweep' / 'coolmomentum'))
  with pytest.raises(workdir.WorkdirLockedError, match='around the workdir'):
    workdir.acquire_lock(str(tmp_path))
  assert not os.path.exists(tmp_path / 'sweep' / 'coolmomentum')
  # This process's own nested locks (a sweep's range test) are allowed.
  with workdir.locked(str(tmp_path / 'mine')), workdir.locked(str(tmp_path / 'mine' / 'inner')):
    pass


def test_a_loss_diverged_to_finite_values_stops_the_run():
  config = short_digits()
  rows = [{'epoch': 1, 'step': 3, 'train_loss': 1.5e20}]
  metrics = {'skipped': np.zeros(3, np.float32), 'loss': np.array([2.3, 1e20, 3e20])}
  assert divergence.first_loss(None, 0, metrics) == 2.3
  with pytest.raises(divergence.DivergedError, match='divergence_loss_ratio=100'):
    divergence.check(config, rows, metrics, 2.3)
  divergence.check(config, [{**rows[0], 'train_loss': 229.0}], metrics, 2.3)
  config.divergence_loss_ratio = 0.0
  divergence.check(config, rows, metrics, 2.3)


@pytest.mark.parametrize(
  'make, field, value, reason',
  [
    (short_digits, 'image_size', 16, "the data set 'digits' does not read it"),
    (short_digits, 'synthetic_train_size', 8, "the data set 'digits' does not read it"),
    (short_digits, 'hidden_size', 8, "config.model='cnn' does not read it"),
    (tiny_language_model, 'label_smoothing', 0.1, "config.model='awd_lstm' does not read it"),
  ],
)
def test_a_field_that_is_not_read_is_refused(make, field, value, reason):
  config = make()
  config[field] = value
  with pytest.raises(
    ValueError, match=re.escape(f'config.{field}={value!r} would be ignored: {reason}')
  ):
    train.prepare(config)


def test_fields_at_their_default_or_the_data_sets_own_value_are_accepted():
  train.prepare(short_digits(image_size=8, num_channels=1))


def _row(epoch):
  return {'epoch': epoch, 'wall_time': float(epoch), 'train_loss': 1.0 / epoch}


def test_rows_lost_from_metrics_jsonl_are_restored_from_the_checkpoint(capsys):
  saved = [_row(epoch) for epoch in range(1, 6)]
  position = checkpoints.Position(6, 0, {}, 6.0, {'rows': saved, 'first_loss': 2.3})
  deleted_line = [_row(epoch) for epoch in (1, 2, 4, 5, 6)]
  assert train.recorded_rows('m.jsonl', deleted_line, position) == [*saved, _row(6)]
  assert 'written again from the checkpoint' in capsys.readouterr().out
  # The file deleted: the rows up to the checkpoint; the last epoch's row is made again.
  assert train.recorded_rows('m.jsonl', [], position) == saved
  # Without a record to restore from, a gap or a duplicate is refused, naming the file.
  old = checkpoints.Position(6, 0, {}, 6.0)
  for rows in (deleted_line, [*saved, _row(5)], []):
    with pytest.raises(ValueError, match=re.escape('m.jsonl holds the rows of the epochs')):
      train.recorded_rows('m.jsonl', rows, old)
  assert train.recorded_rows('m.jsonl', saved, old) == saved


def test_a_run_restores_its_metrics_and_config_json_from_its_checkpoint(tmp_path):
  config = short_digits(num_epochs=3, steps_per_epoch=2, checkpoint_every_steps=1)
  train.train_and_evaluate(config, str(tmp_path))
  metrics = tmp_path / workdir.METRICS_FILE
  whole = workdir.read_metrics(str(metrics))
  assert [row['epoch'] for row in whole] == [1, 2, 3]
  lines = metrics.read_text().splitlines(keepends=True)
  metrics.write_text(lines[0] + lines[2])
  os.remove(tmp_path / workdir.CONFIG_FILE)
  train.train_and_evaluate(config, str(tmp_path))
  assert workdir.read_metrics(str(metrics)) == whole
  assert workdir.read_config(str(tmp_path)) == workdir.config_dict(train.prepare(config)[0])
