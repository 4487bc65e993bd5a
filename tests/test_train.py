"""Tests for the reference trainers: examples/train.py, main.py and compare.py.

The CIFAR-10 and ImageNet pipelines run on `tfds.testing.mock_data` (offline) for a
couple of steps on the eight CPU devices of conftest.py; compiling ResNet-20 and
EfficientNet-B0 dominates, so each is trained once, in the cheaper of the two
parallelisms for it. The digits runs cover the rest: pmap against jit, resuming,
skipped non-finite steps, the flags of main.py and the comparison.
"""

import contextlib
import functools
import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.experimental.compilation_cache import compilation_cache

from examples import compare, train
from examples.configs import cifar10_resnet20, digits, imagenet_efficientnet_b0

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_MOCK_EXAMPLES = 16
_MOCK_SPLITS = {'cifar10': ('train', 'test'), 'imagenet2012': ('train', 'validation')}
# Fields that measure time, not training.
_TIMING = ('images_per_sec', 'wall_time')


@pytest.fixture(scope='module', autouse=True)
def _compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module, which compiles the same digits
  programs in several runs (and in the main.py subprocess)."""
  cache_dir = str(tmp_path_factory.mktemp('compilation_cache'))
  settings = {
    'jax_compilation_cache_dir': cache_dir,
    'jax_persistent_cache_min_compile_time_secs': 0.0,
  }
  previous = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  # Whether the cache is used is decided once per process; decide again, now and after.
  compilation_cache.reset_cache()
  yield cache_dir
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@contextlib.contextmanager
def _mock_tfds(data_dir: str, name: str):
  """`name` as a prepared dataset in `data_dir`, NUM_MOCK_EXAMPLES random examples a split."""
  # MockPolicy.USE_FILES needs the dataset's metadata on disk, with split sizes.
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(
    tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(name=split, shard_lengths=[NUM_MOCK_EXAMPLES], num_bytes=0)
        for split in _MOCK_SPLITS[name]
      ]
    )
  )
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  with tfds.testing.mock_data(
    num_examples=NUM_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir
  ):
    yield


def _short(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """`config` cut to a few steps, without a progress bar."""
  config.progress_bar = False
  config.steps_per_epoch = 2
  config.steps_per_eval = 1
  config.num_epochs = 1
  config.update(fields)
  return config


def _digits(**fields) -> ml_collections.ConfigDict:
  return _short(digits.get_config(), **{'steps_per_epoch': 3, **fields})


def _rows(workdir) -> list[dict]:
  return train.read_metrics(os.path.join(workdir, train.METRICS_FILE))


def _assert_sane(rows: list[dict], *, num_epochs: int, metropolis: bool, cool: bool) -> None:
  assert [row['epoch'] for row in rows] == list(range(1, num_epochs + 1))
  for row in rows:
    for key in (
      'train_loss',
      'train_accuracy',
      'test_loss',
      'test_accuracy',
      'kinetic_temperature',
      'learning_rate',
      *_TIMING,
    ):
      assert isinstance(row[key], float) and math.isfinite(row[key]), (key, row)
    assert 0.0 <= row['train_accuracy'] <= 1.0
    assert 0.0 <= row['test_accuracy'] <= 1.0
    assert row['kinetic_temperature'] > 0.0
    assert row['skipped_steps'] == 0
    if metropolis:
      assert 0.0 <= row['acceptance_rate'] <= 1.0
    else:
      assert row['acceptance_rate'] is None
    if cool:
      assert 0.0 <= row['rho'] < 1.0
    else:
      assert row['rho'] is None


# --------------------------------------------------------------------------------------------
# The paper's models on their real pipelines


def test_cifar10_resnet20_metropolis_under_pmap(tmp_path):
  config = _short(
    cifar10_resnet20.get_config(),
    data_dir=str(tmp_path / 'data'),
    batch_size=16,
    parallelism='pmap',
    optimizer='metropolis_coolmomentum',
  )
  workdir = tmp_path / 'work'
  with _mock_tfds(config.data_dir, 'cifar10'):
    state = train.train_and_evaluate(config, str(workdir))
  rows = _rows(workdir)
  _assert_sane(rows, num_epochs=1, metropolis=True, cool=True)
  assert rows[0]['step'] == 2 and int(state.step) == 2
  # The cooling runs on the proposal clock: rho = 0 at the last step of the run,
  # whatever the acceptance rate.
  assert rows[-1]['rho'] == 0.0
  assert (workdir / train.CURVES_FILE).exists()
  assert (workdir / train.CHECKPOINT_DIR / '1').exists()


def test_imagenet_efficientnet_b0_coolmomentum_under_jit(tmp_path):
  # bfloat16 computation, label smoothing, weight decay and momentum warm-up as in
  # the recipe; a small image keeps the CPU compile affordable.
  config = _short(
    imagenet_efficientnet_b0.get_config(),
    data_dir=str(tmp_path / 'data'),
    image_size=32,
    batch_size=16,
    parallelism='jit',
    optimizer='coolmomentum',
  )
  assert config.half_precision
  workdir = tmp_path / 'work'
  with _mock_tfds(config.data_dir, 'imagenet2012'):
    state = train.train_and_evaluate(config, str(workdir))
  rows = _rows(workdir)
  _assert_sane(rows, num_epochs=1, metropolis=False, cool=True)
  # Momentum warm-up: rho stays 0 for the first 5 epochs.
  assert rows[0]['rho'] == 0.0
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))


# --------------------------------------------------------------------------------------------
# Digits: parallelism, resuming, skipped steps


def test_digits_reaches_a_sane_accuracy(tmp_path):
  config = digits.get_config()
  config.update(num_epochs=2, parallelism='jit', progress_bar=False)
  train.train_and_evaluate(config, str(tmp_path))
  rows = _rows(tmp_path)
  _assert_sane(rows, num_epochs=2, metropolis=False, cool=True)
  assert rows[-1]['test_accuracy'] >= 0.9
  assert rows[-1]['train_loss'] < rows[0]['train_loss']
  # Cooled to rho = 0 at the end of the run.
  assert rows[-1]['rho'] == 0.0


def test_pmap_and_jit_train_alike(tmp_path):
  # Cross-replica BatchNorm statistics under pmap are the global batch's under jit,
  # and the Metropolis test sees the same averaged losses.
  states = {}
  for parallelism in train.PARALLELISMS:
    config = _digits(parallelism=parallelism, optimizer='metropolis_coolmomentum')
    states[parallelism] = train.train_and_evaluate(config, str(tmp_path / parallelism))
  pmap_rows, jit_rows = _rows(tmp_path / 'pmap'), _rows(tmp_path / 'jit')
  _assert_sane(pmap_rows, num_epochs=1, metropolis=True, cool=True)
  assert pmap_rows[-1]['rho'] == jit_rows[-1]['rho'] == 0.0
  for key in ('train_loss', 'test_loss', 'kinetic_temperature', 'acceptance_rate'):
    np.testing.assert_allclose(pmap_rows[0][key], jit_rows[0][key], rtol=1e-4, err_msg=key)
  for name in ('params', 'batch_stats'):
    jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
      getattr(states['pmap'], name),
      getattr(states['jit'], name),
    )


def _pmap_steps(config: ml_collections.ConfigDict, batches: list[dict]):
  """Runs `batches` through the pmap train step.

  Returns:
    The device state after the last step, the host state after each step and the
    metrics of each step.
  """
  config = train.resolve_config(config)
  model = train.create_model(config, axis_name=train.AXIS_NAME)
  tx = train.create_optimizer(config, steps_per_epoch=10, axis_name=train.AXIS_NAME)
  parallel = train.create_parallel(config, model)
  state = parallel.put_state(train.create_train_state(jax.random.PRNGKey(0), model, (8, 8, 1), tx))
  host_states, metrics = [], []
  for batch in batches:
    state, step_metrics = parallel.train_step(state, batch)
    host_states.append(parallel.get_state(state))
    metrics.append(step_metrics)
  return state, host_states, parallel.get_metrics(metrics)


def _random_batch(seed: int, num_devices: int = 8, per_device: int = 4) -> dict:
  rng = np.random.default_rng(seed)
  return {
    'image': rng.uniform(size=(num_devices, per_device, 8, 8, 1)).astype(np.float32),
    'label': rng.integers(0, 10, size=(num_devices, per_device)).astype(np.int32),
  }


def test_sgd_sa_replicas_stay_in_step_under_pmap():
  # Each device sees other examples; the losses are averaged before the Metropolis
  # test, so every replica makes the same decision and the parameters never diverge.
  state, _, metrics = _pmap_steps(
    _digits(optimizer='sgd_sa'), [_random_batch(seed) for seed in range(4)]
  )
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    leaf = np.asarray(leaf)
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[:1], leaf.shape))
  assert {float(m['accepted']) for m in metrics} <= {0.0, 1.0}


def test_non_finite_step_changes_nothing():
  # Metropolis around CoolMomentum: its key, counters and inner state all stay.
  optimizer = 'metropolis_coolmomentum'
  bad = _random_batch(0)
  bad['image'][3, 1, 2, 2, 0] = np.nan  # One pixel on one device poisons the averaged step.
  _, (before, after), metrics = _pmap_steps(_digits(optimizer=optimizer), [_random_batch(1), bad])
  assert [float(m['skipped']) for m in metrics] == [0.0, 1.0]
  assert int(after.step) == 2
  for name in ('params', 'batch_stats', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))


def test_non_finite_steps_are_counted(tmp_path):
  # A learning rate this large overflows within an epoch; the run goes on, counts the
  # skipped steps and keeps finite parameters.
  config = _digits(optimizer='momentum', steps_per_epoch=10)
  config.optimizers.momentum.learning_rate = 1e30
  state = train.train_and_evaluate(config, str(tmp_path))
  (row,) = _rows(tmp_path)
  assert row['skipped_steps'] > 0
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))


def test_resume_logs_each_epoch_once_and_continues_exactly(tmp_path):
  # SGD-SA's schedule does not depend on num_epochs, so a run of 2 epochs resumed to 3
  # must match an uninterrupted run of 3: this needs the Metropolis key, the cooling
  # step and the data order of each epoch to be restored.
  resumed, straight = tmp_path / 'resumed', tmp_path / 'straight'
  train.train_and_evaluate(_digits(optimizer='sgd_sa', num_epochs=2), str(resumed))
  # A row past the last checkpoint, as a crash could leave it, is dropped on resume.
  with open(resumed / train.METRICS_FILE, 'a') as f:
    f.write(json.dumps({'epoch': 3, 'train_loss': -1.0}) + '\n')
  resumed_state = train.train_and_evaluate(_digits(optimizer='sgd_sa', num_epochs=3), str(resumed))
  straight_state = train.train_and_evaluate(
    _digits(optimizer='sgd_sa', num_epochs=3), str(straight)
  )

  resumed_rows, straight_rows = _rows(resumed), _rows(straight)
  _assert_sane(resumed_rows, num_epochs=3, metropolis=True, cool=False)
  for resumed_row, straight_row in zip(resumed_rows, straight_rows, strict=True):
    for key in straight_row.keys() - set(_TIMING):
      if straight_row[key] is None:
        assert resumed_row[key] is None, key
      else:
        np.testing.assert_allclose(resumed_row[key], straight_row[key], rtol=1e-6, err_msg=key)
  assert resumed_rows[2]['wall_time'] > resumed_rows[1]['wall_time']
  jax.tree.map(np.testing.assert_array_equal, resumed_state.params, straight_state.params)
  jax.tree.map(np.testing.assert_array_equal, resumed_state.rng, straight_state.rng)

  # Nothing left to train: the checkpoint is returned and the rows stay.
  again = train.train_and_evaluate(_digits(optimizer='sgd_sa', num_epochs=3), str(resumed))
  assert int(again.step) == int(resumed_state.step)
  assert [row['epoch'] for row in _rows(resumed)] == [1, 2, 3]

  # Another optimizer cannot continue this checkpoint, and says why.
  with pytest.raises(ValueError, match='does not fit this config'):
    train.train_and_evaluate(_digits(optimizer='adam', num_epochs=4), str(resumed))


# --------------------------------------------------------------------------------------------
# Configs and schedules


@pytest.mark.parametrize('module', [digits, cifar10_resnet20, imagenet_efficientnet_b0])
def test_recipes_are_valid_for_every_optimizer(module):
  config = module.get_config()
  for name in train.OPTIMIZERS:
    config.optimizer = name
    train.validate_config(config)


def _bad(field, value, **extra):
  config = digits.get_config()
  config.update(extra)
  config[field] = value
  return config


@pytest.mark.parametrize(
  ('config', 'message'),
  [
    (_bad('optimizer', 'lion'), "config.optimizer must be one of 'coolmomentum', .*'lion'"),
    (_bad('model', 'vgg'), "config.model must be one of .*'resnet20'.*'vgg'"),
    (_bad('dataset', 'mnist'), "config.dataset must be one of .*'cifar10'.*'mnist'"),
    (_bad('parallelism', 'pjit'), "config.parallelism must be one of 'pmap', 'jit'.*'pjit'"),
    (_bad('cooling', 'cosine'), "config.cooling must be one of 'exponential'.*'cosine'"),
    (_bad('lr_schedule', 'cosine'), "config.lr_schedule must be one of 'constant'.*'cosine'"),
    (_bad('num_epochs', 0), r'config.num_epochs must be an integer in \[1, inf\).*=0'),
    (_bad('batch_size', 12), 'config.batch_size must be a multiple of the device count 8.*=12'),
    (_bad('steps_per_epoch', 0), r'config.steps_per_epoch must be -1 .*=0'),
    (_bad('learning_rate', -0.1), r'config.learning_rate must be a number in \(0, inf\).*-0.1'),
    (_bad('rho_0', 1.0), r'config.rho_0 must be a number in \[0, 1\).*=1.0'),
    (_bad('metropolis_multipliers', ()), 'config.metropolis_multipliers must be a non-empty'),
    (_bad('lr_scales', (0.1,)), 'config.lr_scales must be a tuple of 0 positive numbers'),
    (_bad('label_smoothing', 1.5), r'config.label_smoothing must be a number in \[0, 1\)'),
  ],
)
def test_bad_config_fails_at_once(config, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    train.validate_config(config)
  # train_and_evaluate checks first: nothing is compiled and the workdir stays empty.
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


def test_bad_optimizer_overrides_fail_at_once():
  config = digits.get_config()
  config.optimizers.adam = ml_collections.ConfigDict({'lr': 1e-3})
  with pytest.raises(ValueError, match=r'config.optimizers.adam.lr overrides no field'):
    train.validate_config(config)
  config = digits.get_config()
  config.optimizers.lion = ml_collections.ConfigDict({'learning_rate': 1e-3})
  with pytest.raises(ValueError, match=r'config.optimizers may only hold .*config.optimizers.lion'):
    train.validate_config(config)
  # Overrides are checked for the optimizer they apply to.
  config = digits.get_config()
  config.optimizer = 'adam'
  config.optimizers.adam.learning_rate = -1.0
  with pytest.raises(ValueError, match=r'config.learning_rate must be .*=-1.0'):
    train.validate_config(config)


def test_cifar10_baseline_schedule():
  config = cifar10_resnet20.get_config()
  config.optimizer = 'momentum'
  config = train.resolve_config(config)
  learning_rate = train.create_learning_rate_fn(config, steps_per_epoch=10)
  expected = {0: 0.01, 799: 0.01, 800: 1e-3, 1200: 1e-4, 1600: 1e-5, 1800: 5e-6, 1999: 5e-6}
  for step, value in expected.items():
    np.testing.assert_allclose(learning_rate(step), value, rtol=1e-5, err_msg=str(step))


def test_imagenet_rmsprop_schedule_and_momentum_warmup():
  config = imagenet_efficientnet_b0.get_config()
  config.batch_size = 4096  # The rate follows the batch size: 0.016 per 256 images.
  config.optimizer = 'rmsprop'
  learning_rate = train.create_learning_rate_fn(train.resolve_config(config), 100)
  peak = 0.016 * 4096 / 256
  np.testing.assert_allclose(learning_rate(0), 0.0, atol=1e-9)
  np.testing.assert_allclose(learning_rate(250), peak / 2, rtol=1e-5)
  np.testing.assert_allclose(learning_rate(500), peak, rtol=1e-5)
  np.testing.assert_allclose(learning_rate(500 + 239), peak, rtol=1e-5)
  np.testing.assert_allclose(learning_rate(500 + 240), peak * 0.97, rtol=1e-5)
  assert train.create_rho_fn(train.resolve_config(config), 100) is None

  config.optimizer = 'coolmomentum'
  rho = train.create_rho_fn(train.resolve_config(config), steps_per_epoch=100)
  assert float(rho(499)) == 0.0
  np.testing.assert_allclose(rho(500), 1 - 0.01 ** (1 - 500 / 35000), rtol=1e-5)


def test_rmsprop_is_tensorflow_rmsprop():
  # Mean square started at 1 and epsilon inside the square root, as TF's RMSProp.
  config = imagenet_efficientnet_b0.get_config()
  config.optimizer = 'rmsprop'
  config = train.resolve_config(config)
  config.lr_schedule = 'constant'
  config.weight_decay = 0.0
  tx = train.create_optimizer(config, steps_per_epoch=10)
  params = {'w': np.ones(3, np.float32)}
  grads = {'w': np.asarray([0.5, -1.0, 2.0], np.float32)}
  updates, _ = tx.update(grads, tx.init(params), params)
  mean_square = 0.9 * 1.0 + 0.1 * grads['w'] ** 2
  expected = -config.learning_rate * grads['w'] / np.sqrt(mean_square + 1e-3)
  np.testing.assert_allclose(updates['w'], expected, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Command lines


def test_compare_writes_table_json_and_png(tmp_path):
  config = _digits(steps_per_epoch=2)
  results = compare.compare(config, str(tmp_path), ['coolmomentum', 'adam'])
  assert set(results) == {'coolmomentum', 'adam'}
  with open(tmp_path / 'comparison.json') as f:
    assert json.load(f) == results
  for result in results.values():
    assert set(result) == {'final_train_loss', 'test_accuracy', 'best_test_accuracy', 'seconds'}
    assert 0.0 <= result['test_accuracy'] <= result['best_test_accuracy'] <= 1.0
  table = (tmp_path / 'comparison.md').read_text()
  assert '| coolmomentum |' in table and '| adam |' in table
  assert (tmp_path / 'comparison.png').stat().st_size > 0
  assert (tmp_path / 'adam' / train.METRICS_FILE).exists()


def test_main_takes_config_overrides(tmp_path, _compilation_cache):
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'examples.main',
      '--config=examples/configs/digits.py',
      f'--workdir={tmp_path}',
      '--config.num_epochs=1',
      '--config.steps_per_epoch=3',
      '--config.steps_per_eval=1',
      '--config.optimizer=adam',
    ],
    cwd=REPO_ROOT,
    env={**os.environ, 'JAX_COMPILATION_CACHE_DIR': _compilation_cache},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  (row,) = _rows(tmp_path)
  assert row['epoch'] == 1 and row['step'] == 3
  # The adam recipe of config.optimizers applies.
  assert row['learning_rate'] == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------
# The thermostat


def test_thermostat_logs_its_target_and_rho_under_pmap(tmp_path):
  config = _digits(cooling='thermostat', num_epochs=2)
  train.train_and_evaluate(config, str(tmp_path))
  rows = _rows(tmp_path)
  _assert_sane(rows, num_epochs=2, metropolis=False, cool=True)
  for row in rows:
    assert isinstance(row['target_temperature'], float) and row['target_temperature'] > 0.0
  # rho is the thermostat's, read from its state: 0 once the run has cooled.
  assert rows[-1]['rho'] == 0.0
  assert (tmp_path / train.CURVES_FILE).is_file()


def test_thermostat_refuses_a_momentum_warmup(tmp_path):
  config = _bad('cooling', 'thermostat', warmup_epochs=1.0)
  with pytest.raises(ValueError, match=r'config.warmup_epochs must be 0 with config.cooling='):
    train.validate_config(config)
