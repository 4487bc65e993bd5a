"""The sweep: vmapped runs equal the same runs trained one at a time, the selection never
reads the test split, and bad input is refused with the field named."""

import dataclasses
import functools
import json
import math
import os

import jax
import numpy as np
import pytest

from examples import (
  budget,
  checkpoints,
  compare,
  input_pipeline,
  lr_find,
  optimizers,
  schema,
  search,
  sweep,
  tasks,
  train,
)
from examples.configs import digits
from tests.helpers import largest_data_file, synthetic_cifar10


def _config(optimizer: str, steps: int = 4, validation_fraction: float = 0.15):
  config = compare.optimizer_config(digits.get_config(), optimizer)
  config.num_epochs = 1
  config.steps_per_epoch = steps
  config.steps_per_eval = 2
  config.validation_fraction = validation_fraction
  return config


def _one_at_a_time(config, setting, seed):
  """The per-step losses of one run as the trainer builds it: its own config, optimizer,
  initial state and jitted `train.train_step`, on its seed's batches of the training
  split less the validation split."""
  config = schema.resolve_config(config)
  config.seed = seed
  if config.optimizer == 'sgd_sa':
    config.metropolis_multipliers = tuple(
      m * setting.learning_rate for m in config.metropolis_multipliers
    )
  else:
    config.learning_rate = setting.learning_rate
  if setting.rho_0 is not None:
    config.rho_0 = setting.rho_0
  for field, value in setting.others:
    config[field] = value
  task = tasks.create_task(config)
  model = task.create_model()
  tx, _ = optimizers.create_optimizer(config, config.steps_per_epoch)
  state = train.create_train_state(jax.random.PRNGKey(seed), model, task.init_inputs(model), tx)
  step = jax.jit(functools.partial(train.train_step, task=task, model=model))
  losses = []
  for batch in task.train_batches(0):
    batch = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return np.array(losses)


@pytest.mark.parametrize(('optimizer', 'runs_per_vmap'), [('coolmomentum', None), ('sgd_sa', 2)])
def test_vmapped_runs_equal_runs_one_at_a_time(optimizer, runs_per_vmap):
  config = _config(optimizer)
  resolved = schema.resolve_config(config)
  center = sweep.recipe_rate(resolved)
  rho = 0.9 if optimizer == 'coolmomentum' else None
  settings = [sweep.Setting(center * 3.0, rho), sweep.Setting(center, 0.99 if rho else None)]
  seeds = [0, 5]
  runs = sweep.train_runs(config, settings, seeds, runs_per_vmap=runs_per_vmap)
  assert runs.step_loss.shape == (4, 4)
  for i, (setting, seed) in enumerate(zip(runs.settings, runs.seeds, strict=True)):
    expected = _one_at_a_time(config, setting, seed)
    np.testing.assert_allclose(runs.step_loss[i], expected, rtol=2e-5, atol=1e-6)
  # The settings and the seeds make different runs.
  assert not np.allclose(runs.step_loss[0], runs.step_loss[1])
  assert not np.allclose(runs.step_loss[0], runs.step_loss[2])


def _poisoned_digits(monkeypatch):
  spec = input_pipeline.get_dataset('digits')

  def arrays(options):
    data = dict(spec.arrays(options))
    images, labels = data['test']
    data['test'] = (images, (labels + 1) % 10)
    return data

  monkeypatch.setitem(input_pipeline.DATASETS, 'digits', dataclasses.replace(spec, arrays=arrays))


@pytest.mark.parametrize('kind', ['grid', 'random'])
def test_selection_never_reads_the_test_split(tmp_path, monkeypatch, kind):
  config = _config('momentum', steps=6)
  if kind == 'grid':
    grid = sweep.make_grid(num_rates=3, rate_span=100.0, num_seeds=1)
  else:
    grid = search.RandomSearch(trials=3, seeds=(0,))
  clean = sweep.sweep(config, str(tmp_path / 'clean'), ['momentum'], grid)['momentum']
  _poisoned_digits(monkeypatch)
  poisoned = sweep.sweep(config, str(tmp_path / 'poisoned'), ['momentum'], grid)['momentum']
  assert poisoned['selected'] == clean['selected']
  assert [e['validation_accuracy_mean'] for e in poisoned['grid']] == [
    e['validation_accuracy_mean'] for e in clean['grid']
  ]
  # The poison reached the test split.
  assert poisoned['test_accuracy_mean'] != clean['test_accuracy_mean']
  # The budget curves rank by validation alone: only their test accuracy moved.
  curves = {}
  for name in ('clean', 'poisoned'):
    with open(tmp_path / name / budget.BUDGET_JSON) as f:
      curves[name] = json.load(f)['momentum']
  for key in ('k', 'expected_validation_accuracy', 'low', 'high'):
    assert curves['poisoned'][key] == curves['clean'][key]
  assert curves['poisoned']['expected_test_accuracy'] != curves['clean']['expected_test_accuracy']
  if kind == 'random':
    # A random search's momentum samples its momentum and decay factor as well.
    assert set(clean['selected']) == {'learning_rate', 'rho_0', 'momentum', 'lr_decay_rate'}
    return
  with open(tmp_path / 'clean' / sweep.SWEEP_JSON) as f:
    stored = json.load(f)['momentum']
  for key in ('selected', 'test_accuracy_mean', 'test_accuracy_std', 'num_seeds', 'grid'):
    assert key in stored
  assert os.path.exists(tmp_path / 'clean' / sweep.SWEEP_MD)
  assert os.path.exists(tmp_path / 'clean' / sweep.CURVES_PNG)
  # TensorBoard event files per run (three rates, one seed) beside the runs' checkpoints.
  assert sorted(os.listdir(tmp_path / 'clean' / 'momentum')) == sorted(
    ['checkpoints', 'config.json']
    + [sweep.run_name(sweep.Setting(e['learning_rate'], e['rho_0']), 0) for e in clean['grid']]
  )


def test_diverged_settings_are_marked_and_never_selected():
  settings = [sweep.Setting(0.1, None), sweep.Setting(1.0, None)]
  shape = (2, 2)
  runs = sweep.Runs(
    settings=settings,
    seeds=[0, 0],
    train_loss=np.array([[1.0, 0.5], [1.0, np.nan]]),
    skipped=np.array([[0, 0], [0, 3]]),
    validation_accuracy=np.array([[0.5, 0.6], [0.5, 0.9]]),
    validation_loss=np.ones(shape),
    test_accuracy=np.full(shape, 0.5),
    test_loss=np.ones(shape),
    step_loss=np.ones((2, 4)),
    seconds=1.0,
    images=1,
  )
  result = sweep.summarize(runs)
  assert [e['diverged'] for e in result['grid']] == [False, True]
  assert result['selected'] == {'learning_rate': 0.1, 'rho_0': None}
  assert '| 2 (1) |' in sweep.markdown_table({'momentum': result})


def test_heatmap_marks_diverged_cells(tmp_path):
  grid = [
    {
      'learning_rate': lr,
      'rho_0': rho,
      'diverged': lr > 0.05,
      'validation_accuracy_mean': None if lr > 0.05 else 0.9,
      'test_accuracy_mean': None if lr > 0.05 else 0.9,
    }
    for lr in (0.01, 0.1)
    for rho in (0.9, 0.99)
  ]
  path = tmp_path / 'heatmap.png'
  sweep.plot_heatmap({'grid': grid}, str(path), 'coolmomentum')
  assert path.stat().st_size > 0


@pytest.mark.parametrize(
  ('kwargs', 'field'),
  [
    ({'num_rates': 0}, 'num_rates'),
    ({'num_seeds': 0}, 'seeds'),
    ({'num_seeds': -2}, 'seeds'),
    ({'rate_span': 0.5}, 'rate_span'),
    ({'rho_0s': ()}, 'rho_0s'),
    ({'rho_0s': (1.5,)}, 'rho_0s'),
  ],
)
def test_bad_grids_are_refused_naming_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    sweep.make_grid(**kwargs)


@pytest.mark.parametrize(
  ('factors', 'field'), [((), 'rate_factors'), ((0.0,), 'rate_factors'), ((-1.0,), 'rate_factors')]
)
def test_non_positive_or_empty_rates_are_refused(factors, field):
  with pytest.raises(ValueError, match=field):
    sweep.Grid(factors)


def test_empty_optimizer_list_and_settings_are_refused(tmp_path):
  grid = sweep.make_grid(num_rates=1, num_seeds=1)
  with pytest.raises(ValueError, match='optimizers'):
    sweep.sweep(_config('momentum'), str(tmp_path), [], grid)
  with pytest.raises(ValueError, match='settings'):
    sweep.train_runs(_config('momentum'), [], [0])
  with pytest.raises(ValueError, match='validation_fraction'):
    sweep.train_runs(_config('momentum', validation_fraction=0.0), [sweep.Setting(0.1, None)], [0])
  with pytest.raises(ValueError, match='validation_fraction'):
    sweep.sweep(_config('momentum'), str(tmp_path), ['momentum'], grid, validation_fraction=1.0)
  with pytest.raises(ValueError, match='center'):
    sweep.sweep(_config('momentum'), str(tmp_path), ['momentum'], grid, center='middle')


def test_a_model_with_a_named_axis_is_refused_with_the_cause():
  config, task = train.prepare(_config('momentum'))
  model = task.create_model(axis_name='batch')
  with pytest.raises(ValueError, match='axis_name'):
    sweep.build_program(config, task, model)


def test_a_killed_sweep_reruns_to_the_same_numbers(tmp_path, monkeypatch, capsys):
  # SGD-SA: its Metropolis keys and accept/reject decisions are in the state resumed.
  config = _config('sgd_sa', steps=2)
  config.num_epochs = 2
  grid = sweep.make_grid(num_rates=2, num_seeds=2)
  whole = sweep.sweep(config, str(tmp_path / 'whole'), ['sgd_sa'], grid)['sgd_sa']

  save = checkpoints.save_checkpoint

  def save_then_die(manager, *args, **kwargs):
    save(manager, *args, **kwargs)
    manager.wait_until_finished()
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpoints, 'save_checkpoint', save_then_die)
  with pytest.raises(KeyboardInterrupt):
    sweep.sweep(config, str(tmp_path / 'killed'), ['sgd_sa'], grid)
  monkeypatch.undo()
  capsys.readouterr()
  resumed = sweep.sweep(config, str(tmp_path / 'killed'), ['sgd_sa'], grid, verbose=True)
  printed = capsys.readouterr().out
  # It continued after the checkpoint of epoch 1, and ended where the whole sweep did.
  assert 'epoch 1/2' not in printed and 'epoch 2/2' in printed
  assert resumed['sgd_sa']['grid'] == whole['grid']
  assert resumed['sgd_sa']['selected'] == whole['selected']

  # A damaged last checkpoint: named, set aside, and epoch 2 trained again from epoch 1's.
  largest = largest_data_file(tmp_path / 'whole' / 'sgd_sa' / checkpoints.CHECKPOINT_DIR / '4')
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 2)
  again = sweep.sweep(config, str(tmp_path / 'whole'), ['sgd_sa'], grid, verbose=True)
  printed = capsys.readouterr().out
  assert 'The checkpoint 4 in' in printed and 'epoch 2/2' in printed
  assert again['sgd_sa']['grid'] == whole['grid']


def test_a_rerun_with_another_config_or_grid_is_refused(tmp_path):
  config = _config('momentum', steps=2)
  grid = sweep.make_grid(num_rates=1, num_seeds=1)
  workdir = str(tmp_path / 'sweep')
  sweep.sweep(config, workdir, ['momentum'], grid)
  with pytest.raises(ValueError, match=r'config\.sweep_seeds: stored \[0\], new \[0, 1\]'):
    sweep.sweep(config, workdir, ['momentum'], sweep.make_grid(num_rates=1, num_seeds=2))
  changed = _config('momentum', steps=2)
  changed.batch_size = 16
  with pytest.raises(ValueError, match=r'config\.batch_size: stored 32, new 16'):
    sweep.sweep(changed, workdir, ['momentum'], grid)
  # The stored config and grid continue (here: nothing left to train).
  sweep.sweep(config, workdir, ['momentum'], grid)


def test_a_rerun_with_another_search_space_or_number_of_trials_is_refused(tmp_path, monkeypatch):
  config = _config('adam', steps=2)
  plan = search.RandomSearch(trials=2, seeds=(0,))
  workdir = str(tmp_path / 'sweep')
  first = sweep.sweep(config, workdir, ['adam_lr'], plan)['adam_lr']
  with pytest.raises(
    ValueError, match=r"config\.sweep_search: stored .*'trials': 2\}, new .*'trials': 3\}"
  ):
    sweep.sweep(config, workdir, ['adam_lr'], search.RandomSearch(trials=3, seeds=(0,)))
  with pytest.raises(
    ValueError, match=r"config\.sweep_search: stored .*'sampler_seed': 0.*new .*'sampler_seed': 1"
  ):
    sweep.sweep(config, workdir, ['adam_lr'], search.RandomSearch(2, (0,), sampler_seed=1))
  wider = dataclasses.replace(
    search.SEARCH_SPACES['adam_lr'], dimensions=(search.Dimension('learning_rate', -6.0, -1.0),)
  )
  monkeypatch.setitem(search.SEARCH_SPACES, 'adam_lr', wider)
  with pytest.raises(
    ValueError, match=r"config\.sweep_search: stored .*'low': -5\.0.*new .*'low': -6\.0"
  ):
    sweep.sweep(config, workdir, ['adam_lr'], plan)
  monkeypatch.undo()
  # The stored search continues (here: nothing left to train) to the same numbers.
  assert sweep.sweep(config, workdir, ['adam_lr'], plan)['adam_lr']['grid'] == first['grid']


@pytest.mark.parametrize('entry', ['momentum', 'adam', 'sgd_sa', 'coolmomentum_thermostat'])
def test_a_random_trial_trains_vmapped_as_it_trains_alone(entry):
  # The sampled fields (momentum and decay factor, Adam's betas and epsilon, SGD-SA's
  # temperature) are traced per run and reach the optimizer as its config fields would.
  plan = search.RandomSearch(trials=2, seeds=(3,))
  config = sweep.entry_config(_config('momentum', steps=3), entry, plan)
  settings = [sweep.Setting.from_fields(t) for t in search.sample(entry, 2)]
  runs = sweep.train_runs(config, settings, [3])
  for i, setting in enumerate(settings):
    np.testing.assert_allclose(
      runs.step_loss[i], _one_at_a_time(config, setting, 3), rtol=2e-5, atol=1e-6
    )
  assert not np.allclose(runs.step_loss[0], runs.step_loss[1])


def test_a_grid_beyond_the_memory_is_refused_with_the_largest_that_fits():
  config, task = train.prepare(_config('coolmomentum'))
  program = sweep.build_program(config, task)
  # The run axis is sharded: each of the 8 devices holds its own 2 runs.
  hparams = {k: np.zeros(v.shape, v.dtype) for k, v in sweep._abstract_hparams(16).items()}
  states = program.init(jax.device_put(hparams, program.sharding))
  for leaf in jax.tree.leaves(states.params):
    assert len(leaf.sharding.device_set) == 8
    assert {shard.data.shape[0] for shard in leaf.addressable_shards} == {2}
  estimate = sweep.estimate_memory(program, task, config, runs_per_device=2)
  assert estimate.bytes > estimate.bytes_per_run > 0
  # A device whose memory holds the estimate within the fraction kept free passes; one
  # byte less is refused, with the largest grid that fits.
  enough = math.ceil(estimate.bytes / sweep.MEMORY_FRACTION)
  sweep.check_memory(estimate, 16, enough, optimizer='coolmomentum')
  with pytest.raises(ValueError, match=r'estimated [\d.]+ MiB per device') as error:
    sweep.check_memory(estimate, 16, enough - 2, optimizer='coolmomentum')
  assert 'The largest grid that fits is 8 runs' in str(error.value)  # One run per device.
  # The refusal comes before anything compiles: through train_runs, with a limit.
  with pytest.raises(ValueError, match='largest grid that fits is 0 runs'):
    sweep.train_runs(_config('coolmomentum'), [sweep.Setting(0.01, 0.9)], [0], memory_limit=1024)


def test_the_memory_estimate_bounds_what_xla_allocates():
  config, task = train.prepare(_config('coolmomentum'))
  program = sweep.build_program(config, task)
  for runs_per_device in (1, 4):
    estimate = sweep.estimate_memory(program, task, config, runs_per_device).bytes
    allocated = sweep.compiled_memory(program, task, runs_per_device)
    # Within a quarter of what XLA allocates (the benchmark measured 0.92x-1.04x).
    assert 0.8 <= estimate / allocated <= 1.25, (runs_per_device, estimate, allocated)


@pytest.mark.parametrize(
  ('optimizer', 'cooling'),
  [
    ('metropolis_coolmomentum', 'exponential'),
    ('coolmomentum', 'thermostat'),
    ('adam', None),
  ],
)
def test_every_optimizer_trains_vmapped_as_it_trains_alone(optimizer, cooling):
  config = _config(optimizer, steps=3)
  if cooling is not None:
    config.cooling = cooling
  center = sweep.recipe_rate(schema.resolve_config(config))
  rho = 0.9 if optimizer in optimizers.COOLMOMENTUM_OPTIMIZERS else None
  setting = sweep.Setting(center * 2.0, rho)
  runs = sweep.train_runs(config, [setting], [3])
  np.testing.assert_allclose(
    runs.step_loss[0], _one_at_a_time(config, setting, 3), rtol=2e-5, atol=1e-6
  )


def test_synthetic_cifar10_sweeps_over_the_eight_devices_around_lr_finds_suggestion(tmp_path):
  # The CIFAR-10 recipe on small synthetic images: 2 rates x 2 rho_0 x 2 seeds, one run on
  # each test device, the rates around the range test's suggestion.
  config = synthetic_cifar10(
    synthetic_train_size=96,
    synthetic_test_size=16,
    batch_size=16,
    num_epochs=1,
    steps_per_epoch=2,
    steps_per_eval=1,
  )
  assert jax.device_count() == 8
  grid = sweep.make_grid(num_rates=2, rate_span=4.0, rho_0s=(0.9, 0.99), num_seeds=2)
  lr_find_args = {'num_steps': 6, 'lr_min': 1e-3, 'lr_max': 1e-1}
  result = sweep.sweep(
    config, str(tmp_path), ['coolmomentum'], grid, center='lr_find', lr_find_args=lr_find_args
  )['coolmomentum']
  assert len(result['grid']) == 4 and all(e['num_seeds'] == 2 for e in result['grid'])
  assert result['selected'] is not None
  assert os.path.exists(tmp_path / sweep.HEATMAP_PNG)
  with open(tmp_path / 'coolmomentum' / lr_find.RESULT_FILE) as f:
    suggestion = json.load(f)['suggested_learning_rate']
  assert 1e-4 <= suggestion <= 1e-1
  rates = sorted({e['learning_rate'] for e in result['grid']})
  np.testing.assert_allclose(rates, [suggestion / 2, suggestion * 2], rtol=1e-6)
