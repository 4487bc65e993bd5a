"""Nothing silently wrong in a run's workdir and settings: a given learning rate is used,
one run holds a workdir, damaged checkpoints are found, the trajectory lives in each
checkpoint, a diverged run stops, out-of-range seeds and warm-ups are refused, a short
range test says so, and damaged files and bad flags are named."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from flax import struct
from ml_collections import config_flags

from examples import (
  checkpoints,
  compare,
  divergence,
  logs,
  lr_find,
  optimizers,
  schema,
  tasks,
  train,
  workdir,
)
from examples import main as trainer_main
from examples.configs import digits
from tests.helpers import REPO_ROOT, TIMING, largest_data_file, read_rows
from tests.helpers import short_digits as _digits


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A digits run of 2 epochs of 3 steps (checkpoints 3 and 6) and its final state."""
  directory = tmp_path_factory.mktemp('finished')
  state = train.train_and_evaluate(_digits(num_epochs=2), str(directory))
  return directory, state


def _copy(finished_run, tmp_path):
  directory = tmp_path / 'run'
  shutil.copytree(finished_run[0], directory)
  return directory


# --------------------------------------------------------------------------------------------
# 1. A learning rate given on the command line is used, or refused


def _command_line(monkeypatch, *args: str) -> ml_collections.ConfigDict:
  """The config that examples.main trains for the command line `args`."""
  argv = ['main', '--config=examples/configs/digits.py', *args]
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads its overrides there.
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values, lock_config=True)
  flag_values(argv)
  config = flag_values.config
  schema.prefer_given(config, trainer_main.given_fields(flag_values), (config.optimizer,))
  return config


def test_learning_rate_given_on_the_command_line_is_used(monkeypatch):
  # The digits recipe of Adam sets 1e-3; before, it replaced the given 0.05.
  config = schema.resolve_config(
    _command_line(monkeypatch, '--config.optimizer=adam', '--config.learning_rate=0.05')
  )
  assert config.learning_rate == 0.05
  _, schedules = optimizers.create_optimizer(config, 10)
  assert float(schedules.learning_rate(0)) == pytest.approx(0.05)
  # Without it, the recipe's.
  assert (
    schema.resolve_config(_command_line(monkeypatch, '--config.optimizer=adam')).learning_rate
    == 1e-3
  )

  # SGD-SA has no learning rate to set: its rates are its multipliers.
  sgd_sa = _command_line(monkeypatch, '--config.optimizer=sgd_sa', '--config.learning_rate=0.1')
  with pytest.raises(ValueError, match=r"config.learning_rate must be 1 with .*'sgd_sa'.*"):
    schema.validate_config(sgd_sa)
  with pytest.raises(ValueError, match='metropolis_multipliers'):
    schema.validate_config(sgd_sa)

  # Several optimizers trained: one value cannot serve all their recipes.
  config = digits.get_config()
  config.learning_rate = 0.05
  with pytest.raises(ValueError, match=r'would not reach momentum, adam.*optimizers\.momentum'):
    schema.prefer_given(config, ['learning_rate'], ('coolmomentum', 'momentum', 'adam'))


# --------------------------------------------------------------------------------------------
# 2. One run at a time in a workdir


def test_a_second_run_meets_the_lock_and_a_stale_lock_is_taken_over(tmp_path, capsys):
  holder = workdir.acquire_lock(str(tmp_path))
  assert holder['pid'] == os.getpid() and holder['host'] == socket.gethostname()
  with pytest.raises(workdir.WorkdirLockedError) as error:
    train.train_and_evaluate(_digits(), str(tmp_path))
  message = str(error.value)
  for part in (f'process {os.getpid()}', socket.gethostname(), holder['start_time']):
    assert part in message
  assert not os.path.exists(tmp_path / workdir.CONFIG_FILE)
  workdir.release_lock(str(tmp_path), holder)
  assert not os.path.exists(tmp_path / workdir.LOCK_FILE)

  # A lock of a process that is gone, on this host: taken over, with a message.
  gone = subprocess.run(
    [sys.executable, '-c', 'import os; print(os.getpid())'],
    check=True,
    capture_output=True,
    text=True,
  )
  stale = {'host': socket.gethostname(), 'pid': int(gone.stdout), 'start_time': 'then'}
  with open(tmp_path / workdir.LOCK_FILE, 'w') as f:
    json.dump(stale, f)
  with workdir.locked(str(tmp_path)):
    assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert 'Taking over the lock' in capsys.readouterr().out
  assert not os.path.exists(tmp_path / workdir.LOCK_FILE)

  # A lock of another host cannot be checked: refused.
  with open(tmp_path / workdir.LOCK_FILE, 'w') as f:
    json.dump({**stale, 'host': 'elsewhere'}, f)
  with pytest.raises(workdir.WorkdirLockedError, match='host elsewhere'):
    workdir.acquire_lock(str(tmp_path))


# --------------------------------------------------------------------------------------------
# 3. Checksums: a damaged checkpoint is named and the run falls back


class _State(struct.PyTreeNode):
  step: jax.Array
  params: dict


def _weights(step):
  # Random: the data file is not compressed away.
  return np.random.default_rng(step).normal(size=1000).astype(np.float32)


def _save(manager, step, config):
  state = _State(np.asarray(step, np.int32), {'w': _weights(step)})
  metrics = {'loss': np.zeros(3, np.float32)}
  checkpoints.save_checkpoint(manager, state, checkpoints.Position(0, step, metrics, 0.0), config)


def _restore(manager, config):
  target = _State(np.zeros([], np.int32), {'w': np.zeros(1000, np.float32)})
  return checkpoints.restore_checkpoint(manager, target, {'loss': np.zeros(3, np.float32)}, config)


@pytest.mark.parametrize('damage', ['truncate', 'empty', 'flip'])
def test_a_damaged_checkpoint_is_named_and_the_one_before_restored(tmp_path, capsys, damage):
  config = digits.get_config()
  manager = checkpoints.checkpoint_manager(str(tmp_path), 3)
  _save(manager, 1, config)
  _save(manager, 2, config)
  manager.wait_until_finished()
  largest = largest_data_file(tmp_path / checkpoints.CHECKPOINT_DIR / '2')
  with open(largest, 'rb') as f:
    data = bytearray(f.read())
  if damage == 'truncate':
    data = data[: len(data) // 2]
  elif damage == 'empty':
    data = bytearray()
  else:  # 64 bytes flipped in the middle of the file.
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
  with open(largest, 'wb') as f:
    f.write(data)

  manager = checkpoints.checkpoint_manager(str(tmp_path), 3)
  state, position = _restore(manager, config)
  out = capsys.readouterr().out
  assert 'The checkpoint 2 in' in out and 'is damaged' in out
  assert 'Resuming from the checkpoint 1, the newest that verifies' in out
  assert int(state.step) == 1 and position.step_in_epoch == 1
  np.testing.assert_array_equal(state.params['w'], _weights(1))
  assert manager.all_steps() == [1]
  assert os.path.isdir(tmp_path / checkpoints.DAMAGED_DIR / '2')

  # A real mismatch keeps its own message.
  target = _State(np.zeros([], np.int32), {'w': np.zeros(7, np.float32)})
  with pytest.raises(ValueError, match='written with another model or optimizer'):
    checkpoints.restore_checkpoint(manager, target, {'loss': np.zeros(3, np.float32)}, config)


def test_a_run_falls_back_from_a_damaged_checkpoint_and_ends_as_before(
  finished_run, tmp_path, capsys
):
  directory = _copy(finished_run, tmp_path)
  largest = largest_data_file(directory / checkpoints.CHECKPOINT_DIR / '6')
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)
  state = train.train_and_evaluate(_digits(num_epochs=2), str(directory))
  assert 'The checkpoint 6 in' in capsys.readouterr().out
  # Epoch 2 trained again from checkpoint 3: the same parameters as the first time.
  jax.tree.map(np.testing.assert_array_equal, state.params, finished_run[1].params)
  rows, expected = read_rows(directory), read_rows(finished_run[0])
  assert [{k: v for k, v in r.items() if k not in TIMING} for r in rows] == [
    {k: v for k, v in r.items() if k not in TIMING} for r in expected
  ]


# --------------------------------------------------------------------------------------------
# 4. The trajectory fields live in each checkpoint


def test_a_changed_config_is_refused_without_config_json(finished_run, tmp_path):
  directory = _copy(finished_run, tmp_path)
  os.remove(directory / workdir.CONFIG_FILE)
  changed = _digits(num_epochs=3, seed=5)
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(changed, str(directory))
  message = str(error.value)
  assert 'The checkpoint 6 in' in message and 'another config' in message
  assert 'config.seed: stored 0, new 5' in message
  assert 'config.num_epochs: stored 2, new 3' in message
  assert not os.path.exists(directory / workdir.CONFIG_FILE)


# --------------------------------------------------------------------------------------------
# 5. A diverged run stops, its checkpoints intact


def test_skipped_stretch_counts_across_whole_skipped_epochs():
  assert divergence.skipped_stretch([], np.array([0, 1, 1, 0], np.float32)) == 2
  rows = [{'skipped_steps': 1}, {'skipped_steps': 4}]
  assert divergence.skipped_stretch(rows, np.ones(4, np.float32)) == 8
  assert divergence.skipped_stretch(rows, np.array([1, 1, np.nan, np.nan])) == 2
  line = logs.epoch_line(
    'momentum',
    {
      'epoch': 2,
      'train_loss': 1.3e26,
      'test_accuracy': 0.1,
      'kinetic_temperature': 1.0,
      'skipped_steps': 3,
    },
    2,
    1.0,
    tasks.ImageClassification.scores,
  )
  assert '3 steps skipped (non-finite)' in line


def test_a_diverging_run_stops_with_a_message_and_intact_checkpoints(tmp_path, capsys):
  config = _digits(optimizer='momentum', num_epochs=3)
  config.optimizers.momentum.learning_rate = 1e30
  with pytest.raises(divergence.DivergedError) as error:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  assert 'smaller learning rate than config.learning_rate=1e+30' in message
  assert 'config.divergence_steps=-1 (one epoch, 3 steps)' in message
  rows = read_rows(tmp_path)
  assert rows[-1]['skipped_steps'] == 3 and len(rows) < 3
  assert 'steps skipped (non-finite)' in capsys.readouterr().out
  # The checkpoints verify, and a rerun that does not stop continues from the last.
  assert not os.path.exists(tmp_path / workdir.LOCK_FILE)
  config.divergence_steps = 0  # Harmless: it stops a run, it does not change it.
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 9 and 'is damaged' not in capsys.readouterr().out
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))


# --------------------------------------------------------------------------------------------
# 7. Seeds and warm-up out of range


@pytest.mark.parametrize('seed', [2**32, 2**63, -1])
def test_a_seed_outside_the_range_a_run_uses_is_refused(seed):
  with pytest.raises(ValueError, match=r'config.seed must be an integer in \[0, 4294967295\].*'):
    schema.validate_config(_digits(seed=seed))
  schema.validate_config(_digits(seed=2**32 - 1))


def test_a_warmup_as_long_as_the_run_is_refused():
  with pytest.raises(ValueError, match=r'config.warmup_epochs must be less than config.num_ep'):
    schema.validate_config(_digits(num_epochs=2, warmup_epochs=2.0))
  schema.validate_config(_digits(num_epochs=2, warmup_epochs=1.5))
  # Only CoolMomentum warms its momentum up.
  schema.validate_config(_digits(num_epochs=2, warmup_epochs=2.0, optimizer='adam'))


# --------------------------------------------------------------------------------------------
# 9. A range test too short to suggest says so


def test_a_range_test_too_short_warns_or_refuses(tmp_path):
  with pytest.raises(ValueError, match=r'num_steps must be an integer >= 3, .*num_steps=2'):
    lr_find.lr_find(_digits(), str(tmp_path), num_steps=2)
  result = lr_find.lr_find(_digits(), str(tmp_path), num_steps=10, lr_min=1e-3, lr_max=1.0)
  assert result['diverged_at_step'] is None
  assert result['warning'].startswith('The sweep ran all its 10 steps (--num_steps=10): fewer')
  assert '100 steps a reliable suggestion needs' in result['warning']
  with pytest.raises(ValueError, match=r'The loss diverged at step [0-2] of 10, .*--lr_min=1e\+30'):
    lr_find.lr_find(_digits(), str(tmp_path), num_steps=10, lr_min=1e30, lr_max=1e35)


# --------------------------------------------------------------------------------------------
# 11. Damaged files and bad flags are named


def test_damaged_config_and_metrics_files_are_named_with_their_line(tmp_path):
  (tmp_path / workdir.CONFIG_FILE).write_text('{\n  "seed": 0,\n  "optimizer": \n}')
  with pytest.raises(ValueError, match=rf'{workdir.CONFIG_FILE}, line 4: not valid JSON'):
    workdir.read_config(str(tmp_path))
  path = str(tmp_path / workdir.METRICS_FILE)
  good = json.dumps({'epoch': 1, 'wall_time': 1.5})
  with open(path, 'w') as f:
    f.write(good + '\n{"epoch": 2, \n')
  with pytest.raises(ValueError, match=rf'{workdir.METRICS_FILE}, line 2: not valid JSON'):
    workdir.read_metrics(path)
  with open(path, 'w') as f:
    f.write(good + '\n' + json.dumps({'epoch': 2}) + '\n')
  with pytest.raises(ValueError, match=r"line 2: .* lacks 'wall_time'"):
    workdir.read_metrics(path)


def test_compare_without_optimizers_says_so(tmp_path):
  with pytest.raises(ValueError, match=r'optimizers must name at least one.*--optimizers='):
    compare.compare(_digits(), str(tmp_path), [])


def test_a_missing_process_is_named_and_waited_for_up_to_the_timeout():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  code = (
    'from examples import main\n'
    f"main.initialize_distributed('localhost:{port}', 2, 0, timeout=2)\n"
    "print('not reached')\n"
  )
  result = subprocess.run(
    [sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Process 0: waiting up to 2 s for processes 1 of 2 to start' in result.stderr
  assert 'did not start within --initialization_timeout=2 s; giving up' in result.stderr
  assert 'not reached' not in result.stdout
