"""Tests for examples/lr_find.py, the learning-rate range test of a trainer config."""

import json
import os

import numpy as np
import pytest

import coolopt
from examples import checkpoints, lr_find, optimizers, schema, text_pipeline
from examples.configs import digits, imagenet_efficientnet_b0
from tests.helpers import run_module, tiny_language_model


def _digits(**fields):
  config = digits.get_config()
  config.progress_bar = False
  config.update(fields)
  return config


def _read(workdir):
  with open(os.path.join(workdir, lr_find.RESULT_FILE)) as f:
    return json.load(f)


def _assert_result(result, *, num_steps, lr_min, lr_max):
  run = len(result['losses'])
  assert 3 <= run <= num_steps
  assert len(result['learning_rates']) == len(result['smoothed_losses']) == run
  expected = coolopt.lr_range_schedule(lr_min, lr_max, num_steps)
  np.testing.assert_allclose(result['learning_rates'], [expected(n) for n in range(run)], rtol=1e-6)
  assert lr_min / 10 * (1 - 1e-6) <= result['suggested_learning_rate'] <= lr_max * (1 + 1e-6)
  assert result['rule'] in coolopt.range_test.SUGGESTION_RULES
  if result['diverged_at_step'] is None:
    assert run == num_steps
  else:
    assert result['diverged_at_step'] == run - 1


def test_command_line_on_digits_writes_json_and_plot_and_no_checkpoint(tmp_path):
  # A training workdir with a checkpoint: the range test leaves it as it is.
  checkpoint = tmp_path / checkpoints.CHECKPOINT_DIR / '3' / 'state'
  checkpoint.parent.mkdir(parents=True)
  checkpoint.write_text('a checkpoint')
  result = run_module(
    'examples.lr_find',
    '--config=examples/configs/digits.py',
    f'--workdir={tmp_path}',
    '--config.progress_bar=False',
    '--num_steps=40',
    '--lr_min=1e-4',
    '--lr_max=1.0',
    '--rule=minimum',
  )
  saved = _read(tmp_path)
  _assert_result(saved, num_steps=40, lr_min=1e-4, lr_max=1.0)
  assert saved['rule'] == 'minimum' and saved['optimizer'] == 'coolmomentum'
  assert f'suggested learning rate: {saved["suggested_learning_rate"]:.3g}' in result.stdout
  assert (tmp_path / lr_find.PLOT_FILE).read_bytes().startswith(b'\x89PNG')
  # The suggestion is the library's, from the recorded losses.
  kept = saved['diverged_at_step'] or len(saved['losses'])
  expected = coolopt.suggest_learning_rate(
    saved['learning_rates'][:kept], saved['losses'][:kept], rule='minimum'
  )
  assert saved['suggested_learning_rate'] == pytest.approx(expected)
  assert sorted(p.name for p in tmp_path.rglob('*')) == sorted(
    ['checkpoints', '3', 'state', lr_find.RESULT_FILE, lr_find.PLOT_FILE]
  )
  assert checkpoint.read_text() == 'a checkpoint'


def test_stops_once_the_loss_diverges(tmp_path):
  # Up to a rate of 1e4 training blows up well before the last of 200 steps. The
  # Metropolis test, which would refuse the diverging steps, is left out: the range
  # test of 'metropolis_coolmomentum' is that of its proposals, CoolMomentum's.
  config = _digits(optimizer='metropolis_coolmomentum', parallelism='jit')
  result = lr_find.lr_find(config, str(tmp_path), num_steps=200, lr_min=1e-4, lr_max=1e4)
  _assert_result(result, num_steps=200, lr_min=1e-4, lr_max=1e4)
  assert result['optimizer'] == 'coolmomentum'
  stop = result['diverged_at_step']
  assert stop is not None and stop < 199
  smoothed = np.asarray([np.inf if x is None else x for x in result['smoothed_losses']])
  assert not smoothed[stop] <= 4.0 * smoothed[:stop].min()
  assert result == _read(tmp_path)


def test_language_model(tmp_path):
  # The AWD-LSTM recipe, tiny, on python_docs: the range test reads BPTT windows and
  # carries the LSTM state of its 8 streams as the trainer does, over 6 windows, i.e.
  # an epoch of 4 and 2 of the next (whose first window starts from a zero state).
  config = tiny_language_model(steps_per_epoch=4)
  result = lr_find.lr_find(config, str(tmp_path), num_steps=6, lr_min=1e-2, lr_max=1.0)
  _assert_result(result, num_steps=6, lr_min=1e-2, lr_max=1.0)
  assert result['optimizer'] == 'coolmomentum'
  # Tied, small embeddings: the first windows are scored about as a uniform guess.
  vocab_size = text_pipeline.load_corpus('python_docs').vocab_size
  assert abs(result['losses'][0] - np.log(vocab_size)) < 0.1 * np.log(vocab_size)
  assert (tmp_path / lr_find.PLOT_FILE).stat().st_size > 0


def test_optimizer_sweeps_the_given_rate_with_rho_held_at_rho_0():
  # The ImageNet recipe warms the momentum up for 5 epochs and cools it over 350: the
  # range test holds rho at rho_0 from the first step, and sweeps the given rate.
  config = schema.resolve_config(imagenet_efficientnet_b0.get_config())
  config.weight_decay = 0.0
  schedule = coolopt.lr_range_schedule(1e-3, 1.0, num_steps=4)
  tx, _ = optimizers.create_optimizer(config, 10, learning_rate=schedule, constant_rho=True)
  params = {'w': np.zeros(2, np.float32)}
  state = tx.init(params)
  gradient = {'w': np.asarray([1.0, -2.0], np.float32)}
  displacement = np.zeros(2)
  rho = config.rho_0
  for n in range(5):
    updates, state = tx.update(gradient, state, params)
    displacement = rho * displacement - float(schedule(n)) * (1 + rho) / 2 * gradient['w']
    np.testing.assert_allclose(updates['w'], displacement, rtol=1e-5, err_msg=str(n))
  # Without constant_rho the recipe's warm-up holds rho at 0.
  tx, _ = optimizers.create_optimizer(config, 10, learning_rate=schedule)
  state = tx.init(params)
  for _ in range(2):
    updates, state = tx.update(gradient, state, params)
  np.testing.assert_allclose(updates['w'], -1e-2 / 2 * gradient['w'], rtol=1e-5)


def test_sgd_sa_and_bad_arguments_fail_before_training(tmp_path):
  with pytest.raises(ValueError, match=r"config.optimizer must have a learning rate .*'sgd_sa'"):
    lr_find.lr_find(_digits(optimizer='sgd_sa'), str(tmp_path))
  with pytest.raises(ValueError, match='lr_max must be greater than lr_min'):
    lr_find.lr_find(_digits(), str(tmp_path), lr_min=1.0, lr_max=0.1)
  with pytest.raises(ValueError, match=r'smoothing must be in \[0, 1\)'):
    lr_find.lr_find(_digits(), str(tmp_path), smoothing=1.5)
  assert not any(tmp_path.iterdir())
