"""Tests for the reference trainers: examples/train.py, main.py and compare.py.

The CIFAR-10 and ImageNet pipelines run on `tfds.testing.mock_data` (offline) for a
couple of steps on the eight CPU devices of conftest.py; compiling ResNet-20 and
EfficientNet-B0 dominates, so each is trained once, in the cheaper of the two
parallelisms for it. The digits runs cover the rest: pmap against jit, resuming,
skipped non-finite steps, the flags of main.py and the comparison.
"""

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import coolopt
from examples import (
  checkpoints,
  compare,
  data_parallel,
  input_pipeline,
  models,
  optimizers,
  schema,
  tasks,
  train,
  train_state,
  workdir,
)
from examples.configs import cifar10_resnet20, digits, imagenet_efficientnet_b0
from tests.helpers import (
  TIMING,
  assert_same_rows,
  mock_tfds,
  read_rows,
  run_module,
  short,
  short_digits,
  tiny_language_model,
)

NUM_MOCK_EXAMPLES = 16


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
      'images_per_sec',
      'wall_time',
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
  config = short(
    cifar10_resnet20.get_config(),
    data_dir=str(tmp_path / 'data'),
    batch_size=16,
    parallelism='pmap',
    optimizer='metropolis_coolmomentum',
  )
  work = tmp_path / 'work'
  with mock_tfds(config.data_dir, 'cifar10', NUM_MOCK_EXAMPLES):
    state = train.train_and_evaluate(config, str(work))
  rows = read_rows(work)
  _assert_sane(rows, num_epochs=1, metropolis=True, cool=True)
  assert rows[0]['step'] == 2 and int(state.step) == 2
  # The recipe logs the loss over the whole training set, as the paper's Fig. 1.
  assert rows[0]['eval_train_loss'] > 0 and 0 <= rows[0]['eval_train_accuracy'] <= 1
  # The cooling runs on the proposal clock: rho = 0 at the last step of the run,
  # whatever the acceptance rate.
  assert rows[-1]['rho'] == 0.0
  assert (work / workdir.CURVES_FILE).exists()
  # Checkpoints are named by the run's step.
  assert (work / checkpoints.CHECKPOINT_DIR / '2').exists()


# EfficientNet-B0's first two stages: an unexpanded and an expanded block, squeeze and
# excitation, a strided depthwise convolution and stochastic depth. The whole network's
# structure is tested in test_models.py; compiling its train step on CPU takes minutes.
SHALLOW_EFFICIENTNET_BLOCKS = models.EFFICIENTNET_B0_BLOCKS[:2]


def test_imagenet_efficientnet_b0_coolmomentum_under_jit(tmp_path, monkeypatch):
  # Label smoothing, weight decay, momentum warm-up, BatchNorm groups and the moving
  # average of the weights as in the recipe, with bfloat16 computation (the flag), on
  # a shallow EfficientNet and a small image: the recipe is what is tested here.
  shallow = functools.partial(models.EfficientNetB0, blocks=SHALLOW_EFFICIENTNET_BLOCKS)
  monkeypatch.setitem(models.MODELS, 'efficientnet_b0', shallow)
  config = imagenet_efficientnet_b0.get_config()
  assert not config.half_precision and config.ema_decay == 0.9999
  assert config.batch_norm_group_size == 256
  config = short(
    config,
    data_dir=str(tmp_path / 'data'),
    image_size=16,
    batch_size=16,
    batch_norm_group_size=8,
    half_precision=True,
    parallelism='jit',
    optimizer='coolmomentum',
    warmup_epochs=0.5,  # The recipe's 5 epochs would outlast the run: refused.
  )
  work = tmp_path / 'work'
  with mock_tfds(config.data_dir, 'imagenet2012', NUM_MOCK_EXAMPLES):
    state = train.train_and_evaluate(config, str(work))
  rows = read_rows(work)
  _assert_sane(rows, num_epochs=1, metropolis=False, cool=True)
  # Cooled to 0 at the run's end, after a warm-up of one step.
  assert rows[0]['rho'] == 0.0
  assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))
  # The averages of the weights are kept, and they are not the weights.
  for average, weight in zip(
    jax.tree.leaves(state.ema['params']), jax.tree.leaves(state.params), strict=True
  ):
    assert average.dtype == np.float32 and average.shape == weight.shape
  assert not np.array_equal(state.ema['params']['head']['kernel'], state.params['head']['kernel'])


# --------------------------------------------------------------------------------------------
# Digits: parallelism, resuming, skipped steps


def test_digits_reaches_a_sane_accuracy(tmp_path):
  config = digits.get_config()
  config.update(num_epochs=2, parallelism='jit', progress_bar=False)
  train.train_and_evaluate(config, str(tmp_path))
  rows = read_rows(tmp_path)
  _assert_sane(rows, num_epochs=2, metropolis=False, cool=True)
  assert rows[-1]['test_accuracy'] >= 0.9
  assert rows[-1]['train_loss'] < rows[0]['train_loss']
  # Cooled to rho = 0 at the end of the run.
  assert rows[-1]['rho'] == 0.0


def test_pmap_and_jit_train_alike(tmp_path):
  # Cross-replica BatchNorm statistics under pmap are the global batch's under jit,
  # and the Metropolis test sees the same averaged losses.
  states = {}
  for parallelism in data_parallel.PARALLELISMS:
    config = short_digits(parallelism=parallelism, optimizer='metropolis_coolmomentum')
    states[parallelism] = train.train_and_evaluate(config, str(tmp_path / parallelism))
  pmap_rows, jit_rows = read_rows(tmp_path / 'pmap'), read_rows(tmp_path / 'jit')
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
  config.update(parallelism='pmap', steps_per_epoch=10)
  run = train.build(*train.prepare(config))
  parallel = run.parallel
  state = parallel.put_state(run.state)
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
    short_digits(optimizer='sgd_sa'), [_random_batch(seed) for seed in range(4)]
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
  _, (before, after), metrics = _pmap_steps(
    short_digits(optimizer=optimizer), [_random_batch(1), bad]
  )
  assert [float(m['skipped']) for m in metrics] == [0.0, 1.0]
  assert int(after.step) == 2
  for name in ('params', 'batch_stats', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name), getattr(before, name))


def test_non_finite_steps_are_counted(tmp_path):
  # A learning rate this large overflows within an epoch; the run goes on, counts the
  # skipped steps and keeps finite parameters.
  config = short_digits(optimizer='momentum', steps_per_epoch=10)
  config.optimizers.momentum.learning_rate = 1e30
  state = train.train_and_evaluate(config, str(tmp_path))
  (row,) = read_rows(tmp_path)
  assert row['skipped_steps'] > 0
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.params))


def test_resume_logs_each_epoch_once_and_continues_exactly(tmp_path):
  # A run that lost its last epoch (checkpoint and row) resumes after epoch 2 and must
  # match an uninterrupted run: this needs the Metropolis key, the cooling step and
  # the data order of each epoch to be restored.
  resumed, straight = tmp_path / 'resumed', tmp_path / 'straight'
  config = functools.partial(short_digits, optimizer='sgd_sa', num_epochs=3)
  train.train_and_evaluate(config(), str(resumed))
  shutil.rmtree(resumed / checkpoints.CHECKPOINT_DIR / '9')
  rows = read_rows(resumed)
  # A row past the last checkpoint, as a crash could leave it, is dropped on resume.
  rows[2]['train_loss'] = -1.0
  workdir.write_metrics(str(resumed / workdir.METRICS_FILE), rows)
  resumed_state = train.train_and_evaluate(config(), str(resumed))
  straight_state = train.train_and_evaluate(config(), str(straight))

  resumed_rows, straight_rows = read_rows(resumed), read_rows(straight)
  _assert_sane(resumed_rows, num_epochs=3, metropolis=True, cool=False)
  assert_same_rows(resumed_rows, straight_rows)
  jax.tree.map(np.testing.assert_array_equal, resumed_state.params, straight_state.params)
  jax.tree.map(np.testing.assert_array_equal, resumed_state.rng, straight_state.rng)

  # Nothing left to train: the checkpoint is returned and the rows stay.
  again = train.train_and_evaluate(config(), str(resumed))
  assert int(again.step) == int(resumed_state.step)
  assert [row['epoch'] for row in read_rows(resumed)] == [1, 2, 3]

  # Stopped between the checkpoint at the end of epoch 3 and its row: the row is made
  # again from the checkpoint, as it was.
  workdir.write_metrics(str(resumed / workdir.METRICS_FILE), resumed_rows[:2])
  train.train_and_evaluate(config(), str(resumed))
  remade = read_rows(resumed)
  assert [row['epoch'] for row in remade] == [1, 2, 3]
  assert {k: v for k, v in remade[2].items() if k not in TIMING} == {
    k: v for k, v in resumed_rows[2].items() if k not in TIMING
  }

  # Without its stored config, a checkpoint of another optimizer still fails, and says why.
  os.remove(resumed / workdir.CONFIG_FILE)
  with pytest.raises(ValueError, match='does not fit this config'):
    train.train_and_evaluate(short_digits(optimizer='adam', num_epochs=3), str(resumed))


def test_resume_with_another_trajectory_is_refused(tmp_path, monkeypatch):
  train.train_and_evaluate(short_digits(optimizer='momentum', num_epochs=2), str(tmp_path))
  with open(tmp_path / workdir.CONFIG_FILE) as f:
    stored = json.load(f)
  # The resolved config: the momentum recipe applied, the epoch length derived.
  assert stored['optimizer'] == 'momentum' and stored['steps_per_epoch'] == 3
  assert stored['num_epochs'] == 2 and stored['learning_rate'] == 0.01

  def no_compiling(*args, **kwargs):
    raise AssertionError('compiled before the config was checked')

  # A harmless field may change: the finished run is returned as it is.
  harmless = short_digits(optimizer='momentum', num_epochs=2, steps_per_eval=2)
  harmless.update(progress_bar=True, checkpoint_max_to_keep=5, parallelism='pmap')
  state = train.train_and_evaluate(harmless, str(tmp_path))
  assert int(state.step) == 6

  # A run stored before a field was declared resumes when the field keeps its default.
  del stored['synthetic_train_size']
  stored['gradient_clip'] = 0.5
  with open(tmp_path / workdir.CONFIG_FILE, 'w') as f:
    json.dump(stored, f)
  with pytest.raises(ValueError, match=r'config\.gradient_clip: stored 0\.5, new 0\.0'):
    train.train_and_evaluate(harmless, str(tmp_path))
  del stored['gradient_clip']
  with open(tmp_path / workdir.CONFIG_FILE, 'w') as f:
    json.dump(stored, f)
  assert int(train.train_and_evaluate(harmless, str(tmp_path)).step) == 6

  monkeypatch.setattr(train, 'build', no_compiling)
  changed = short_digits(optimizer='momentum', num_epochs=4, seed=3)
  changed.optimizers.momentum.learning_rate = 0.02
  with pytest.raises(ValueError) as error:
    train.train_and_evaluate(changed, str(tmp_path))
  message = str(error.value)
  for line in (
    'config.learning_rate: stored 0.01, new 0.02',
    'config.num_epochs: stored 2, new 4',
    'config.seed: stored 0, new 3',
  ):
    assert line in message
  assert 'new workdir' in message
  assert 'progress_bar' not in message and 'optimizers' not in message


# --------------------------------------------------------------------------------------------
# The recipes: moving averages, penalties, the training-set loss, throughput


def test_ema_follows_tensorflow_with_num_updates():
  # tf.train.ExponentialMovingAverage(0.9999, num_updates=global_step), applied after
  # each step: the rate min(0.9999, (1 + n) / (10 + n)) with n steps done.
  weights = [np.float32(w) for w in (1.0, 3.0, -2.0, 0.5)]
  average = np.float64(0.0)
  ema = {'w': jnp.float32(0.0)}
  for step, weight in enumerate(weights):
    n = step + 1
    rate = min(0.9999, (1 + n) / (10 + n))
    average = rate * average + (1 - rate) * weight
    ema = train_state.update_ema(ema, {'w': weight}, jnp.int32(step), 0.9999)
    np.testing.assert_allclose(ema['w'], average, rtol=1e-6)
  # Late in a run the rate is the decay itself.
  late = train_state.update_ema({'w': jnp.float32(1.0)}, {'w': 0.0}, jnp.int32(10**6), 0.9999)
  np.testing.assert_allclose(late['w'], 0.9999, rtol=1e-6)


def _inference_loss(config, variables, split):
  """Mean cross-entropy and accuracy of `variables` over a whole digits split, in NumPy order."""
  images, labels = input_pipeline._digits_arrays()[split]
  logits = tasks.create_task(config).create_model().apply(variables, images, train=False)
  loss = np.mean(tasks.cross_entropy_loss(logits, labels))
  return float(loss), float(np.mean(np.argmax(logits, -1) == labels))


def test_eval_uses_the_moving_averages_and_logs_the_training_set_loss(tmp_path, monkeypatch):
  config = short_digits(
    optimizer='momentum',
    ema_decay=0.5,
    eval_train=True,
    weight_decay=1e-2,
    steps_per_eval=-1,
    parallelism='jit',
  )
  # The first step sleeps 2 s, as a compilation would: images_per_sec must leave it out.
  build = train.build

  def slow_first_step(*args, **kwargs):
    run = build(*args, **kwargs)
    calls = []

    def train_step(state, batch):
      if not calls:
        time.sleep(2.0)
      calls.append(1)
      return run.parallel.train_step(state, batch)

    return dataclasses.replace(
      run, parallel=dataclasses.replace(run.parallel, train_step=train_step)
    )

  monkeypatch.setattr(train, 'build', slow_first_step)
  state = train.train_and_evaluate(config, str(tmp_path))
  (row,) = read_rows(tmp_path)
  assert row['images_per_sec'] > 2 * 32 / 2.0
  resolved = schema.resolve_config(config)
  test_loss, test_accuracy = _inference_loss(resolved, state.ema, 'test')
  np.testing.assert_allclose(row['test_loss'], test_loss, rtol=1e-5)
  np.testing.assert_allclose(row['test_accuracy'], test_accuracy)
  raw = {'params': state.params, 'batch_stats': state.batch_stats}
  assert abs(_inference_loss(resolved, raw, 'test')[0] - test_loss) > 1e-4
  # The training set's objective, in inference mode, with the averages and their penalty.
  train_loss, train_accuracy = _inference_loss(resolved, state.ema, 'train')
  penalty = optimizers.regularization(state.ema['params'], weight_decay=1e-2)
  np.testing.assert_allclose(row['eval_train_loss'], train_loss + float(penalty), rtol=1e-5)
  np.testing.assert_allclose(row['eval_train_accuracy'], train_accuracy)


def test_regularization_decays_all_but_batch_norm():
  params = {
    'conv1': {'kernel': np.full((3, 3, 1, 2), 2.0, np.float32)},
    'bn1': {'scale': np.full(2, 5.0, np.float32), 'bias': np.full(2, 5.0, np.float32)},
    'hidden': {'kernel': np.ones((2, 3), np.float32), 'bias': np.ones(3, np.float32)},
  }
  # weight_decay / 2 * sum(w**2) over conv1, hidden's kernel and bias: not bn1.
  np.testing.assert_allclose(
    optimizers.regularization(params, weight_decay=0.1), 0.05 * (18 * 4 + 6 + 3), rtol=1e-6
  )
  # Keras' l2 on the convolution kernels alone.
  np.testing.assert_allclose(
    optimizers.regularization(params, l2_regularization=0.01), 0.01 * 18 * 4, rtol=1e-6
  )


class _Seen(NamedTuple):
  value: jax.Array
  candidate_value: jax.Array


def test_metropolis_judges_the_objective_the_optimizer_descends():
  # An optimizer that records the `value` and `value_fn(params)` a Metropolis test gets.
  def update(updates, state, params=None, *, value, value_fn, **extra):
    del state, extra
    return jax.tree.map(jnp.zeros_like, updates), _Seen(value, value_fn(params))

  recorder = optax.GradientTransformationExtraArgs(
    lambda params: _Seen(jnp.zeros([]), jnp.zeros([])), update
  )
  tx = optax.chain(recorder, coolopt.track_kinetic_temperature())
  config = schema.resolve_config(short_digits())
  task = tasks.create_task(config)
  model = task.create_model()
  state = train_state.create_train_state(jax.random.PRNGKey(0), model, task.init_inputs(model), tx)
  batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), _random_batch(0))
  step = functools.partial(
    train.train_step, task=task, model=model, l2_regularization=1e-2, weight_decay=0.3
  )
  new_state, metrics = jax.jit(step)(state, batch)
  seen = new_state.opt_state[0]

  logits, _ = model.apply(
    {'params': state.params, 'batch_stats': state.batch_stats},
    batch['image'],
    train=True,
    mutable=['batch_stats'],
  )
  cross_entropy = np.mean(tasks.cross_entropy_loss(logits, batch['label']))
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  decayed = sum(np.sum(np.square(w)) for path, w in leaves if 'bn' not in path[0].key)
  conv_kernels = sum(
    np.sum(np.square(w)) for path, w in leaves if 'conv' in path[0].key and path[1].key == 'kernel'
  )
  objective = cross_entropy + 0.3 / 2 * decayed + 1e-2 * conv_kernels
  assert 0.3 / 2 * decayed > 0.1 * cross_entropy  # The penalty matters here.
  np.testing.assert_allclose(seen.value, objective, rtol=1e-5)
  np.testing.assert_allclose(seen.candidate_value, objective, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], objective, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Configs and schedules


@pytest.mark.parametrize('module', [digits, cifar10_resnet20, imagenet_efficientnet_b0])
def test_recipes_are_valid_for_every_optimizer(module):
  config = module.get_config()
  for name in optimizers.OPTIMIZERS:
    config.optimizer = name
    schema.validate_config(config)


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
    (_bad('parallelism', 'pjit'), "config.parallelism must be one of 'jit', 'pmap'.*'pjit'"),
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
    schema.validate_config(config)
  # train_and_evaluate checks first: nothing is compiled and the workdir stays empty.
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / 'work'))
  assert not (tmp_path / 'work').exists()


def test_bad_optimizer_overrides_fail_at_once():
  config = digits.get_config()
  config.optimizers.adam = ml_collections.ConfigDict({'lr': 1e-3})
  with pytest.raises(ValueError, match=r'config.optimizers.adam.lr overrides no field'):
    schema.validate_config(config)
  config = digits.get_config()
  config.optimizers.lion = ml_collections.ConfigDict({'learning_rate': 1e-3})
  with pytest.raises(ValueError, match=r'config.optimizers may only hold .*config.optimizers.lion'):
    schema.validate_config(config)
  # Overrides are checked for the optimizer they apply to.
  config = digits.get_config()
  config.optimizer = 'adam'
  config.optimizers.adam.learning_rate = -1.0
  with pytest.raises(ValueError, match=r'config.learning_rate must be .*=-1.0'):
    schema.validate_config(config)


def test_cifar10_baseline_schedule():
  config = cifar10_resnet20.get_config()
  config.optimizer = 'momentum'
  config = schema.resolve_config(config)
  learning_rate = optimizers.create_learning_rate_fn(config, steps_per_epoch=10)
  # Keras' lr_schedule(epoch) with a 0-based epoch: 1e-3 once epoch > 80, i.e. from the
  # 82nd epoch (step 810 at 10 steps an epoch) on.
  expected = {
    0: 0.01,
    809: 0.01,
    810: 1e-3,
    1209: 1e-3,
    1210: 1e-4,
    1609: 1e-4,
    1610: 1e-5,
    1809: 1e-5,
    1810: 5e-6,
    1999: 5e-6,
  }
  for step, value in expected.items():
    np.testing.assert_allclose(learning_rate(step), value, rtol=1e-5, err_msg=str(step))


def test_imagenet_rmsprop_schedule_and_momentum_warmup():
  config = imagenet_efficientnet_b0.get_config()
  config.batch_size = 4096  # The rate follows the batch size: 0.016 per 256 images.
  config.optimizer = 'rmsprop'
  learning_rate = optimizers.create_learning_rate_fn(schema.resolve_config(config), 100)
  peak = 0.016 * 4096 / 256
  # The TPU reference: a ramp over 500 steps in place of a decay x0.97 every 240 steps
  # counted from step 0, so the ramp ends at peak * 0.97**2.
  expected = {
    0: 0.0,
    250: peak / 2,
    499: peak * 499 / 500,
    500: peak * 0.97**2,
    719: peak * 0.97**2,
    720: peak * 0.97**3,
    2400: peak * 0.97**10,
  }
  for step, value in expected.items():
    np.testing.assert_allclose(learning_rate(step), value, rtol=1e-5, atol=1e-9, err_msg=str(step))
  assert optimizers.create_optimizer(schema.resolve_config(config), 100)[1].rho is None

  config.optimizer = 'coolmomentum'
  _, (_, rho) = optimizers.create_optimizer(schema.resolve_config(config), steps_per_epoch=100)
  assert float(rho(499)) == 0.0
  np.testing.assert_allclose(rho(500), 1 - 0.01 ** (1 - 500 / 35000), rtol=1e-5)


def test_rmsprop_is_tensorflow_rmsprop():
  # Mean square started at 1 and epsilon inside the square root, as TF's RMSProp.
  config = imagenet_efficientnet_b0.get_config()
  config.optimizer = 'rmsprop'
  config = schema.resolve_config(config)
  config.lr_schedule = 'constant'
  config.weight_decay = 0.0
  tx, _ = optimizers.create_optimizer(config, steps_per_epoch=10)
  params = {'w': np.ones(3, np.float32)}
  grads = {'w': np.asarray([0.5, -1.0, 2.0], np.float32)}
  updates, _ = tx.update(grads, tx.init(params), params)
  mean_square = 0.9 * 1.0 + 0.1 * grads['w'] ** 2
  expected = -config.learning_rate * grads['w'] / np.sqrt(mean_square + 1e-3)
  np.testing.assert_allclose(updates['w'], expected, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Command lines


def test_compare_writes_table_json_and_png(tmp_path):
  config = short_digits(steps_per_epoch=2)
  results = compare.compare(config, str(tmp_path), ['coolmomentum', 'adam'])
  assert set(results) == {'coolmomentum', 'adam'}
  with open(tmp_path / 'comparison.json') as f:
    assert json.load(f) == results
  for name, result in results.items():
    assert set(result) == {'final_train_loss', 'test_accuracy', 'best_test_accuracy', 'seconds'}
    # The logged training time: a finished run compared again reports it, not ~0 s.
    assert result['seconds'] == read_rows(tmp_path / name)[-1]['wall_time'] > 0
    assert 0.0 <= result['test_accuracy'] <= result['best_test_accuracy'] <= 1.0
  table = (tmp_path / 'comparison.md').read_text()
  assert '| coolmomentum |' in table and '| adam |' in table
  assert (tmp_path / 'comparison.png').stat().st_size > 0
  assert (tmp_path / 'adam' / workdir.METRICS_FILE).exists()
  assert compare.compare(config, str(tmp_path), ['coolmomentum', 'adam']) == results


def test_main_takes_config_overrides(tmp_path):
  run_module(
    'examples.main',
    '--config=examples/configs/digits.py',
    f'--workdir={tmp_path}',
    '--config.num_epochs=1',
    '--config.steps_per_epoch=3',
    '--config.steps_per_eval=1',
    '--config.optimizer=adam',
  )
  (row,) = read_rows(tmp_path)
  assert row['epoch'] == 1 and row['step'] == 3
  # The adam recipe of config.optimizers applies.
  assert row['learning_rate'] == pytest.approx(1e-3)


# --------------------------------------------------------------------------------------------
# The thermostat


def test_thermostat_logs_its_target_and_rho_under_pmap(tmp_path):
  config = short_digits(cooling='thermostat', num_epochs=2)
  train.train_and_evaluate(config, str(tmp_path))
  rows = read_rows(tmp_path)
  _assert_sane(rows, num_epochs=2, metropolis=False, cool=True)
  for row in rows:
    assert isinstance(row['target_temperature'], float) and row['target_temperature'] > 0.0
  # rho is the thermostat's, read from its state: in [0, rho_0] (the last step's; it is
  # 0 from step S on, and above 0 before if the gradients have faded below the target).
  assert all(0.0 <= row['rho'] <= config.rho_0 for row in rows)
  assert rows[0]['rho'] > 0.0
  assert (tmp_path / workdir.CURVES_FILE).is_file()


def test_thermostat_refuses_a_momentum_warmup(tmp_path):
  config = _bad('cooling', 'thermostat', warmup_epochs=1.0)
  with pytest.raises(ValueError, match=r'config.warmup_epochs must be 0 with config.cooling='):
    schema.validate_config(config)


def test_a_validation_split_is_held_out_and_evaluated_every_epoch(tmp_path):
  config = short_digits(optimizer='momentum', validation_fraction=0.2, steps_per_eval=-1)
  train.train_and_evaluate(config, str(tmp_path))
  (row,) = read_rows(tmp_path)
  assert 0.0 <= row['validation_accuracy'] <= 1.0 and row['validation_loss'] > 0
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['validation_fraction'] == 0.2
  # The language model's corpus has its own validation split: the field is refused.
  with pytest.raises(ValueError, match='validation_fraction'):
    schema.validate_config(tiny_language_model(validation_fraction=0.1))
